"""ldm.graphs.CUDAGraphed: the static-buffer bookkeeping on CPU (a replay double), real graphs on CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from controlnet import ControlNet
from ldm.graphs import CUDAGraphed
from ldm.sd import StableDiffusion
from mrlf.pipeline import Generator, MRLFSettings, SamplingSettings
from segmentation.synthetic import street_scene


class ReplayDouble(CUDAGraphed):
    """CUDAGraphed on CPU: "replay" re-runs fn on the static inputs and writes into the static outputs,
    which is what a graph does, so stale inputs or aliased outputs show up as wrong numbers."""

    captures = 0

    def applies(self, leaves):
        return self.failed is None and not torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) for v in leaves)

    def _capture(self, leaves, spec):
        type(self).captures += 1
        static_in, call_leaves = self._static_inputs(leaves)
        args, kwargs = tree_unflatten(call_leaves, spec)
        static_out, out_spec = tree_flatten(self.fn(*args, **kwargs))

        def replay():
            for s, new in zip(static_out, tree_flatten(self.fn(*args, **kwargs))[0]):
                s.copy_(new)

        return replay, static_in, static_out, out_spec


def model(x, t, context, hint=None, scale=1.0):
    out = x * t.float().reshape(-1, 1, 1, 1) / 1000 + context.mean()
    return out + scale * hint.mean() if hint is not None else out


@torch.no_grad()
def test_replays_with_fresh_inputs_and_unaliased_outputs():
    ReplayDouble.captures = 0
    g = ReplayDouble(model)
    outs, refs = [], []
    for i in range(4):
        x, ctx, hint = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16), torch.randn(2, 3, 64, 64)
        t = torch.tensor(999 - 250 * i)
        outs.append(g(x, t, context=ctx, hint=hint))
        refs.append(model(x, t, ctx, hint))
    assert ReplayDouble.captures == 1  # same signature: one capture, three replays
    for o, r in zip(outs, refs):  # earlier outputs were not overwritten by later replays
        torch.testing.assert_close(o, r, rtol=0, atol=0)


@torch.no_grad()
def test_signature_separates_shapes_dtypes_and_values():
    ReplayDouble.captures = 0
    g = ReplayDouble(model)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16), torch.tensor(10)
    g(x, t, ctx)
    g(x[:1], t, ctx[:1])  # batch 1
    g(x.double(), t, ctx.double())  # another dtype
    r = g(x, t, ctx, scale=2.0, hint=torch.ones(2, 3, 4, 4))  # another keyword set / value
    g(x, t, ctx)  # known again
    assert ReplayDouble.captures == 4
    torch.testing.assert_close(r, model(x, t, ctx, torch.ones(2, 3, 4, 4), 2.0), rtol=0, atol=0)


def test_eager_with_grad_and_after_a_failed_capture():
    ReplayDouble.captures = 0
    g = ReplayDouble(model)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    g(x, torch.tensor(5), torch.randn(1, 7, 16)).sum().backward()  # autograd on: never graphed
    assert ReplayDouble.captures == 0 and x.grad is not None

    class Failing(ReplayDouble):
        def _capture(self, leaves, spec):
            raise RuntimeError("operation not permitted when stream is capturing")

    f = Failing(model)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="running eagerly"):
            y = f(x, torch.tensor(5), torch.ones(1, 7, 16))
        torch.testing.assert_close(y, model(x, torch.tensor(5), torch.ones(1, 7, 16)))
        assert f.failed and "not permitted" in f.failed
        f(x, torch.tensor(5), torch.ones(1, 7, 16))  # no second warning, still eager


def test_cpu_tensors_run_eagerly():
    g = CUDAGraphed(model)
    with torch.no_grad():
        y = g(torch.ones(1, 4, 8, 8), torch.tensor(1), torch.ones(1, 7, 16))
    assert not g.entries and y.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphed(model, warmup=0)


def _generator(device, cuda_graphs, dtype=torch.float32):
    sd = StableDiffusion.random("tiny", seed=0, device=device, dtype=dtype)
    cn = ControlNet.from_unet(sd.unet, 20, (8, 8, 16, 16))
    torch.manual_seed(1)
    for p in cn.parameters():  # zero convs too, so the residuals matter
        p.data.normal_(0, 0.05)
    return Generator(sd, cn.eval(), cuda_graphs=cuda_graphs)


def test_generator_mrlf_with_graph_double_equals_eager(monkeypatch):
    """The Generator's graph path (t as a tensor, batched views, guidance) gives the eager numbers."""
    label = street_scene(128, 128, 3)
    settings, mrlf = SamplingSettings(steps=3), MRLFSettings(window=16, stride=8, component_threshold=2000,
                                                              view_batch=4)
    eager = _generator("cpu", False).mrlf(label, "road car", torch.Generator().manual_seed(0), settings=settings,
                                          mrlf=mrlf)
    monkeypatch.setattr("mrlf.pipeline.CUDAGraphed", ReplayDouble)
    ReplayDouble.captures = 0
    gen = _generator("cpu", True)
    graphed = gen.mrlf(label, "road car", torch.Generator().manual_seed(0), settings=settings, mrlf=mrlf)
    # pass 2 has 9 views: chunks of 4 (batch 8) and a last chunk of 1 view, whose shapes equal pass 1's
    assert ReplayDouble.captures == 2
    np.testing.assert_array_equal(np.asarray(graphed.image), np.asarray(eager.image))
    gen.reset_graphs()
    assert not gen._graphs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_real_cuda_graphs_match_eager(dtype):
    def run(cuda_graphs):
        gen = _generator("cuda", cuda_graphs, dtype)
        return gen.generate(["a street", "a road"], street_scene(128, 128, 1), height=128, width=128,
                            settings=SamplingSettings(steps=4), window=8, stride=4, view_batch=3, output="latents")

    eager, graphed = run(False), run(True)
    # Same kernels, but cuBLAS may pick other algorithms under capture (its own workspace): not bit for bit.
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=tol, atol=tol)
