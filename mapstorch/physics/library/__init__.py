"""Sources of line data: xraylib (default) and XRF-Maps' own reference tables."""
