"""The functional primitives: argument checks, pure-JAX references, dispatch."""
