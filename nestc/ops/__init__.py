"""Hand-written tensor routines the generated code calls (FLA-style layout, one op per file).

`delta_rule` and `gated_delta_rule` are imported on first use, so importing this package (as
the torch-free front end does) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# the dtypes newton_schulz runs in, by the names a spec uses
NS_DTYPES = ("bfloat16", "float32", "float64", "float16")

_LAZY = ("delta_rule", "gated_delta_rule")
__all__ = ["NS_DTYPES", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        fn = getattr(importlib.import_module(f"nestc.ops.{name}"), name)
        # importing the package bound its module to this name; the function replaces it
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
