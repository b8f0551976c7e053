"""nestc: a declarative language and compiler for nested learning systems."""

from nestc.errors import NestError
from nestc.program import Program, load, loads

__version__ = "0.1.0"
__all__ = ["NestError", "Program", "load", "loads", "__version__"]
