"""Command-line interface: ``mapstorch <command>``."""
