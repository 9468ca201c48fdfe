"""Raw pallas_call builders (no autodiff wiring, no public promises). Never imports attnlib."""
