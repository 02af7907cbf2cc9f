"""The version of magi (read by the package, the generation state and the service)."""

__version__ = "0.1.0"
