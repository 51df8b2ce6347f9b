"""ldm.graphs.CUDAGraphed: the static-buffer bookkeeping on CPU (a replay double), real graphs on CUDA."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten

from controlnet import ControlNet
from ldm.graphs import CUDAGraphed
from ldm.sd import StableDiffusion
from mrlf.pipeline import MRLFSettings, Pipeline, SamplingSettings
from segmentation.synthetic import street_scene


class ReplayDouble(CUDAGraphed):
    """CUDAGraphed on CPU: only the CUDA-specific steps are replaced; "replay" re-runs fn on the static
    inputs and writes into the static outputs, which is what a graph does, so stale inputs or aliased
    outputs show up as wrong numbers."""

    captures = 0

    @staticmethod
    def _one_device(tensors):
        return len({t.device for t in tensors}) == 1

    def _on(self, device):
        return contextlib.nullcontext()

    def _warm_up(self, args, kwargs):
        self.fn(*args, **kwargs)

    def _graph(self, args, kwargs):
        type(self).captures += 1
        out = self.fn(*args, **kwargs)

        def replay():  # a graph writes its outputs' memory whatever mode they were made in
            with torch.inference_mode():
                for s, new in zip(tree_flatten(out)[0], tree_flatten(self.fn(*args, **kwargs))[0]):
                    s.copy_(new)

        return replay, out


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


@torch.no_grad()
def test_signature_includes_the_ops_switches():
    from ldm import ops

    ReplayDouble.captures = 0
    g = ReplayDouble(model)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16), torch.tensor(10)
    with ops.use(attention="sdpa"):
        g(x, t, ctx)
    with ops.use(attention="math"):
        g(x, t, ctx)  # another setting: its own graph
    with ops.use(attention="sdpa"):
        g(x, t, ctx)
    assert ReplayDouble.captures == 2 and len(g.entries) == 2


def test_eager_with_grad_and_after_a_failed_capture():
    ReplayDouble.captures = 0
    g = ReplayDouble(model)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    g(x, torch.tensor(5), torch.randn(1, 7, 16)).sum().backward()  # autograd on: never graphed
    assert ReplayDouble.captures == 0 and x.grad is not None

    class Failing(ReplayDouble):
        def _graph(self, args, kwargs):
            if args[0].shape[0] == 2:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super()._graph(args, kwargs)

    f = Failing(model)
    with torch.no_grad():
        x = x.detach()
        f(x, torch.tensor(5), torch.ones(1, 7, 16))  # batch 1 captures
        with pytest.warns(RuntimeWarning, match="capture failed"):
            y = f(torch.cat([x, x]), torch.tensor(5), torch.ones(2, 7, 16))
        torch.testing.assert_close(y, model(torch.cat([x, x]), torch.tensor(5), torch.ones(2, 7, 16)))
        f(torch.cat([x, x]), torch.tensor(6), torch.ones(2, 7, 16))  # that signature stays eager, no second warning
        assert sum(e is None for e in f.entries.values()) == 1 and sum(e is not None for e in f.entries.values()) == 1


def test_errors_of_the_call_reach_the_caller_and_keep_the_graphs():
    def strict(x, t, context):
        if x.shape[1] != 4:
            raise ValueError(f"expected 4 channels, got {x.shape[1]}")
        return model(x, t, context)

    g = ReplayDouble(strict)
    with torch.no_grad():
        g(torch.ones(1, 4, 8, 8), torch.tensor(5), torch.ones(1, 7, 16))
        with pytest.raises(ValueError, match="4 channels"):
            g(torch.ones(1, 3, 8, 8), torch.tensor(5), torch.ones(1, 7, 16))
        assert len(g.entries) == 1 and all(e is not None for e in g.entries.values())


def test_inference_mode_capture_then_no_grad_call_and_expanded_inputs():
    g = ReplayDouble(model)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16)
    with torch.inference_mode():
        g(x, torch.tensor(3).expand(2), ctx)  # stride-0 timesteps: a contiguous static copy
    with torch.no_grad():
        y = g(x, torch.tensor(7).expand(2), ctx)
    torch.testing.assert_close(y, model(x, torch.tensor([7, 7]), ctx), rtol=0, atol=0)


def test_cpu_tensors_run_eagerly():
    g = CUDAGraphed(model)  # the real class: CPU tensors are never graphed
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
    return Pipeline(sd, cn.eval(), cuda_graphs=cuda_graphs)


def test_generator_mrlf_with_graph_double_equals_eager(monkeypatch):
    """The pipeline's graph path (t as a tensor, batched views, guidance) gives the eager numbers."""
    label = street_scene(128, 128, 3)
    settings, fusion = SamplingSettings(steps=3), MRLFSettings(window=16, stride=8, component_threshold=2000,
                                                                view_batch=4)
    eager = _generator("cpu", False).mrlf(label, "road car", torch.Generator().manual_seed(0), settings=settings,
                                          fusion=fusion)
    monkeypatch.setattr("mrlf.pipeline.CUDAGraphed", ReplayDouble)
    ReplayDouble.captures = 0
    gen = _generator("cpu", True)
    graphed = gen.mrlf(label, "road car", torch.Generator().manual_seed(0), settings=settings, fusion=fusion)
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_stay_eager_under_autocast_and_follow_the_inputs_device():
    g = CUDAGraphed(model)
    x, t, ctx = torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor(5, device="cuda"), torch.randn(2, 7, 16, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        g(x, t, ctx)
    assert not g.entries
    with torch.no_grad():
        torch.testing.assert_close(g(x, t, ctx), model(x, t, ctx))
        torch.testing.assert_close(g(2 * x, t, ctx), model(2 * x, t, ctx))
    assert len(g.entries) == 1 and all(e is not None for e in g.entries.values())


def test_generator_graph_keys_follow_modules_and_kernel_switches():
    from ldm import ops

    gen = _generator("cpu", True)
    s = SamplingSettings()
    assert gen.model_fn(s) is gen.model_fn(s)
    first = gen.model_fn(s)
    gen.controlnet = ControlNet.from_unet(gen.sd.unet, 20, (8, 8, 16, 16))
    assert gen.model_fn(s) is not first  # another ControlNet: its own graphs, never the old module's
    state = ops.state()
    with ops.use(fused="geglu"):
        assert ops.state() != state
    with ops.use(triton=False):
        assert ops.state() != state
