"""The one switch for the accelerated paths: attention backend, fused kernels, Triton.

Every layer reads its choice here. The plain PyTorch path (``attention=math``, no fusion) is the
specification the others are tested against. Three fields:

    attention = auto | math | sdpa | triton   ldm.attention: fp32 PyTorch, F.scaled_dot_product_attention
                                              or our Triton kernel; auto (default) is sdpa, the fastest
                                              measured at SD-1.5's shapes (BENCHMARKS.md)
    fused     = none | all | groupnorm+geglu  the Triton GroupNorm(+SiLU) and GEGLU kernels in the layers,
                                              taken for CUDA tensors only (elsewhere PyTorch runs);
                                              default none: launched eagerly they lost at most SD shapes
    triton    = on | off                      off: no Triton kernel runs. A setting that names one
                                              (attention=triton, any fusion) is refused with triton=off,
                                              and a direct call of an ``ldm.kernels`` function raises

For the process, from the environment (fields in any order; omitted fields keep their defaults):

    LDM_OPS="attention=triton,fused=groupnorm+geglu"  python -m mrlf.generate ...

For a block of code: ``with ops.use(attention="math", fused=(), triton=False): ...``. The former
variables LDM_ATTENTION, LDM_FUSED and LDM_TRITON are refused at import, pointing here.
``state()`` is the current setting, a hashable tuple: CUDA graphs (``ldm.graphs``) are keyed by it,
since a captured graph replays the kernels chosen when it was captured. ``str(state())`` is its
LDM_OPS spelling.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import NamedTuple

ATTENTION = ("auto", "math", "sdpa", "triton")
FUSIONS = ("groupnorm", "geglu")


class State(NamedTuple):
    attention: str = "auto"
    fused: frozenset = frozenset()
    triton: bool = True

    def __str__(self) -> str:
        fused = "+".join(f for f in FUSIONS if f in self.fused) or "none"
        return f"attention={self.attention},fused={fused},triton={'on' if self.triton else 'off'}"


def _fusions(value) -> frozenset:
    """"all", "none", "groupnorm+geglu" or a collection of names -> the set of fusion names."""
    names = value.split("+") if isinstance(value, str) else list(value)
    names = {n.strip() for n in names} - {"", "none"}
    if "all" in names:
        names = (names - {"all"}) | set(FUSIONS)
    unknown = names - set(FUSIONS)
    if unknown:
        raise ValueError(f"fused kernels {sorted(unknown)} unknown; expected {' / '.join(FUSIONS)} (joined by '+'), "
                         "'all' or 'none'")
    return frozenset(names)


def _replace(base: State, **changes) -> State:
    unknown = set(changes) - set(State._fields)
    if unknown:
        raise TypeError(f"unknown ops fields {sorted(unknown)}; expected {', '.join(State._fields)}")
    if "fused" in changes:
        changes["fused"] = _fusions(changes["fused"])
    if "triton" in changes and not isinstance(changes["triton"], bool):
        raise TypeError(f"triton must be True or False, not {changes['triton']!r}")
    new = base._replace(**changes)
    if new.attention not in ATTENTION:
        raise ValueError(f"attention backend {new.attention!r} unknown; expected one of {', '.join(ATTENTION)}")
    needs = (["attention=triton"] if new.attention == "triton" else []) + [f"fused={f}" for f in sorted(new.fused)]
    if not new.triton and needs:
        raise ValueError(f"triton=off rules out {', '.join(needs)} (Triton kernels)")
    return new


def parse(spec: str) -> State:
    """The state an LDM_OPS string describes, e.g. ``"attention=sdpa,fused=groupnorm+geglu,triton=on"``."""
    fields: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = (p.strip() for p in item.partition("="))
        if not sep or key not in State._fields:
            raise ValueError(f"LDM_OPS item {item!r}: expected NAME=VALUE with NAME one of {', '.join(State._fields)}")
        if key in fields:
            raise ValueError(f"LDM_OPS names {key} twice")
        fields[key] = value
    if "triton" in fields:
        if fields["triton"] not in ("on", "off"):
            raise ValueError(f"LDM_OPS triton={fields['triton']!r}; expected on or off")
        fields["triton"] = fields["triton"] == "on"
    return _replace(State(), **fields)


_RETIRED = [v for v in ("LDM_ATTENTION", "LDM_FUSED", "LDM_TRITON") if v in os.environ]
if _RETIRED:  # ignoring a switch the user set would make a measurement lie about its settings
    raise ValueError(f"{' and '.join(_RETIRED)}: no longer read; set LDM_OPS instead, e.g. "
                     "LDM_OPS=\"attention=sdpa,fused=groupnorm+geglu,triton=on\" (ldm/ops.py)")

_state = parse(os.environ.get("LDM_OPS", ""))


def state() -> State:
    return _state


def fused(name: str) -> bool:
    """Whether the layers should take the fused kernel `name` ("groupnorm", "geglu") where it applies."""
    return name in _state.fused


@contextmanager
def use(**changes):
    """Change some fields for the length of a block: ``with ops.use(attention="math"): ...``.

    ``fused`` takes a collection of names or an LDM_OPS value ("all", "none", "groupnorm+geglu").
    """
    global _state
    old, _state = _state, _replace(_state, **changes)
    try:
        yield _state
    finally:
        _state = old
