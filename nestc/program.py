"""Program: a loaded spec with everything it imports, checked; the entry point of the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nestc import ast
from nestc.check import Checked, check_calls, check_decl
from nestc.errors import NestError, did_you_mean
from nestc.resolve import STD_PREFIX, Loader, Unit, read_source, unit_of
from nestc.source import Source


class Program:
    """A checked spec. `names` are its own declarations; imported ones can be built too."""

    def __init__(self, loader: Loader, unit: Unit) -> None:
        self.loader = loader
        self.unit = unit
        self.checked: dict[str, Checked] = {}
        for u in loader.units.values():
            for d in u.module.decls:
                if u.owner.get(d.name) == u.name:
                    self.checked.setdefault(f"{u.name}::{d.name}", check_decl(d, u.scope))
        check_calls(list(self.checked.values()))
        from nestc.passes.lower_optimizer import lower_optimizer

        for c in self.checked.values():
            if c.kind == "optimizer":
                # a spec mistake only the lowering sees (an `if` on step()) is a check error;
                # what this compiler cannot do yet is reported by compile and build
                try:
                    lower_optimizer(c)
                except NestError as err:
                    if not err.unsupported:
                        raise

    @property
    def file(self) -> str:
        return self.unit.name

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.unit.module.decls]

    def decl(self, name: str) -> Checked:
        if not isinstance(name, str):
            raise TypeError(f"a declaration is named by a str, got {type(name).__name__}")
        d = self.unit.scope.get(name)
        if d is None:
            raise NestError(f"`{self.file}` declares no `{name}`", None, kind="name",
                            hint=did_you_mean(name, self.unit.scope)
                            or f"it declares {', '.join(self.names) or 'nothing'}")
        owner = unit_of(self.loader, d)
        return self.checked[f"{owner.name}::{d.name}"]

    def lookup(self, decl: ast.Decl) -> Checked:
        owner = unit_of(self.loader, decl)
        return self.checked[f"{owner.name}::{decl.name}"]

    def graph(self, name: str, **hyper: Any):
        """The nest graph (networkx.MultiDiGraph) of a declaration."""
        from nestc.nest import build_graph

        return build_graph(self, self.decl(name), hyper)

    def source(self, name: str, **hyper: Any) -> str:
        """The generated PyTorch source of a declaration: an optimizer's (its hyperparameters
        are its constructor's), or a block's or model's at these hyperparameters."""
        from nestc.compile import generate, generate_module

        checked = self.decl(name)
        if checked.kind == "optimizer":
            if hyper:
                raise NestError(f"the source of optimizer `{name}` does not depend on its "
                                "hyperparameters: its class takes them", checked.decl.name_span,
                                kind="value", hint=f"{name}(params, {next(iter(hyper))}=...)")
            return generate(checked)
        return generate_module(self, checked, hyper)[0]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """An optimizer declaration -> torch.optim.Optimizer(params, **hyper); a block or a
        model -> torch.nn.Module (build(name, backend="chunked"|"reference"|"triton", **hyper);
        "triton" runs the delta-rule memories and Titans' MLP memory through nestc.ops'
        Triton kernels: CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
        checked = self.decl(name)
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError as err:
            if err.name != "torch":
                raise
            raise ModuleNotFoundError("building needs PyTorch: pip install torch "
                                      "(or nestc[torch])", name="torch") from None
        if checked.kind == "optimizer":
            from nestc.runtime import build_optimizer

            return build_optimizer(checked, *args, **kwargs)
        from nestc.module import build_module

        if args:
            raise TypeError(f"build({name!r}, ...) takes hyperparameters by keyword")
        return build_module(self, checked, **kwargs)


def load(path: str | Path) -> Program:
    """Load a spec from a file path, or from the stdlib with a path starting with `std/`."""
    path = str(path)
    loader = Loader()
    source = read_source(path)
    key, _ = loader.key(path, None)
    unit = loader.load_source(source, key)
    return Program(loader, unit)


def loads(text: str, filename: str = "<string>") -> Program:
    """Load a spec from text; relative imports resolve against filename's directory."""
    if not isinstance(text, str) or not isinstance(filename, str):
        raise TypeError(f"loads takes the spec's text and a file name as str, got "
                        f"{type(text).__name__} and {type(filename).__name__}")
    loader = Loader()
    source = Source(filename, text)
    key = "std:" + filename[len(STD_PREFIX):] if filename.startswith(STD_PREFIX) else \
        str(Path(filename).resolve()) + "#text"
    unit = loader.load_source(source, key)
    return Program(loader, unit)
