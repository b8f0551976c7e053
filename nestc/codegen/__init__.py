"""Code generators: IR -> source text. Renderers never optimize; passes never print code."""
