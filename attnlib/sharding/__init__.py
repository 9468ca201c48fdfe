"""attnlib.sharding: planned (see shared/DESIGN.md); empty for now."""
