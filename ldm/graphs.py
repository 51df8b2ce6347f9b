"""CUDA graphs for fixed-shape inference calls (the sampling hot loop).

A guided ControlNet + U-Net call launches about two thousand small kernels. In eager mode each
launch costs the CPU several microseconds of Python and dispatcher work, so at SD-1.5 sizes and
small batches the GPU waits on the CPU. A CUDA graph records the launches once and replays them
with one call.

    step = CUDAGraphed(model_fn)          # model_fn(x, t, context=..., hint=...) -> eps
    eps = step(x, t, context=ctx, hint=h)  # first call per input signature: warm-up + capture

How it works: the first call with a new signature (the tree of arguments with each tensor's
shape, dtype, device and every non-tensor value) copies the tensor arguments into static
buffers, runs `fn` a few times on a side stream (cuDNN/cuBLAS workspaces, lazy
initialisation), captures one call into a graph, and keeps the graph with its static inputs and
outputs. Every call copies the new inputs into the static buffers, replays, and returns *copies*
of the static outputs, so an output held by the caller is never overwritten by the next replay.

What a graph freezes (call `reset()` after changing any of it):
- Python-side decisions taken inside `fn`: branches on values, module attributes, other process-wide
  state (pass it as `extra_key` to make it part of the signature). The `ldm.ops` switches (attention
  backend, fused kernels, Triton) are always part of it: each setting gets its own graph;
- the weight tensors' addresses: in-place updates (`param.copy_`) are seen, replaced
  parameters (`load_state_dict(..., assign=True)`, `module.to(...)`) are not.

Graphs are used only where they are safe: autograd off, no autocast (its weight-cast cache would
be captured and later freed), and every tensor argument on one CUDA device. Any other call runs `fn`
eagerly. Timesteps must arrive as tensors (a Python int would be baked into the graph and give one
graph per step). Errors of the call itself (a wrong shape, out of memory) reach the caller; if only
the capture fails (an operation that synchronises with the host, say), the wrapper warns once and
runs that signature eagerly from then on.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ldm import ops


def _leaf_key(v: Any):
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device, v.stride())
    try:
        hash(v)
    except TypeError:  # unhashable non-tensor argument: identity is the best we can do
        return ("id", id(v))
    return ("value", type(v), v)


class CUDAGraphed:
    """Wrap `fn(*args, **kwargs)`; replay one CUDA graph per input signature.

    warmup: eager runs on a side stream before capturing (at least 1).
    extra_key: a callable whose (hashable) result joins the signature, for process state beyond
        `ldm.ops.state()` (always included) that changes what `fn` launches.
    """

    def __init__(self, fn: Callable, warmup: int = 2, extra_key: Callable[[], Any] | None = None):
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (the capture needs initialised libraries)")
        self.fn, self.warmup, self.extra_key = fn, warmup, extra_key
        self.entries: dict = {}  # signature -> captured graph, or None where the capture failed
        self.pool = None
        self.warned = False

    def reset(self) -> None:
        """Drop every captured graph (and its memory); the next call captures again."""
        self.entries.clear()
        self.pool = None

    def applies(self, leaves: list) -> bool:
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        return (not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda") and bool(tensors)
                and self._one_device(tensors))

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        if not self.applies(leaves):
            return self.fn(*args, **kwargs)
        key = (spec, tuple(_leaf_key(v) for v in leaves), ops.state(), self.extra_key() if self.extra_key else None)
        device = next(v.device for v in leaves if isinstance(v, torch.Tensor))
        with self._on(device):
            if key not in self.entries:
                self.entries[key] = self._capture(leaves, spec)
            entry = self.entries[key]
            if entry is None:
                return self.fn(*args, **kwargs)
            replay, static_in, static_out, out_spec = entry
            for s, v in zip(static_in, leaves):
                if s is not None and s.data_ptr() != v.data_ptr():
                    s.copy_(v)
            replay()
        return tree_unflatten([o.clone() if isinstance(o, torch.Tensor) else o for o in static_out], out_spec)

    def _capture(self, leaves: list, spec):
        """Static inputs, warm-up (its errors reach the caller), capture; None if only the capture fails."""
        static_in, call_leaves = self._static_inputs(leaves)
        args, kwargs = tree_unflatten(call_leaves, spec)
        self._warm_up(args, kwargs)
        try:
            replay, out = self._graph(args, kwargs)
        except Exception as e:  # noqa: BLE001 - the warm-up ran the same call: this is the capture failing
            if not self.warned:
                warnings.warn(f"CUDA graph capture failed, running this call eagerly ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=3)
                self.warned = True
            return None
        static_out, out_spec = tree_flatten(out)
        return replay, static_in, static_out, out_spec

    def _static_inputs(self, leaves: list) -> tuple[list, list]:
        """Static copies of the tensor leaves (None for the other leaves) and the leaves to call with.

        Made outside inference mode, so later calls from plain no_grad code may write into them;
        empty_like keeps dense layouts and makes expanded (stride-0) inputs contiguous."""
        with torch.inference_mode(False):
            static_in = [torch.empty_like(v).copy_(v) if isinstance(v, torch.Tensor) else None for v in leaves]
        return static_in, [s if s is not None else v for s, v in zip(static_in, leaves)]

    # The CUDA-specific steps (a test double replaces these four on CPU).
    @staticmethod
    def _one_device(tensors: list) -> bool:
        return torch.cuda.is_available() and all(t.is_cuda for t in tensors) and len({t.device for t in tensors}) == 1

    def _on(self, device):
        return torch.cuda.device(device)  # capture and replay on the inputs' device, whatever the current one

    def _warm_up(self, args, kwargs) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)

    def _graph(self, args, kwargs):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one after another
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*args, **kwargs)
        return graph.replay, out
