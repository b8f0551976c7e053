"""Hand-written tensor routines the generated code calls (FLA-style layout, one op per file)."""

# the dtypes newton_schulz runs in, by the names a spec uses
NS_DTYPES = ("bfloat16", "float32", "float64", "float16")
