"""Lowering passes, one pure function per file, run in the order PIPELINE lists them."""
