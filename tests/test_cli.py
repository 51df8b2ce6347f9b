"""ldm.cli and every command line built on it: help with defaults and examples, one-line errors,
numbers checked when parsed, --threads, progress on a terminal and in a log."""
from __future__ import annotations

import argparse
import ast
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm import cli

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# The helpers
# ---------------------------------------------------------------------------------------

def _demo_parser():
    p = cli.parser("python -m demo", "Do one thing well.\n\nExamples:\n    python -m demo --steps 3\n")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="sampler steps")
    p.add_argument("--scale", type=cli.finite, default=None, help="a scale")
    p.add_argument("--fast", action="store_true", help="go fast")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="no TF32")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--edges", type=int, nargs="*", default=[1280, 720], help="long and short edge")
    p.add_argument("--extra", nargs="*", default=[], help="extras")
    return p


def test_help_shows_meaningful_defaults_and_the_examples():
    text = _demo_parser().format_help()
    assert text.startswith("usage: python -m demo")
    assert "sampler steps (default: 20)" in text
    assert "long and short edge (default: 1280 720)" in text
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert "(default: [])" not in text
    assert "(default: cuda when available) (default" not in text
    assert "Do one thing well." in text and "    python -m demo --steps 3" in text  # the epilog keeps its layout
    assert "--threads N" in text and "--debug" in text


@pytest.mark.parametrize("kind, text, ok", [
    (cli.positive_int, "3", 3), (cli.positive_int, "0", None), (cli.positive_int, "-3", None),
    (cli.positive_int, "2.5", None), (cli.non_negative_int, "0", 0), (cli.non_negative_int, "-1", None),
    (cli.finite, "-2.5", -2.5), (cli.finite, "nan", None), (cli.finite, "inf", None), (cli.finite, "x", None),
    (cli.positive, "1e-5", 1e-5), (cli.positive, "0", None), (cli.non_negative, "0", 0.0),
    (cli.fraction, "1", 1.0), (cli.fraction, "1.01", None), (cli.fraction, "-0.1", None),
])
def test_number_types(kind, text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    else:
        assert kind(text) == ok


def test_threads_are_set_when_parsed():
    n = torch.get_num_threads()
    try:
        assert _demo_parser().parse_args(["--threads", "1"]).threads == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    assert _demo_parser().parse_args([]).threads is None  # torch's own default is left alone


def test_run_cli_one_line_errors_and_debug(capsys):
    def main(argv):
        raise FileNotFoundError(f"no such file: {argv[0]}")

    assert cli.run_cli(main, ["x.png"]) == 1
    err = capsys.readouterr().err
    assert err == "error: no such file: x.png\n"
    assert cli.run_cli(main, ["x.png", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.run_cli(lambda argv: (_ for _ in ()).throw(KeyError("unknown class 'x'")), []) == 1
    assert capsys.readouterr().err == "error: unknown class 'x'\n"
    assert cli.run_cli(lambda argv: (_ for _ in ()).throw(SystemExit("error: refused")), []) == 1
    assert capsys.readouterr().err == "error: refused\n"
    assert cli.run_cli(lambda argv: 3, []) == 3 and cli.run_cli(lambda argv: None, []) == 0
    with pytest.raises(TypeError):  # a bug keeps its traceback
        cli.run_cli(lambda argv: (_ for _ in ()).throw(TypeError("bug")), [])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_lines_in_a_log(monkeypatch):
    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr(cli.time, "perf_counter", lambda: float(next(clock)))
    term = _Terminal()
    p = cli.Progress(4, "gen", "steps", stream=term)
    for _ in range(4):
        p.update(1, "sample 1/1")
    out = term.getvalue()
    assert out.count("\r") == 4 and out.endswith("\n") and out.count("\n") == 1
    assert "4/4 steps (100%)" in out and "sample 1/1" in out and "ETA" in out

    log = io.StringIO()
    p = cli.Progress(10, "eval", "images", stream=log, interval=3)
    for _ in range(10):
        p.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 2 <= len(lines) <= 5
    assert lines[-1].startswith("eval: 10/10 images (100%)")
    silent = io.StringIO()
    p = cli.Progress(3, stream=silent, lines=False)
    for _ in range(3):
        p.update(flush=True)
    assert silent.getvalue() == "" and p.n == 3 and "3/3" in p.summary()


def test_progress_eta_counts_this_runs_units_only(monkeypatch):
    t = [0.0]
    monkeypatch.setattr(cli.time, "perf_counter", lambda: t[0])
    p = cli.Progress(100, initial=50, stream=io.StringIO(), lines=False)
    t[0] = 10.0
    p.update(10)
    assert p.eta() == pytest.approx(40.0)  # 1 s per unit over the 40 left


# ---------------------------------------------------------------------------------------
# Every command line
# ---------------------------------------------------------------------------------------

CLIS = ["mrlf.generate", "mrlf.jobs", "ldm.checkpoint", "controlnet.checkpoint", "segmentation.labels",
        "segmentation.rcs", "segmentation.evaluate", "segmentation.adherence", "segmentation.synthetic",
        "segmentation.world", "mrlf.didex", "train.finetune_unet", "train.train_controlnet", "train.train_segmentation",
        "train.train_uda", "train.train_vae", "train.train_classifier", "train.train_text_encoder", "train.mini_world",
        "train.reproduce"]
BENCH = sorted(p.stem for p in (ROOT / "bench").glob("*.py"))
PACKAGES = ("ldm", "controlnet", "samplers", "mrlf", "segmentation", "train")


def _main_block(path: Path) -> ast.If | None:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return node
    return None


def test_every_command_line_runs_under_run_cli():
    """Every module with a __main__ block (product packages and bench/) is listed here and exits
    through ldm.cli.run_cli (one-line errors, --debug), directly or through its console-script function."""
    found = sorted(str(p.relative_to(ROOT).with_suffix("")).replace("/", ".")
                   for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if _main_block(p) is not None)
    assert found == sorted(CLIS)
    for path in [ROOT / (m.replace(".", "/") + ".py") for m in CLIS] + [ROOT / "bench" / f"{b}.py" for b in BENCH]:
        block = ast.unparse(_main_block(path))
        if "command()" in block:  # the console script's function
            block = ast.unparse(next(n for n in ast.parse(path.read_text()).body
                                     if isinstance(n, ast.FunctionDef) and n.name == "command"))
        assert "run_cli(" in block, path


def _parsers(module: str):
    mod = __import__(module, fromlist=["get_parser"])
    root = mod.get_parser()
    yield root
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.values()


def _bench_parser(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    sys.path.insert(0, str(ROOT / "tests"))  # bench/models.py borrows a test helper
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "tests"))
    captured = {}

    def parse_args(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    import unittest.mock

    with unittest.mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        try:
            mod.main([])
        except SystemExit:
            pass
    return captured["parser"]


@pytest.mark.parametrize("module", CLIS + [f"bench/{b}" for b in BENCH])
def test_help_shows_the_command_defaults_and_examples_and_every_option_has_help(module):
    parsers = [_bench_parser(module[6:])] if module.startswith("bench/") else list(_parsers(module))
    command = f"python {module}.py" if module.startswith("bench/") else f"python -m {module}"
    assert parsers[0].prog == command
    for p in parsers:
        text = " ".join(p.format_help().split())  # lines re-joined: a wrapped "(default: None)" counts too
        assert text.startswith(f"usage: {command}")
        for bad in ("(default: None)", "(default: True)", "(default: False)", "(default: [])", "(default: )"):
            assert bad not in text, (p.prog, bad)
        assert not re.search(r"\(default[^)]*\) \(default", text), p.prog  # said twice
        for action in p._actions:
            if action.dest != "help" and not isinstance(action, argparse._SubParsersAction):
                assert action.help, (p.prog, action.option_strings or action.dest)
                meaningful = action.default not in (None, "", [], argparse.SUPPRESS) and not isinstance(action.default,
                                                                                                       bool)
                if meaningful and action.option_strings:
                    assert "default" in p._get_formatter()._get_help_string(action), (p.prog, action.option_strings)
        if "--threads" not in [o for a in p._actions for o in a.option_strings]:
            assert any(isinstance(a, argparse._SubParsersAction) for a in p._actions), p.prog
    assert parsers[0].description.rstrip()[-1] in ".)", parsers[0].description  # not cut mid-sentence
    assert command in (parsers[0].epilog or ""), "an example in the epilog"
    if module == "mrlf.generate":
        text = " ".join(parsers[0].format_help().split())
        assert "classifier-free guidance scale (default: the bundle's, else 7.5)" in text and "(default: outputs/dginstyle_demo)" in text


@pytest.mark.parametrize("module, argv", [
    ("mrlf.generate", ["--label-maps", "{tmp}/nope.png", "--out", "{tmp}/out"]),
    ("mrlf.jobs", ["{tmp}/nope", "-n", "2", "-o", "{tmp}/gen.json"]),
    ("ldm.checkpoint", ["inspect", "{tmp}/nope.safetensors"]),
    ("controlnet.checkpoint", ["inspect", "{tmp}/nope.safetensors"]),
    ("segmentation.labels", ["check", "{tmp}/nope"]),
    ("segmentation.rcs", ["stats", "{tmp}/nope"]),
    ("segmentation.evaluate", ["--checkpoint", "{tmp}/nope.safetensors", "--dataset", "folder:{tmp}/nope"]),
    ("segmentation.adherence", ["--checkpoint", "{tmp}/nope.safetensors", "--generated", "{tmp}/nope"]),
    ("segmentation.synthetic", ["--out", "{tmp}/a_file", "--n", "1"]),
    ("segmentation.world", ["--out", "{tmp}/a_file", "--source", "1", "--prior", "1", "--eval", "1"]),
    ("train.reproduce", ["--out", "{tmp}/out", "--bundle", "{tmp}/nope"]),
])
def test_errors_are_one_line_and_debug_shows_the_traceback(module, argv, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    argv = [a.format(tmp=tmp_path) for a in argv]
    main = __import__(module, fromlist=["main"]).main
    assert cli.run_cli(main, argv) == 1
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert "Traceback" not in out.err + out.out
    assert cli.run_cli(main, argv + ["--debug"] if module not in ("ldm.checkpoint", "controlnet.checkpoint",
                                                                   "segmentation.labels", "segmentation.rcs")
                       else argv[:1] + ["--debug"] + argv[1:]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["finetune_unet", "train_controlnet", "train_segmentation"])
def test_training_errors_are_one_line(script, tmp_path):
    data = ["--source", f"folder:{tmp_path}/nope"] if script == "train_segmentation" else ["--data", f"{tmp_path}/nope"]
    proc = subprocess.run([sys.executable, "-m", f"train.{script}", "--tiny", "--device", "cpu", "--output-dir",
                           str(tmp_path / "out"), *data], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "nope" in proc.stderr, proc.stderr
