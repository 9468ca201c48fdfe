"""attnlib.nn: planned (see shared/DESIGN.md); empty for now."""
