"""The version, in one place (setup.cfg reads it; nothing else is imported here)."""
__version__ = "0.1.0"
