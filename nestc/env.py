"""Every NESTC_* environment flag, read in one place."""

from __future__ import annotations

import os

DEBUG = os.environ.get("NESTC_DEBUG", "") not in ("", "0")
# Force one back end on every compiled optimizer: auto, fused, generic or compiled.
OPTIM_BACKEND = os.environ.get("NESTC_OPTIM_BACKEND", "")
# Rewrite the golden files of generated code instead of comparing against them (tests only).
UPDATE_GOLDEN = os.environ.get("NESTC_UPDATE_GOLDEN", "") not in ("", "0")
# Elements per program of the generated element-wise Triton kernels (a power of two).
TRITON_BLOCK = int(os.environ.get("NESTC_TRITON_BLOCK", "") or 1024)
