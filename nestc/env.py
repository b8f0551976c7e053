"""Every NESTC_* environment flag, read in one place."""

from __future__ import annotations

import os

DEBUG = os.environ.get("NESTC_DEBUG", "") not in ("", "0")
# Force a back end for compiled optimizers: "fused" (recognized kernels), "generic" (foreach code).
OPTIM_BACKEND = os.environ.get("NESTC_OPTIM_BACKEND", "")
CACHE_DIR = os.environ.get("NESTC_CACHE_DIR", "")
# Rewrite the golden files of generated code instead of comparing against them (tests only).
UPDATE_GOLDEN = os.environ.get("NESTC_UPDATE_GOLDEN", "") not in ("", "0")
