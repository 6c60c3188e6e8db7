"""Modal screens: help and errors."""
