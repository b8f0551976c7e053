"""Hand-written tensor routines the generated code calls (FLA-style layout, one op per file)."""
