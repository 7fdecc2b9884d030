"""The engine version (one place; the package face and the store read it)."""
__version__ = "0.1.0"
