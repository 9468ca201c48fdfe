"""attnlib.data: planned (see shared/DESIGN.md); empty for now."""
