"""What every command line of the project shares: one help style, one way to fail, the thread
count, number checks and a progress display.

A CLI module builds its parser with `parser` and runs its ``main(argv)`` under `run_cli`::

    def get_parser():
        p = cli.parser("python -m package.module", __doc__)
        p.add_argument("--steps", type=cli.positive_int, default=20, help="sampler steps")
        return p

    def main(argv=None) -> int:
        args = get_parser().parse_args(argv)
        ...

    if __name__ == "__main__":
        sys.exit(cli.run_cli(main))

- Help: the docstring's first paragraph is the description and the rest (commands, examples) the
  epilog; a default is shown where it says something (never ``None``, nor a flag's False / True).
- Errors: a known error (bad input, a missing or unreadable file, a refused setting, ...) prints
  one line, ``error: ...``, on stderr and exits with status 1; ``--debug`` shows the traceback
  instead. Usage errors stay argparse's (status 2). ``main`` itself raises, so Python callers and
  tests see the exception.
- ``--threads N``: torch's CPU threads (default: torch's own choice, one per core). On a CPU that
  other busy processes share, one thread is often several times faster: the threads of a parallel
  region wait for each other, and one of them is always waiting for a core.
- `Progress`: a bar with ETA on a terminal, plain lines in a log.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from typing import Callable, Sequence, TextIO

import torch

# Errors a user can cause and fix: bad values, missing or unreadable files, refused settings, a
# model that does not fit, out of memory. They print one line; anything else is a bug and keeps its
# traceback.
KNOWN_ERRORS = (ValueError, OSError, KeyError, RuntimeError, MemoryError, ImportError)


# ---------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks and adds ``(default: X)`` to an option's
    help where the default means something: not None, not empty, not a flag's False (or
    a ``store_false`` flag's True), and not when the help text already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or default in ("", [])
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        # the shared options last, after the command's own
        self._action_groups.sort(key=lambda g: g.title == COMMON_GROUP)
        return super().format_help()


COMMON_GROUP = "command line"


def parser(prog: str, doc: str | None, *, common: bool = True, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser for ``prog`` (the command as typed: ``python -m train.finetune_unet``):
    `doc`'s first paragraph as the description, the rest as the epilog, `HelpFormatter`, and with
    `common` the ``--threads`` / ``--debug`` options (a CLI with sub-commands adds them to each
    sub-command instead: `add_subcommand`)."""
    head, _, rest = (doc or "").strip().partition("\n\n")
    p = _Parser(prog=prog, description=head, epilog=rest or None, formatter_class=HelpFormatter, **kwargs)
    if common:
        add_common_arguments(p)
    return p


def add_subcommand(subparsers, name: str, help: str, doc: str | None = None) -> argparse.ArgumentParser:
    """A sub-command parser in the same style, with ``--threads`` / ``--debug``."""
    p = subparsers.add_parser(name, help=help, description=doc or help, formatter_class=HelpFormatter)
    add_common_arguments(p)
    return p


class _Threads(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        set_threads(values)
        setattr(namespace, self.dest, values)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(COMMON_GROUP)
    g.add_argument("--threads", type=positive_int, action=_Threads, metavar="N",
                   help="CPU threads of torch (default: torch's choice, one per core); on a CPU shared with "
                        "other busy processes, 1 is often several times faster")
    g.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def set_threads(n: int) -> None:
    """torch's intra-op CPU threads (this process)."""
    torch.set_num_threads(int(n))


# ---------------------------------------------------------------------------------------
# Numbers: argparse types that refuse what the option cannot mean
# ---------------------------------------------------------------------------------------

def integer(min: int | None = None, max: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [min, max]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (min is not None and value < min) or (max is not None and value > max):
            raise argparse.ArgumentTypeError(f"must be {_bounds(min, max, False, False)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def real(min: float | None = None, max: float | None = None, *, open_min: bool = False,
         open_max: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [min, max] (``open_min`` / ``open_max``: exclusive)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (min is not None and (value < min or (open_min and value == min))) or \
                (max is not None and (value > max or (open_max and value == max))):
            raise argparse.ArgumentTypeError(f"must be {_bounds(min, max, open_min, open_max)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _bounds(lo, hi, open_lo: bool, open_hi: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
    if lo is not None:
        return f"{'>' if open_lo else '>='} {lo:g}"
    return f"{'<' if open_hi else '<='} {hi:g}"


positive_int = integer(1)
non_negative_int = integer(0)
finite = real()
positive = real(0, open_min=True)
non_negative = real(0)
fraction = real(0, 1)


# ---------------------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------------------

def error_message(e: BaseException) -> str:
    """The one line a known error prints (a KeyError's message without its quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    text = text or type(e).__name__
    return text if text.startswith("error: ") else f"error: {text}"


def fail(e: BaseException, debug: bool = False) -> int:
    """Report a known error on stderr (one line, or the traceback with `debug`); the exit status 1."""
    if debug:
        traceback.print_exception(e)
    else:
        print(error_message(e), file=sys.stderr)
    return 1


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """``main(argv)`` as a command: its return value (None: 0) is the exit status; a known error
    (`KNOWN_ERRORS`, or ``SystemExit("message")``) is one line on stderr and status 1, the traceback
    with ``--debug`` in `argv`; Ctrl-C is status 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, str):
            return fail(e, debug)
        raise
    except KNOWN_ERRORS as e:
        return fail(e, debug)
    return 0 if code is None else int(code)


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------

def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


_live: list["Progress"] = []  # the bar drawn on the terminal now, which a log line first erases


class Progress:
    """Progress of `total` units (images, steps, samples) with elapsed time and ETA.

    On a terminal (`stream` is a tty) a bar redrawn in place; elsewhere (a pipe, a log file) plain
    lines, at most one every `interval` seconds, one for each ``update(..., flush=True)`` and one at
    the end; ``lines=False`` prints nothing there (for loops that log their own lines). `initial`:
    units already done (a resumed run): the rate and ETA count this run's units only.
    """

    def __init__(self, total: int, desc: str = "", unit: str = "", *, initial: int = 0, stream: TextIO | None = None,
                 interval: float = 30.0, lines: bool = True, enabled: bool = True):
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.n = self.start = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval, self.note = interval, ""
        self.enabled = enabled and (self.tty or lines)
        self.t0 = self.last = time.perf_counter()
        self.ended = False  # the final state is shown

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> float | None:
        done = self.n - self.start
        if done <= 0:
            return None
        return self.elapsed / done * max(self.total - self.n, 0)

    def timing(self) -> str:
        """``0:12 elapsed, ETA 0:28``."""
        eta = self.eta()
        return f"{format_seconds(self.elapsed)} elapsed, ETA {'?' if eta is None else format_seconds(eta)}"

    def summary(self) -> str:
        """``12/40 steps (30%), 0:12 elapsed, ETA 0:28``."""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.n}/{self.total}{' ' + self.unit if self.unit else ''}{pct}, {self.timing()}"

    def update(self, n: int = 1, note: str | None = None, *, flush: bool = False) -> None:
        self.n += n
        if note is not None:
            self.note = note
        if not self.enabled or self.ended:
            return
        now = time.perf_counter()
        done = self.ended = self.n >= self.total
        if self.tty:
            if done or flush or now - self.last >= 0.1:
                self._draw(end="\n" if done else "")
        elif done or flush or now - self.last >= self.interval:
            head, tail = f"{self.desc}: " if self.desc else "", f"  {self.note}" if self.note else ""
            self._write(f"{head}{self.summary()}{tail}\n")

    def _draw(self, end: str) -> None:
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(24 * frac)
        text = f"{self.desc + ' ' if self.desc else ''}[{bar:<24}] {self.summary()}  {self.note}"
        self._write("\r" + text[:160] + "\033[K" + end)
        if end:
            if self in _live:
                _live.remove(self)
        elif self not in _live:
            _live.append(self)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
        self.last = time.perf_counter()

    def close(self) -> None:
        """End the bar's line (a bar left unfinished, e.g. by an error)."""
        if self in _live:
            _live.remove(self)
            self._write("\n")


def clear_live_bar() -> None:
    """Erase the bar on the terminal (it is redrawn at its next update), before a log line."""
    for p in _live:
        p.stream.write("\r\033[K")
        p.stream.flush()
