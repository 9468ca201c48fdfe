"""attnlib.decoding: planned (see shared/DESIGN.md); empty for now."""
