"""The tool version (a leaf module: the manifest and report record it without importing the API)."""

__version__ = "0.1.0"
