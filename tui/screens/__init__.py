"""Modal screens over the debugger: help and errors."""
