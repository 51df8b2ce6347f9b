"""ldm.ops, the one switch for the accelerated paths: its syntax, the context manager, Triton off,
and the attention dispatch that reads it."""
import os
import subprocess
import sys

import pytest
import torch

from ldm import kernels, ops
from ldm.attention import attention, math_attention


def test_parse_and_spelling():
    assert ops.parse("") == ops.State() == ("auto", frozenset(), True)
    s = ops.parse(" fused = geglu+groupnorm , attention=triton ")
    assert s == ops.State("triton", frozenset({"groupnorm", "geglu"}), True)
    assert str(s) == "attention=triton,fused=groupnorm+geglu,triton=on"
    assert ops.parse("fused=all") == ops.parse("fused=groupnorm+geglu") and ops.parse("fused=none") == ops.State()
    for state in (ops.State(), s, ops.parse("attention=math,triton=off"), ops.parse("fused=geglu")):
        assert ops.parse(str(state)) == state
        hash(state)  # graphs are keyed by it


@pytest.mark.parametrize("spec,match", [
    ("attention=flash", "backend 'flash' unknown"), ("fused=layernorm", "layernorm"), ("triton=0", "on or off"),
    ("speed=fast", "NAME=VALUE"), ("sdpa", "NAME=VALUE"), ("attention=math,attention=sdpa", "twice"),
])
def test_parse_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        ops.parse(spec)


def test_use_changes_the_named_fields_for_a_block():
    before = ops.state()
    with ops.use(attention="math") as s:
        assert ops.state() is s and s == before._replace(attention="math")
        with ops.use(fused=["geglu"]):
            assert ops.state() == s._replace(fused=frozenset({"geglu"})) and ops.fused("geglu")
        assert ops.state() == s
    assert ops.state() == before
    with pytest.raises(KeyError):
        with ops.use(attention="math"):
            raise KeyError
    assert ops.state() == before
    with pytest.raises(TypeError, match="backend"):
        ops.use(backend="math").__enter__()
    with pytest.raises(TypeError, match="True or False"):
        ops.use(triton="off").__enter__()
    assert ops.state() == before


def test_dispatch_follows_the_switch(monkeypatch):
    q, k, v = torch.randn(2, 3, 5, 40), torch.randn(2, 3, 7, 40), torch.randn(2, 3, 7, 40)
    with ops.use(attention="math"):
        assert torch.equal(attention(q, k, v), math_attention(q, k, v))
    for backend in ("sdpa", "auto"):
        with ops.use(attention=backend):
            assert torch.equal(attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    monkeypatch.setattr(kernels, "flash_attention", lambda q, k, v, causal: ("triton", causal))
    with ops.use(attention="triton", triton=True):
        assert attention(q, k, v, causal=True) == ("triton", True)


def test_triton_off_refuses_every_triton_path():
    """triton=off: settings that name a Triton kernel are refused when made, direct kernel calls raise,
    and the model paths (sdpa / math attention, PyTorch GroupNorm and GEGLU) still run."""
    with pytest.raises(ValueError, match="triton=off rules out attention=triton"):
        ops.parse("attention=triton,triton=off")
    with pytest.raises(ValueError, match="fused=geglu, fused=groupnorm"):
        ops.parse("triton=off,fused=all")
    with ops.use(attention="sdpa", fused=(), triton=False):
        for change in (dict(attention="triton"), dict(fused="groupnorm")):
            with pytest.raises(ValueError, match="triton=off"):
                ops.use(**change).__enter__()
        assert ops.state() == ops.parse("attention=sdpa,triton=off")
        x, h = torch.randn(1, 2, 4, 40), torch.randn(2, 8)
        calls = (lambda: kernels.flash_attention(x, x, x), lambda: kernels.group_norm(torch.randn(1, 4, 2, 2), 2),
                 lambda: kernels.geglu(h), lambda: kernels.geglu_linear(h, torch.randn(8, 8)))
        for call in calls:
            with pytest.raises(RuntimeError, match="triton=off"):
                call()
        torch.testing.assert_close(attention(x, x, x), math_attention(x, x, x))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LDM_OPS", "LDM_ATTENTION", "LDM_FUSED", "LDM_TRITON")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                          timeout=120)


def test_environment_variable_and_the_retired_ones():
    code = "from ldm import ops; print(ops.state())"
    r = _python(code, LDM_OPS="fused=geglu, attention=math")
    assert r.returncode == 0 and r.stdout.strip() == "attention=math,fused=geglu,triton=on", r.stderr
    r = _python(code, LDM_ATTENTION="math")  # a retired variable is an error, never silently ignored
    assert r.returncode != 0 and "LDM_ATTENTION" in r.stderr and "LDM_OPS" in r.stderr
