"""Imports and name binding: std/ and relative paths, cycles, missing files and names, aliases."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import spec

import nestc
from nestc.errors import NestError

SGD = "optimizer {name}(lr = 0.1) {{\n    param W\n    W -= lr * grad(W)\n}}\n"


def load_error(path) -> str:
    with pytest.raises(NestError) as info:
        nestc.load(path)
    return str(info.value)


def test_std_import_binds_every_declaration():
    prog = nestc.loads('import "std/optim/adam.nest"\n' + SGD.format(name="Mine"), "m.nest")
    assert prog.names == ["Mine"]
    assert {"Adam", "AdamW", "Mine"} <= set(prog.unit.scope)
    assert prog.decl("AdamW").name == "AdamW"


def test_from_import_binds_only_the_names_given():
    prog = nestc.loads('from "std/optim/adam.nest" import Adam\n', "m.nest")
    assert "Adam" in prog.unit.scope and "AdamW" not in prog.unit.scope


def test_aliased_import_is_used_with_its_prefix():
    text = spec("""
        import "std/optim/adam.nest" as A
        optimizer Outer(lr = 0.1) {
            param W
            memory m = zeros_like(W) every step { objective l2(m, grad(W)); rule A.Adam(lr = 0.1) }
            W -= lr * m
        }
    """)
    prog = nestc.loads(text, "m.nest")
    assert "A.Adam" in prog.unit.scope and "Adam" not in prog.unit.scope
    with pytest.raises(NestError) as info:
        nestc.loads(text.replace("A.Adam(", "A.Adamm("), "m.nest")
    assert str(info.value) == spec("""
        m.nest:4:74: error: the file imported as `A` declares no `Adamm`
           4 |     memory m = zeros_like(W) every step { objective l2(m, grad(W)); rule A.Adamm(lr = 0.1) }
             |                                                                          ^~~~~~~
          hint: did you mean `A.Adam` or `A.AdamW`?
    """).rstrip("\n")


def test_relative_import_is_found_beside_the_importing_file(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "base.nest").write_text(SGD.format(name="Base"))
    (tmp_path / "lib" / "top.nest").write_text('import "base.nest"\n' + SGD.format(name="Top"))
    monkeypatch.chdir("/")  # the working directory plays no part
    prog = nestc.load(tmp_path / "lib" / "top.nest")
    assert prog.names == ["Top"] and "Base" in prog.unit.scope


def test_relative_import_up_a_directory(tmp_path, monkeypatch):
    (tmp_path / "base.nest").write_text(SGD.format(name="Base"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.nest").write_text('import "../base.nest"\n')
    monkeypatch.chdir(tmp_path)
    assert "Base" in nestc.load("sub/top.nest").unit.scope


def test_missing_relative_import_says_where_it_looked(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.nest").write_text('import "nothere.nest"\n')
    monkeypatch.chdir(tmp_path)
    assert load_error("sub/top.nest") == spec("""
        sub/top.nest:1:8: error: no such file: `nothere.nest`
           1 | import "nothere.nest"
             |        ^~~~~~~~~~~~~~
          hint: imports are relative to the importing file: looked for `sub/nothere.nest`
    """).rstrip("\n")


def test_cycle_between_two_files(tmp_path, monkeypatch):
    (tmp_path / "a.nest").write_text('import "b.nest"\n' + SGD.format(name="A"))
    (tmp_path / "b.nest").write_text('import "a.nest"\n' + SGD.format(name="B"))
    monkeypatch.chdir(tmp_path)
    assert load_error("a.nest") == spec("""
        b.nest:1:8: error: import cycle: a.nest -> b.nest -> a.nest
           1 | import "a.nest"
             |        ^~~~~~~~
          hint: move the shared declarations into a third file both import
    """).rstrip("\n")


def test_file_that_imports_itself(tmp_path, monkeypatch):
    (tmp_path / "self.nest").write_text('import "self.nest"\n')
    monkeypatch.chdir(tmp_path)
    assert load_error("self.nest").startswith(
        "self.nest:1:8: error: import cycle: self.nest -> self.nest\n")


def test_diamond_imports_load_each_file_once_and_bind_only_direct_names(tmp_path):
    (tmp_path / "base.nest").write_text(SGD.format(name="Base"))
    (tmp_path / "left.nest").write_text('import "base.nest"\n' + SGD.format(name="Left"))
    (tmp_path / "right.nest").write_text('import "base.nest"\n' + SGD.format(name="Right"))
    (tmp_path / "top.nest").write_text('import "left.nest"\nimport "right.nest"\n')
    prog = nestc.load(tmp_path / "top.nest")
    assert len(prog.loader.units) == 4
    assert {"Left", "Right"} <= set(prog.unit.scope) and "Base" not in prog.unit.scope


def test_same_name_from_two_files(tmp_path):
    (tmp_path / "one.nest").write_text(SGD.format(name="Opt"))
    (tmp_path / "two.nest").write_text(SGD.format(name="Opt"))
    (tmp_path / "top.nest").write_text('import "one.nest"\nimport "two.nest"\n')
    with pytest.raises(NestError) as info:
        nestc.load(tmp_path / "top.nest")
    assert info.value.message.startswith("`Opt` is imported twice, from ")
    assert info.value.hint == "import one of them `as` a name"


def test_own_declaration_shadows_an_import():
    prog = nestc.loads('import "std/optim/adam.nest"\n' + SGD.format(name="Adam"), "m.nest")
    assert prog.decl("Adam").decl.span.file == "m.nest"


def test_std_path_cannot_leave_the_stdlib():
    assert load_error("std/../pyproject.nest") == (
        "std/../pyproject.nest: error: `std/../pyproject.nest` leaves the standard library\n"
        "  hint: std/ paths name files inside the stdlib, such as std/optim/adam.nest")
    for path in ("std/../../etc/x.nest", "std//etc/x.nest", "std/optim/../../x.nest"):
        with pytest.raises(NestError, match="leaves the standard library"):
            nestc.loads(f'import "{path}"\n', "m.nest")


def test_load_of_a_missing_file_or_a_directory(tmp_path):
    assert load_error(tmp_path / "gone.nest") == (
        f"{tmp_path}/gone.nest: error: no such file: `{tmp_path}/gone.nest`")
    assert load_error(tmp_path).startswith(f"{tmp_path}: error: `{tmp_path}` is a directory")
    with pytest.raises(NestError, match="no such file"):
        nestc.load("std/optim/nothere.nest")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_endless_file_is_cut_at_the_size_limit():
    assert load_error("/dev/zero") == ("/dev/zero: error: `/dev/zero` is larger than 1024 KiB\n"
                                       "  hint: a spec is a short text file")


def test_import_of_something_not_a_spec():
    with pytest.raises(NestError, match="is not a .nest file"):
        nestc.loads('import "std/optim/adam.txt"\n', "m.nest")


def test_file_that_is_not_utf8(tmp_path):
    (tmp_path / "bad.nest").write_bytes(b"block B() {\n  # caf\xc3\xa9\xff\n}\n")
    assert load_error(tmp_path / "bad.nest") == spec(f"""
        {tmp_path}/bad.nest:2:9: error: the file is not UTF-8 text (byte 0xff)
           2 |   # café
             |         ^
          hint: save the spec as UTF-8
    """).rstrip("\n")


def test_error_in_an_imported_file_points_into_that_file(tmp_path):
    (tmp_path / "broken.nest").write_text("optimizer Broken(lr = 0.1) {\n    param W\n")
    (tmp_path / "top.nest").write_text('import "broken.nest"\n')
    with pytest.raises(NestError) as info:
        nestc.load(tmp_path / "top.nest")
    assert info.value.span.file == f"{tmp_path}/broken.nest"
    assert (info.value.span.line, info.value.kind) == (2, "syntax")


def test_unknown_declaration_in_program():
    prog = nestc.load("std/optim/adam.nest")
    with pytest.raises(NestError) as info:
        prog.decl("Adamm")
    assert info.value.message == "`std/optim/adam.nest` declares no `Adamm`"
    assert info.value.hint == "did you mean `Adam` or `AdamW`?"


def test_a_block_imported_as_an_alias_is_built_by_its_qualified_name():
    """`t.MLP(dim)(x)` checked, then `build` and `nestc compile` refused it ("calling this
    expression is not supported"); it builds the module that `MLP(dim)(x)` builds."""
    torch = pytest.importorskip("torch")
    body = "block B(dim = 8) {{\n    input x : [T, dim]\n    output x + {}(dim)(x)\n}}\n"
    aliased = nestc.loads('import "std/models/transformer.nest" as t\n' + body.format("t.MLP"),
                          "a.nest")
    plain = nestc.loads('from "std/models/transformer.nest" import MLP\n' + body.format("MLP"),
                        "p.nest")
    x = torch.randn(2, 5, 8)
    outs = []
    for prog in (aliased, plain):
        torch.manual_seed(0)
        outs.append(prog.build("B")(x))
    assert torch.equal(outs[0], outs[1])
    assert "class MLP(" in aliased.source("B")
