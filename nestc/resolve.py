"""Imports and name binding: which file each `import` means and which declaration each name is."""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from nestc import ast
from nestc.errors import NestError, did_you_mean
from nestc.parse import MAX_SOURCE_BYTES, parse
from nestc.source import Source, point

STD_PREFIX = "std/"
MAX_IMPORT_DEPTH = 64


def stdlib_dir() -> Path:
    """The stdlib shipped inside the wheel, or the repository's when running from a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "stdlib", here.parent / "stdlib"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("stdlib/ not found beside the nestc package")


@dataclass
class Unit:
    """One parsed file and the declarations visible in it (its own first, then imported)."""

    name: str  # as reported in errors: "std/optim/adam.nest" or the path given
    module: ast.Module
    scope: dict[str, ast.Decl] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # decl name -> unit name declaring it


def std_path(path: str, span=None, file: str | None = None) -> Path:
    """The file behind a `std/...` path; it can never leave the stdlib directory."""
    rest = path[len(STD_PREFIX):]
    norm = posixpath.normpath(rest)
    if not rest or norm.startswith("..") or norm.startswith("/") or "\\" in rest or norm == ".":
        what = "names no file in" if not rest or norm == "." else "leaves"
        raise NestError(f"`{path}` {what} the standard library", span, kind="import", file=file,
                        hint="std/ paths name files inside the stdlib, such as std/optim/adam.nest")
    return stdlib_dir() / norm


def read_source(path: str, display: str | None = None, span=None) -> Source:
    name = display or path
    where = None if span is not None else name  # an error about the file the user named
    file = std_path(path, span, where) if path.startswith(STD_PREFIX) else Path(path)
    try:
        # read at most one byte past the limit: `nestc check /dev/zero` must end
        with open(file, "rb") as fh:
            data = fh.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        raise NestError(f"no such file: `{path}`", span, kind="import", file=where) from None
    except IsADirectoryError:
        raise NestError(f"`{path}` is a directory, not a .nest file", span, kind="import",
                        file=where, hint=f"name the files in it: {path.rstrip('/')}/*.nest"
                        if span is None else None) from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        why = getattr(err, "strerror", None) or str(err)
        raise NestError(f"cannot read `{path}`: {why}", span, kind="import", file=where) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise NestError(f"`{path}` is larger than {MAX_SOURCE_BYTES // 1024} KiB", span,
                        kind="import", file=where, hint="a spec is a short text file")
    try:
        text = data.decode("utf-8")  # (Source drops a byte-order mark and makes line ends \n)
    except UnicodeDecodeError as err:
        # report the bad byte on a source made of the valid text before it
        src = Source(name, data[: err.start].decode("utf-8"))
        good = src.text
        line = good.count("\n") + 1
        col = len(good) - (good.rfind("\n") + 1) + 1
        raise NestError(f"the file is not UTF-8 text (byte 0x{data[err.start]:02x})",
                        point(src, line, col), kind="syntax",
                        hint="save the spec as UTF-8") from None
    return Source(name, text)


# a file's AST by its name and text: a process that loads many specs (`nestc check` of the
# stdlib, tests) parses a file they import once, not once per importer (ASTs are frozen)
_parse = functools.lru_cache(maxsize=256)(parse)


class Loader:
    """Parses a file and everything it imports, once each, rejecting cycles."""

    def __init__(self) -> None:
        self.units: dict[str, Unit] = {}
        self.stack: list[str] = []  # keys of the files being loaded, outermost first
        self.shown: list[str] = []  # their names as reported

    def key(self, path: str, base: str | None) -> tuple[str, str]:
        """(file key, display name) of an import written as `path` in a file at `base`."""
        if path.startswith(STD_PREFIX):
            return ("std:" + posixpath.normpath(path[len(STD_PREFIX):]), path)
        full = Path(path) if base is None or Path(path).is_absolute() else Path(base).parent / path
        return (str(full.resolve()), posixpath.normpath(str(full)) if base else path)

    def load_source(self, source: Source, key: str) -> Unit:
        if key in self.units:
            return self.units[key]
        module = _parse(source)
        unit = Unit(source.name, module)
        self.stack.append(key)
        self.shown.append(source.name)
        try:
            for decl in module.decls:
                if decl.name in unit.scope:
                    first = unit.scope[decl.name]
                    raise NestError(f"`{decl.name}` is declared twice", decl.name_span, kind="name",
                                    notes=(("first declared here", first.name_span),))
                unit.scope[decl.name] = decl
                unit.owner[decl.name] = unit.name
            for imp in module.imports:
                self.bind_import(unit, imp, source.name if not key.startswith("std:") else None, key)
        finally:
            self.stack.pop()
            self.shown.pop()
        self.units[key] = unit
        return unit

    def bind_import(self, unit: Unit, imp: ast.Import, base: str | None, importer_key: str) -> None:
        if importer_key.startswith("std:") and not imp.path.startswith(STD_PREFIX):
            # stdlib files import each other by std/ paths only
            base_dir = posixpath.dirname(importer_key[4:])
            path = STD_PREFIX + posixpath.normpath(posixpath.join(base_dir, imp.path))
        else:
            path = imp.path
        if not path.endswith(".nest"):
            raise NestError(f"`{imp.path}` is not a .nest file", imp.path_span, kind="import")
        key, display = self.key(path, base)
        if key in self.stack:
            chain = " -> ".join([*self.shown[self.stack.index(key):], display])
            raise NestError(f"import cycle: {chain}", imp.path_span, kind="import",
                            hint="move the shared declarations into a third file both import")
        if len(self.stack) > MAX_IMPORT_DEPTH:
            raise NestError("imports nested too deeply", imp.path_span, kind="import")
        if key not in self.units:
            # a relative import is found beside the importing file, whatever the working directory
            where = path if path.startswith(STD_PREFIX) else display
            try:
                source = read_source(where, display, imp.path_span)
            except NestError as err:
                if where == imp.path or not err.message.startswith("no such file"):
                    raise
                raise NestError(f"no such file: `{imp.path}`", imp.path_span, kind="import",
                                hint=f"imports are relative to the importing file: looked for "
                                f"`{where}`") from None
            self.load_source(source, key)
        other = self.units[key]
        own = {n for n, d in other.scope.items() if other.owner[n] == other.name}
        if imp.names is not None:
            for name in imp.names:
                if name not in own:
                    raise NestError(f"`{display}` declares no `{name}`", imp.span, kind="import",
                                    hint=did_you_mean(name, own)
                                    or f"it declares {', '.join(sorted(own)) or 'nothing'}")
                self.add(unit, name, other.scope[name], other.name, imp)
        elif imp.alias is not None:
            for name in sorted(own):
                self.add(unit, f"{imp.alias}.{name}", other.scope[name], other.name, imp)
        else:
            for name in sorted(own):
                self.add(unit, name, other.scope[name], other.name, imp)

    def add(self, unit: Unit, name: str, decl: ast.Decl, owner: str, imp: ast.Import) -> None:
        if name in unit.scope and unit.scope[name] is not decl:
            if unit.owner[name] == unit.name:
                return  # a file's own declaration shadows an imported one
            raise NestError(f"`{name}` is imported twice, from {unit.owner[name]} and {owner}",
                            imp.span, kind="import", hint="import one of them `as` a name")
        unit.scope[name] = decl
        unit.owner[name] = owner


def unit_of(loader: Loader, decl: ast.Decl) -> Unit:
    """The unit that declares `decl` (for resolving names inside it)."""
    for unit in loader.units.values():
        if unit.scope.get(decl.name) is decl and unit.owner[decl.name] == unit.name:
            return unit
    raise AssertionError(f"declaration {decl.name} belongs to no loaded unit")
