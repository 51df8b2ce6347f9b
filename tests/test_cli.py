"""ldm.cli and every command line built on it: help with defaults and examples, one-line errors,
numbers checked when parsed, --threads, progress on a terminal and in a log."""
from __future__ import annotations

import argparse
import ast
import io
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
