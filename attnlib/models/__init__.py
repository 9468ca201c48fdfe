"""attnlib.models: planned (see shared/DESIGN.md); empty for now."""
