"""Dock widgets: thin views over the core functions, one module per widget."""
