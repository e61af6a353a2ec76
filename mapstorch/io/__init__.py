"""Reading and writing the files beamlines use (override files; more formats to come)."""

from mapstorch.io.override import OverrideFile, read_override

__all__ = ["OverrideFile", "read_override"]
