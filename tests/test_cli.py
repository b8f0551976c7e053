"""The nestc command: exit codes, errors on stderr without a traceback, JSON diagnostics, --help
for every subcommand, and a front end that never imports torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, spec

from nestc import cli

GOOD = "optimizer SGD(lr = 0.1) {\n    param W\n    W -= lr * grad(W)\n}\n"
BAD = "optimizer SGD(lr = 0.1) {\n    param W\n    W -= lr * grd(W)\n}\n"
BAD_TEXT = spec("""
    bad.nest:3:15: error: unknown name `grd`
       3 |     W -= lr * grd(W)
         |               ^~~
      hint: did you mean `grad` or `gd`?
""")
NESTC = Path(sys.executable).parent / "nestc"


@pytest.fixture
def files(tmp_path, monkeypatch):
    """good.nest and bad.nest in the working directory."""
    (tmp_path / "good.nest").write_text(GOOD)
    (tmp_path / "bad.nest").write_text(BAD)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_a_good_file(files, capsys):
    rc, out, err = run(capsys, "check", "good.nest")
    assert (rc, err) == (0, "")
    assert out.startswith("checked 1 file: 1 ok, 0 with errors (") and out.endswith(" ms)\n")


def test_check_a_bad_file(files, capsys):
    rc, out, err = run(capsys, "check", "bad.nest")
    assert (rc, err) == (1, BAD_TEXT)
    assert out.startswith("checked 1 file: 0 ok, 1 with errors")


def test_check_several_files(files, capsys):
    rc, out, err = run(capsys, "check", "good.nest", "bad.nest", "good.nest")
    assert rc == 1 and err == BAD_TEXT
    assert out.startswith("checked 3 files: 2 ok, 1 with errors")


def test_quiet_prints_only_errors(files, capsys):
    assert run(capsys, "check", "-q", "good.nest") == (0, "", "")
    assert run(capsys, "check", "-q", "bad.nest") == (1, "", BAD_TEXT)


def test_json_diagnostics(files, capsys):
    rc, out, err = run(capsys, "check", "--format", "json", "good.nest", "bad.nest", "gone.nest")
    assert (rc, err) == (1, "")
    report = json.loads(out)
    assert report["errors"] == 2
    good, bad, gone = report["files"]
    assert (good["file"], good["ok"], good["declarations"], good["diagnostics"]) == (
        "good.nest", True, ["SGD"], [])
    assert bad["ok"] is False and bad["diagnostics"] == [{
        "kind": "name", "message": "unknown name `grd`", "hint": "did you mean `grad` or `gd`?",
        "file": "bad.nest", "line": 3, "col": 15, "end_line": 3, "end_col": 18}]
    (missing,) = gone["diagnostics"]
    assert (missing["file"], missing["line"], missing["message"]) == (
        "gone.nest", None, "no such file: `gone.nest`")


def test_a_file_too_deep_for_nestc_is_one_files_diagnostic(files, capsys):
    """Blocks calling one another 300 deep ran out of Python's recursion: `check` printed no
    JSON, named no place, and checked no file after it."""
    body = "".join(f"block B{i}(dim = 8) {{\n    input x : [T, dim]\n    output B{i + 1}(dim)(x)"
                   f"\n}}\n" for i in range(300))
    (files / "deep.nest").write_text(body + "block B300(dim = 8) {\n    input x : [T, dim]\n"
                                     "    output x\n}\n")
    rc, out, err = run(capsys, "check", "--format", "json", "deep.nest", "good.nest")
    assert (rc, err) == (1, "")
    deep, good = json.loads(out)["files"]
    assert good["ok"] and not deep["ok"]
    (d,) = deep["diagnostics"]
    assert (d["file"], d["line"], d["col"]) == ("deep.nest", 1, 7)
    assert d["message"].startswith("the declarations call one another too deeply")


def test_check_a_missing_file(files, capsys):
    rc, out, err = run(capsys, "check", "-q", "gone.nest")
    assert (rc, out, err) == (1, "", "gone.nest: error: no such file: `gone.nest`\n")


def test_check_a_directory(files, capsys):
    (files / "specs").mkdir()
    rc, out, err = run(capsys, "check", "-q", "specs")
    assert (rc, out) == (1, "")
    assert err == ("specs: error: `specs` is a directory, not a .nest file\n"
                   "  hint: name the files in it: specs/*.nest\n")


def test_check_stdlib_by_std_path(capsys):
    assert run(capsys, "check", "-q", "std/optim/adam.nest", "std/optim/sgd.nest") == (0, "", "")


def test_invalid_utf8_is_an_error_not_a_crash(files, capsys):
    (files / "junk.nest").write_bytes(b"\x00\xff\xfe junk")
    rc, _, err = run(capsys, "check", "-q", "junk.nest")
    assert rc == 1 and err.startswith("junk.nest:1:2: error: the file is not UTF-8 text (byte 0xff)")


def subcommands() -> list[str]:
    actions = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


@pytest.mark.parametrize("command", subcommands())
def test_help_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: nestc {command} ")


def test_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and "check" in capsys.readouterr().out
    assert run(capsys, "--version") == (0, "nestc 0.1.0\n", "")
    rc, out, _ = run(capsys)
    assert rc == 0 and out.startswith("usage: nestc")


def test_a_declaration_must_be_named_when_a_file_has_several(capsys):
    rc, out, err = run(capsys, "explain", "std/optim/adam.nest")
    assert (rc, out) == (1, "")
    assert err == ("std/optim/adam.nest: error: `std/optim/adam.nest` declares Adam, AdamW: "
                   "name one with --name\n")


@pytest.mark.parametrize("pair, message", [
    ("lr=1/0", "error: --set lr=1/0: division by zero"),
    ("lr=", "error: --set lr=: unexpected `)`, expected an expression"),
    ("lr=) { } block C(y = 1", "error: --set lr=) { } block C(y = 1: unexpected `)`, expected an expression"),
    ("lr=nothere", "error: --set lr: `nothere` is not a constant"),
    ("lr", "error: --set takes NAME=VALUE, got `lr`"),
])
def test_bad_overrides_on_the_command_line(pair, message, capsys):
    rc, out, err = run(capsys, "explain", "std/optim/sgd.nest", "--set", pair)
    assert (rc, out) == (1, "")
    assert err.split("\n")[0] == message


def test_internal_errors_print_no_traceback(files, capsys, monkeypatch):
    def boom(path):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_load", boom)
    rc, _, err = run(capsys, "check", "good.nest")
    assert rc == 2 and "Traceback" not in err
    assert err == ("nestc: internal error: RuntimeError: boom\n"
                   "  this is a bug in nestc; rerun with NESTC_DEBUG=1 for the traceback\n")
    monkeypatch.setattr(cli, "DEBUG", True)
    with pytest.raises(RuntimeError):
        cli.main(["check", "good.nest"])


# --- the installed command, in a fresh process ---------------------------------------------------


def test_console_script(files):
    good = subprocess.run([NESTC, "check", "good.nest"], capture_output=True, text=True)
    bad = subprocess.run([NESTC, "check", "good.nest", "bad.nest"], capture_output=True, text=True)
    assert (good.returncode, good.stderr) == (0, "")
    assert (bad.returncode, bad.stderr) == (1, BAD_TEXT)
    assert "Traceback" not in bad.stdout + bad.stderr


def test_front_end_never_imports_torch():
    files = [str(p) for p in sorted(ROOT.glob("stdlib/**/*.nest"))]
    code = (
        "import sys, nestc\n"
        "from nestc.cli import main\n"
        "prog = nestc.load('std/optim/adam.nest')\n"
        "prog.decl('Adam').bind({'lr': 0.1})\n"
        f"rc = main(['check', '-q', *{files!r}])\n"
        "assert 'torch' not in sys.modules, 'the front end imported torch'\n"
        "nestc.load('std/models/hope.nest').source('HopeLM')\n"
        "assert 'torch' not in sys.modules, 'generating a model imported torch'\n"
        "main(['explain', 'std/models/hope.nest', '--name', 'HopeLM'])\n"
        "assert 'torch' not in sys.modules, 'explaining a model imported torch'\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_check_of_the_optimizer_stdlib_is_quick(capsys, record_property):
    """Measured, printed, not asserted: timing belongs in benchmarks (target: under 0.5 s)."""
    files = [str(p) for p in sorted(ROOT.glob("stdlib/optim/*.nest"))]
    start = time.perf_counter()
    done = subprocess.run([NESTC, "check", "-q", *files], capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    record_property("nestc_check_optim_wall_s", round(wall, 3))
    with capsys.disabled():
        print(f"\nnestc check stdlib/optim/*.nest: {wall:.3f} s wall (target < 0.5 s)")


def test_closed_pipe_is_not_an_error():
    """`nestc viz ... | head -1` must not print an internal error (the HTML is over 64 KiB,
    more than a pipe holds, so the write after head exits fails)."""
    out = subprocess.run(f"{sys.executable} -m nestc.cli viz std/models/hope.nest "
                         "--name HopeLM --format html --detail full | head -1", shell=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("<!DOCTYPE html>")
    assert "internal error" not in out.stderr and "Traceback" not in out.stderr


# --- from a bug hunt: user errors that exited 2 ("a bug in nestc") or hung ------------------


def test_file_errors_and_deep_calls_exit_1_with_a_message(files, capsys):
    (files / "d.svg").mkdir()
    (files / "afile").write_text("")
    for argv, word in ((["viz", "good.nest", "-o", "d.svg"], "Is a directory"),
                       (["compile", "good.nest", "-o", "afile/x.py"], "Not a directory")):
        rc, out, err = run(capsys, *argv)
        assert rc == 1 and err.startswith("error: ") and word in err and "Traceback" not in err
    blocks = [f"block B{i}(dim = 4) {{\n    input x : [T, dim]\n    output B{i + 1}(dim)(x)\n}}"
              for i in range(150)] + ["block B150(dim = 4) {\n    input x : [T, dim]\n"
                                      "    output x\n}"]
    (files / "deep.nest").write_text("\n".join(blocks) + "\n")
    rc, out, err = run(capsys, "explain", "deep.nest", "-n", "B0")
    assert rc == 1 and "too deeply" in err


@pytest.mark.parametrize(("text", "argv", "message"), [
    ("block B(dim = 4, period = 4) {\n    input x : [T, dim]\n"
     "    memory M : matrix(dim, dim) = zeros every period tokens {\n"
     "        key x; value x; objective l2(M(x), x); rule gd(lr = 0.1)\n    }\n"
     "    output M(x)\n}\n", ["--set", "period=0"],
     "p.nest:3:47: error: the update period must be a positive whole number, got 0"),
    ("block B(dim = 4, period = 4) {\n    input x : [T, dim]\n"
     "    memory M : matrix(dim, dim) = zeros every period tokens {\n"
     "        key x; value x; objective l2(M(x), x); rule gd(lr = 0.1)\n    }\n"
     "    output M(x)\n}\n", ["--set", "period=-2"], "positive whole number, got -2"),
    ("block B(dim = 4, n = 2) {\n    input x : [T, dim]\n    let h = x\n"
     "    repeat n { h = h + 1 }\n    output h\n}\n", ["--set", "n=1000000000"],
     "p.nest:4:12: error: `repeat` 1000000000 times is more than nestc builds"),
    ("block B(dim = 4, n = 2) {\n    input x : [T, dim]\n    let h = x\n"
     "    repeat n { repeat n { h = h + 1 } }\n    output h\n}\n", ["--set", "n=1024"],
     "p.nest:4:23: error: `repeat` 1024 times inside 1024 copies (1048576 in all) is more"),
])
def test_bound_periods_and_repeat_counts_are_checked(files, capsys, text, argv, message):
    """explain --set period=0 divided by zero (exit 2), -2 printed "every -2 tokens", a
    repeat of 1e9 hung; every binding now checks them, as the checker does the defaults."""
    (files / "p.nest").write_text(text)
    rc, out, err = run(capsys, "explain", "p.nest", *argv)
    assert rc == 1 and message in err and err.startswith("p.nest:"), err
    rc, out, err = run(capsys, "check", "p.nest")
    assert rc == 0


def test_a_huge_repeat_is_an_error_at_load_not_a_hang(files, capsys):
    (files / "r.nest").write_text("block B(dim = 4) {\n    input x : [T, dim]\n"
                                  "    repeat 100000000 { }\n    output x\n}\n")
    rc, out, err = run(capsys, "check", "r.nest")
    assert rc == 1 and "`repeat` 100000000 times is more than nestc builds" in err
    # repeats in repeats: each was at most 1024, a million copies in all hung explain
    (files / "r.nest").write_text("block B(dim = 4) {\n    input x : [T, dim]\n    let h = x\n"
                                  "    repeat 64 { repeat 32 { h = h + 1 } }\n    output h\n}\n")
    rc, out, err = run(capsys, "check", "r.nest")
    assert rc == 1 and "`repeat` 32 times inside 64 copies (2048 in all) is more" in err
    # and in a block called in a repeat, or in a chain (explain took 37 s for a million)
    inner = ("block Inner(dim = 4) {\n    input x : [T, dim]\n    let h = x\n"
             "    repeat 100 { h = h |> linear(dim) }\n    output h\n}\n")
    for outer in ("repeat 11 { h = Inner(dim)(h) }",
                  "chain c in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] { h = Inner(dim)(h) }"):
        (files / "r.nest").write_text(inner + "block B(dim = 4) {\n    input x : [T, dim]\n"
                                      f"    let h = x\n    {outer}\n    output h\n}}\n")
        rc, out, err = run(capsys, "explain", "r.nest", "-n", "B")
        assert rc == 1 and err.startswith("r.nest:4:12: error: `repeat` 100 times inside 11 "
                                          "copies (1100 in all) is more"), err


@pytest.mark.parametrize(("expr", "word"), [("grad(W) * \"s\"", "\"s\""),
                                            ("grad(W) + [2, 3]", "[2, 3]")])
def test_arithmetic_of_a_tensor_with_a_string_or_a_list_is_a_type_error(files, capsys, expr,
                                                                       word):
    (files / "o.nest").write_text(f"optimizer O(lr = 0.1) {{\n    param W\n"
                                  f"    W -= lr * ({expr})\n}}\n")
    rc, out, err = run(capsys, "check", "o.nest")
    assert rc == 1 and f"o.nest:3:16: error: `{expr.split()[1]}` needs numbers or tensors, " \
        f"got {word}" in err


@pytest.mark.parametrize("expr", ["exp(lr) * grad(W)", "log(lr) * grad(W)",
                                  "debias(grad(W), 1.0)", "exp(rows(W)) * grad(W)"])
def test_updates_the_kernel_matcher_cannot_lower_compile_to_generic_code(files, capsys, expr):
    """sympy forms without a kernel argument (exp of a hyperparameter, a zoo) made explain
    and compile exit 2; they are simply not a recognized kernel."""
    (files / "o.nest").write_text(f"optimizer O(lr: float = 0.5) {{\n    param W\n"
                                  f"    W -= {expr}\n}}\n")
    for argv in (["explain", "o.nest"], ["compile", "o.nest", "-o", "o.py"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 0, err
    rc, out, err = run(capsys, "explain", "o.nest")
    assert "kernel: none recognized" in out


def test_explain_counts_over_a_positive_number_of_tokens_or_steps(files, capsys):
    rc, out, err = run(capsys, "explain", "good.nest", "--tokens", "-100")
    assert rc == 1 and err == "error: --tokens counts updates over a positive number, got -100\n"


def test_chunks_that_do_not_line_up_with_a_bound_period_are_an_error(files, capsys):
    """The checker saw it for the defaults only; `--set` of the chunk went through."""
    (files / "c.nest").write_text(
        "block B(dim = 4, c = 8) {\n    input x : [T, dim]\n"
        "    memory M : matrix(dim, dim) = zeros every 2 tokens in chunks of c {\n"
        "        key x; value x; objective l2(M(x), x); rule gd(lr = 0.1)\n    }\n"
        "    output M(x)\n}\n")
    rc, out, err = run(capsys, "explain", "c.nest", "--set", "c=5")
    assert rc == 1 and "chunks of 5 tokens never line up with an update every 2 tokens" in err


SHAPE_AT_DEFAULTS = ("block B(dim = 8, heads = 3) {\n    input x : [T, dim]\n"
                     "    output x |> l2norm(per = heads)\n}\n")


def test_check_and_viz_refuse_what_cannot_be_built(files, capsys):
    """`check` said ok, and viz drew, a block whose defaults do not build (l2norm per 3 slices
    of 8 features), and viz drew --set values explain and build refuse; a feature not built
    yet is still no error of check."""
    (files / "s.nest").write_text(SHAPE_AT_DEFAULTS)
    for argv in (["check", "s.nest"], ["viz", "s.nest", "-o", "s.svg"],
                 ["viz", "std/memory/deltanet.nest", "-n", "DeltaNet", "--set", "dim=10",
                  "--set", "heads=4", "-o", "d.svg"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 1 and "error: l2norm per " in err, (argv, err)
    assert not (files / "s.svg").exists() and not (files / "d.svg").exists()
    (files / "u.nest").write_text("block U(dim = 4) {\n    input x : [T, dim]\n"
                                  "    output x |> conv1d(causal = false)\n}\n")
    assert run(capsys, "check", "u.nest")[0] == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["-f", "svg", "-o", "x.png"], "error: -f svg but -o `x.png` says png"),
    (["-o", "picture"], "error: cannot tell the picture format of `picture`"),
    (["-o", "good.nest/x.svg"], "error: -o `good.nest/x.svg`: `good.nest` is a file, not a"),
])
def test_viz_output_paths_that_say_no_format_or_another(files, capsys, argv, message):
    """-f svg -o x.png wrote an SVG into x.png; `-o picture` said "unknown picture format ``";
    a folder that is a file said "File exists"."""
    rc, out, err = run(capsys, "viz", "good.nest", *argv)
    assert rc == 1 and err.startswith(message), err


def test_viz_takes_an_upper_case_suffix_and_writes_utf8_in_a_c_locale(files, capsys):
    assert run(capsys, "viz", "good.nest", "-o", "x.SVG")[0] == 0
    assert (files / "x.SVG").read_text(encoding="utf-8").startswith("<?xml")
    env = {"PATH": "/usr/bin:/bin", "PYTHONUTF8": "0", "LC_ALL": "C",
           "PYTHONPATH": str(ROOT)}
    for argv in (["-o", "c.svg"], ["-f", "mermaid"]):  # (a UnicodeEncodeError, exit 2)
        done = subprocess.run([sys.executable, "-m", "nestc.cli", "viz", "std/optim/adam.nest",
                               "-n", "Adam", *argv], capture_output=True, env=env,
                              cwd=files, timeout=120)
        assert done.returncode == 0, done.stderr
    assert "·" in (files / "c.svg").read_text(encoding="utf-8")
