"""What every torchrun training script here shares: DDP setup, seeding, rank-0 logging, the
command-line groups they have in common, checkpoints with every RNG state and exact resume, loss
meters, EMA, gradient-accumulation sync control, and the set-up the two segmentation scripts share
(argument groups, model, optimizer, data, evaluation, checkpoint entries). Nothing more: no Trainer
class, no callbacks; each script (train/finetune_unet.py, train/train_controlnet.py,
train/train_segmentation.py, train/train_uda.py) is one flat loop that calls these helpers, in the
style of DiT's and nanoGPT's train.py.

Typical use, top to bottom::

    d, log, tb, amp_dtype = start_run(args)      # torchrun env -> process group, device; seeds; rank-0 log
    ddp = DDP(model, ...) if d.distributed else model
    state = resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=model, optimizer=opt, scaler=scaler,
                              config=vars(args))
    step = state["step"] if state is not None else 0
    meter = Meter(step)
    guard, progress = DivergenceGuard(args.max_bad_steps, log), step_progress(step, args.max_steps, d)
    ...
    for micro in range(accum):
        with no_sync(ddp, sync=micro == accum - 1):     # all-reduce grads on the last micro-step only
            with autocast(d.device, amp_dtype):
                loss = ...
            scaler.scale(loss / accum).backward()
        meter.add(loss=loss)
    grad_norm = optimizer_step(opt, scaler, max_grad_norm=1.0)  # skipped when not finite
    step += 1
    guard.check(grad_norm, step)                 # stops a run that keeps diverging
    progress.update()
    ...
    metrics = meter.means(d)                     # the same numbers on every rank
    log_metrics(log, out, step, metrics, d, tb, progress)  # rank 0: the log line and out/metrics.jsonl
    save_checkpoint(ckpt_dir, step, {"model": model.state_dict(), ...}, d, keep_last=3)
    ...
    finish_run(log, tb)                          # wait for rank 0's exports
    # and in `if __name__ == "__main__":`, main(args) then cleanup_distributed(), one-line errors:
    sys.exit(cli.run_cli(lambda argv: run(main, get_parser().parse_args(argv))))

Faults: `optimizer_step` skips an update whose loss or gradient is not finite (as AMP's loss
scaling does under fp16); `DivergenceGuard`, given the models, puts back what that step's forwards
moved in their buffers (BatchNorm's running statistics) and stops the run with `TrainingDiverged`
after ``--max-bad-steps`` such steps in a row; `save_checkpoint` and the exports refuse non-finite tensors,
so the rotation never replaces the last finite checkpoint. `resume_checkpoint` applies (and logs)
hyper-parameters changed on the command line, and ``--resume auto`` falls back from an unreadable
latest checkpoint to the one before.

Checkpoints (``step_0001000.pt``) hold whatever state dict the script passes, plus ``step``,
``world_size`` and ``rng``: the python / numpy / torch CPU / CUDA generator states of *every* rank
(gathered to rank 0) and any extra torch/numpy ``Generator`` objects the script names (data samplers).
Writes are atomic (``ldm.atomic``: temporary file + rename) and the last N are kept. ``restore_rng`` puts
each rank's states back, so a resumed run continues bit-identically (same world size, same device).
Load with ``load_checkpoint`` (``weights_only=True``: only tensors and plain Python values inside).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ldm import cli
from ldm.atomic import atomic_file, clean_stale, write_text
from segmentation.datasets import (DatasetError, IndexStream, MixedDataset, RCSConfig, SegDataset, TrainSource,
                                   parse_ratio, parse_spec)
from segmentation.evaluate import evaluate_dataset, is_hr_model
from segmentation.feature_distance import THING_CLASSES, FeatureDistance
from segmentation.metrics import summarize
from segmentation.models import PRESETS, build_segmentor
from segmentation.models.segmentor import tiny_preset
from segmentation.optim import lr_factor, param_groups
from segmentation.transforms import TrainPipeline

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")


# ---------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    """Where this process sits: torchrun's RANK / LOCAL_RANK / WORLD_SIZE and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> Dist:
    """Read torchrun's environment, pick the device, and start the process group.

    A plain ``python script.py`` (no WORLD_SIZE) is rank 0 of 1 with no process group. Under
    torchrun each process takes GPU ``LOCAL_RANK`` (``torch.cuda.set_device``) and joins an NCCL
    group, or a gloo group on CPU. `device` ("cuda", "cpu") overrides the choice (default: CUDA
    when available).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def cleanup_distributed() -> None:
    """End the process group while the interpreter is fully alive. Call it after the training
    function has returned: a DDP wrapper still alive at interpreter exit can leave gloo work
    objects to be freed during finalisation, which aborts the process."""
    if dist.is_initialized():
        gc.collect()  # free the DDP reducer and its work objects (reference cycles) first
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_process_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), then the others (which read it)."""
    if not d.is_main:
        barrier()
    try:
        yield
    finally:
        if d.is_main:
            barrier()


def seed_everything(seed: int, d: Dist) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with seed * world_size + rank (DiT's rule):
    every rank gets its own stream, and a run is reproducible for a given world size."""
    s = int(seed) * d.world_size + d.rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (and torch.compile's wrapper)."""
    if isinstance(model, DDP):
        model = model.module
    return getattr(model, "_orig_mod", model)


@contextmanager
def no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation without needless all-reduce: inside, a DDP model only accumulates
    local gradients unless `sync` (the last micro-step). A non-DDP model is unaffected.
    (nanoGPT flips ``model.require_backward_grad_sync``; DDP.no_sync is the public form.)"""
    if sync or not isinstance(model, DDP):
        yield
    else:
        with model.no_sync():
            yield


def all_reduce_mean(value: torch.Tensor | float, d: Dist) -> float:
    """Mean over ranks of a scalar (a collective: every rank must call it at the same step)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=d.device).detach().clone().reshape(())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= d.world_size
    return float(t.item())


def requires_grad(model: nn.Module, flag: bool = True) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(flag)
    return model


# ---------------------------------------------------------------------------------------
# A run: its command-line groups, its start and its end
# ---------------------------------------------------------------------------------------

RUN_HELP = """OUTPUT holds log.txt, metrics.jsonl and checkpoints/. The log lines show step / max steps,
samples/s and the ETA (a terminal also gets a progress bar). TensorBoard: when the tensorboard
package is installed, the scalars also go to OUTPUT/tensorboard (the log's first lines say whether
they do); it is not a dependency."""


def add_run_arguments(p: argparse.ArgumentParser, *, num_workers: int, log_every: int, ckpt_every: int,
                      keep_last: int):
    """The "run" argument group of every script (defaults per script); returns it for the script's own."""
    g = p.add_argument_group("run", RUN_HELP)
    g.add_argument("--output-dir", required=True, metavar="OUTPUT", help="where logs, checkpoints and exports go")
    g.add_argument("--seed", type=cli.non_negative_int, default=0, help="global seed (rank r uses seed * world + r)")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--num-workers", type=cli.non_negative_int, default=num_workers, help="DataLoader workers per rank")
    g.add_argument("--log-every", type=cli.positive_int, default=log_every, help="optimizer steps between log lines")
    g.add_argument("--ckpt-every", type=cli.positive_int, default=ckpt_every,
                   help="optimizer steps between checkpoints")
    g.add_argument("--keep-last", type=cli.non_negative_int, default=keep_last, help="checkpoints kept (0: all)")
    g.add_argument("--resume", help="'auto' (latest readable checkpoint in OUTPUT/checkpoints, if any) or a checkpoint "
                                    "path; changed hyper-parameters are applied and logged")
    g.add_argument("--max-bad-steps", type=cli.positive_int, default=20,
                   help="stop after this many optimizer steps in a row with a non-finite loss or gradient (each is "
                        "skipped; fp16 loss scaling skips a few while it finds its scale)")
    return g


def add_diffusion_optimisation(p: argparse.ArgumentParser, *, batch_size: int, grad_accum: int, max_steps: int,
                               lr: float):
    """The "optimisation" group of the diffusion scripts (U-Net fine-tuning, ControlNet training):
    AdamW (the lr constant unless the script adds a schedule), clipping, mixed precision with fp32
    master weights, EMA."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.positive_int, default=batch_size, help="micro-batch per GPU")
    g.add_argument("--grad-accum", type=cli.positive_int, default=grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--max-steps", type=cli.non_negative_int, default=max_steps, help="optimizer steps in all")
    g.add_argument("--lr", type=cli.positive, default=lr,
                   help="AdamW learning rate (the peak one where the script has --lr-scheduler)")
    g.add_argument("--adam-beta1", type=cli.real(0, 1, open_max=True), default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=cli.real(0, 1, open_max=True), default=0.999, help="AdamW beta2")
    g.add_argument("--weight-decay", type=cli.non_negative, default=1e-2, help="AdamW (decoupled) weight decay")
    g.add_argument("--adam-eps", type=cli.positive, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max-grad-norm", type=cli.positive, default=1.0, help="gradient clipping norm")
    g.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype with fp32 master weights (frozen models are cast to it); "
                        "auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (the trained model and a frozen U-Net)")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the trained weights (exports then hold it)")
    g.add_argument("--ema-decay", type=cli.fraction, default=0.9999, help="EMA decay per optimizer step")
    g.add_argument("--no-tf32", dest="tf32", action="store_false", help="disable TF32 matmuls on CUDA (on by default)")
    return g


def add_cosine_optimisation(p: argparse.ArgumentParser, *, batch_size: int, max_steps: int, lr: float,
                            warmup_steps: int, weight_decay: float, batch_help: str = "batch per process"):
    """The "optimisation" group of the small trainers (classifier, text encoder): AdamW with a linear
    warm-up and a cosine decay (`cosine_lr`), mixed precision."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.positive_int, default=batch_size, help=batch_help)
    g.add_argument("--max-steps", type=cli.positive_int, default=max_steps, help="optimizer steps")
    g.add_argument("--lr", type=cli.positive, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--warmup-steps", type=cli.positive_int, default=warmup_steps, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=cli.non_negative, default=weight_decay, help="AdamW weight decay")
    g.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    return g


def cosine_lr(step: int, args) -> float:
    """--lr times a linear warm-up over --warmup-steps and a cosine over all --max-steps."""
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))


def start_run(args) -> tuple[Dist, logging.Logger, Any, torch.dtype]:
    """The opening of every script: the process group and device (``args.device``), the seeds
    (``args.seed``), the rank-0 logger writing ``args.output_dir/log.txt``, the TensorBoard writer
    (or None) and the compute dtype of ``args.mixed_precision``. The first log line names the rank,
    the device, the dtype and every argument."""
    d = setup_distributed(args.device)
    seed_everything(args.seed, d)
    log = create_logger(args.output_dir, d)
    tb = open_tensorboard(args.output_dir, d)
    amp_dtype = compute_dtype(args.mixed_precision, d.device)
    log.info(f"rank {d.rank}/{d.world_size} on {d.device}, compute dtype {amp_dtype}; args: {json.dumps(vars(args))}")
    log.info(f"TensorBoard: scalars in {Path(args.output_dir) / 'tensorboard'}" if tb is not None else
             "TensorBoard: not installed, no scalars (metrics.jsonl has them; pip install tensorboard for the plots)")
    return d, log, tb, amp_dtype


def finish_run(log: logging.Logger, tb=None) -> None:
    """The end of every script: all ranks wait for rank 0's exports, then the logs close."""
    barrier()
    log.info("done")
    if tb is not None:
        tb.close()


def run(main, args) -> int:
    """A script's command line: ``main(args)``, then the process group ends once main's locals (the
    DDP wrapper, its pending work) are freed. Under ``ldm.cli.run_cli``, a known error is one line."""
    main(args)
    cleanup_distributed()
    return 0


# ---------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------

PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a CUDA device that supports it, else fp32; 'no'/'fp32' -> fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    return {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context (fp32 master weights, ops in `dtype`); a no-op for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# ---------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    params = dict(model.named_parameters())
    for name, p in ema.named_parameters():
        p.lerp_(params[name].detach().to(p.dtype), 1.0 - decay)
    bufs = dict(model.named_buffers())
    for name, b in ema.named_buffers():
        b.copy_(bufs[name])


# ---------------------------------------------------------------------------------------
# Segmentation runs: what train_segmentation.py and train_uda.py share
# ---------------------------------------------------------------------------------------

def add_segmentation_arguments(p: argparse.ArgumentParser) -> None:
    """The model, data, optimisation and feature-distance groups of the segmentation scripts (the
    DGInStyle-SegModel recipe; see train/train_segmentation.py's docstring)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="daformer_mitb5", choices=sorted(PRESETS), help="segmentor preset")
    g.add_argument("--tiny", action="store_true", help="the 'tiny' preset (random, for smoke tests)")
    g.add_argument("--pretrained", help="official ImageNet MiT weights (mit_b5.pth), loaded strictly")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    g = p.add_argument_group("DIFF (--model diff_*): the frozen diffusion model; unset: the preset's")
    g.add_argument("--diff-unet", help="U-Net weights (file, folder or local model id); also the VAE's and text "
                                       "encoder's unless given")
    g.add_argument("--diff-vae", help="VAE weights")
    g.add_argument("--diff-text-encoder", help="text encoder weights (the prompts are encoded once)")
    g.add_argument("--diff-prediction", choices=("epsilon", "v_prediction"), help="what the U-Net predicts")
    g.add_argument("--diff-ipkl", action=argparse.BooleanOptionalAction, default=None,
                   help="implicit posterior knowledge learning: the class-prompted pass and the consistency loss")
    g.add_argument("--diff-classes", type=int, nargs="+", default=None, metavar="ID",
                   help="trainIds with a class prompt in the conditional pass")
    g = p.add_argument_group("data")
    g.add_argument("--source", nargs="+", required=True, metavar="LAYOUT:PATH",
                   help="source datasets, e.g. gta:data/gta (layouts: segmentation.datasets.LAYOUTS)")
    g.add_argument("--source-split", default="train", help="split for split-based source layouts")
    g.add_argument("--generated", nargs="*", default=[], metavar="[LAYOUT:]PATH",
                   help="generated datasets (default layout: dginstyle, i.e. manifest.jsonl)")
    g.add_argument("--mix-ratio", default=None, help="source:generated sampling ratio, e.g. 1:1 "
                                                     "(default: uniform over the union of files)")
    g.add_argument("--rcs", action="store_true", help="rare-class sampling for the source data")
    g.add_argument("--rcs-temperature", type=cli.positive, default=0.01, help="rare-class sampling temperature")
    g.add_argument("--rcs-min-pixels", type=cli.non_negative_int, default=3000,
                   help="files eligible for class c: > this many pixels of c")
    g.add_argument("--rcs-min-crop-ratio", type=cli.non_negative, default=0.5,
                   help="re-crop until the crop holds this x the min pixels of the class")
    g.add_argument("--source-scale", type=cli.positive_int, nargs="*", default=[1280, 720], metavar="EDGE",
                   help="resize source images to fit LONG SHORT (keep ratio); nothing: no resize")
    g.add_argument("--gen-scale", type=cli.positive_int, nargs="*", default=None, metavar="EDGE",
                   help="resize generated images to fit LONG SHORT (e.g. 1024 1024 for HR configs)")
    g.add_argument("--crop", type=cli.positive_int, default=512,
                   help="training crop (HR configs / HRDA: 1024, with --source-scale 2560 1440 --gen-scale 1024 1024)")
    g.add_argument("--cat-max-ratio", type=cli.fraction, default=0.75,
                   help="re-draw a crop in which one class covers more than this share")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.positive_int, default=2, help="per GPU")
    g.add_argument("--max-iters", type=cli.non_negative_int, default=40000, help="optimizer steps in all")
    g.add_argument("--lr", type=cli.positive, default=6e-5, help="AdamW learning rate (peak of the poly schedule)")
    g.add_argument("--head-lr-mult", type=cli.positive, default=10.0, help="learning rate factor of the head")
    g.add_argument("--weight-decay", type=cli.non_negative, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup-iters", type=cli.non_negative_int, default=1500, help="linear warm-up steps")
    g.add_argument("--warmup-ratio", type=cli.fraction, default=1e-6, help="warm-up start as a share of --lr")
    g.add_argument("--poly-power", type=cli.non_negative, default=1.0, help="power of the poly decay")
    g.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g = p.add_argument_group("ImageNet feature distance on thing classes (DAFormer; DGInStyle: --fd-lambda 0.005)")
    g.add_argument("--fd-lambda", type=cli.non_negative, default=0.0,
                   help="weight of the feature distance to the frozen initial (ImageNet) backbone; 0 = off. "
                        "The DGInStyle recipe (DAFormer / HRDA, dacs_fdthings_srconly) uses 0.005")
    g.add_argument("--fd-classes", type=int, nargs="+", default=list(THING_CLASSES), metavar="ID",
                   help="trainIds whose (downscaled) cells count; the default is DAFormer's thing classes")
    g.add_argument("--fd-min-ratio", type=cli.fraction, default=0.75,
                   help="a feature cell takes its majority class only if it covers this share of the cell")


def add_segmentation_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation group of the segmentation scripts."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", nargs="*", default=[], metavar="LAYOUT:PATH", help="e.g. cityscapes:data/cityscapes")
    g.add_argument("--eval-split", default=None,
                   help="split of the evaluation sets (default: each layout's validation split)")
    g.add_argument("--eval-every", type=cli.non_negative_int, default=4000,
                   help="optimizer steps between evaluations (0: none)")
    g.add_argument("--eval-mode", choices=("slide", "whole"), default="slide",
                   help="sliding-window or whole-image inference")
    g.add_argument("--eval-crop", type=cli.positive_int, default=None,
                   help="sliding window (default: the model's, 512; HRDA 1024)")
    g.add_argument("--eval-stride", type=cli.positive_int, default=None,
                   help="its stride (default: the model's, 256; HRDA 512)")
    g.add_argument("--eval-hr", action=argparse.BooleanOptionalAction, default=None,
                   help="double the layouts' test scales (the 1024 configs; default: on for HRDA models)")
    g.add_argument("--eval-scale", type=cli.positive_int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="resize evaluation images to fit LONG x SHORT (keep ratio) instead of the layouts' test "
                        "scales (a model trained at another scale, e.g. the miniature world's)")
    g.add_argument("--eval-limit", type=cli.positive_int, default=None, help="first N images per dataset")


def check_segmentation_arguments(p: argparse.ArgumentParser, a) -> None:
    """``p.error`` for inconsistent values of the shared segmentation groups."""
    for name in ("source_scale", "gen_scale"):
        v = getattr(a, name)
        if v and len(v) != 2:
            p.error(f"--{name.replace('_', '-')} takes two numbers (LONG SHORT) or none")
    if a.fd_lambda < 0:
        p.error("--fd-lambda must be >= 0")
    if not 0.0 <= a.fd_min_ratio <= 1.0:
        p.error("--fd-min-ratio must be in [0, 1]")
    if a.mix_ratio is not None:
        try:
            parse_ratio(a.mix_ratio, 2)
        except ValueError as e:
            p.error(str(e))
    for spec in a.eval:
        try:
            parse_spec(spec)
        except DatasetError as e:
            p.error(str(e))


def segmentation_preset(args) -> str:
    """The preset a run trains: ``--model``, or with ``--tiny`` its tiny twin (plain, HRDA or DIFF)."""
    return args.model if not args.tiny else tiny_preset(args.model)


def build_segmentation_model(args, d: Dist, log: logging.Logger) -> tuple[nn.Module, FeatureDistance | None]:
    """The segmentor of ``--model`` (``--tiny``: its tiny twin), with ``--pretrained`` backbone
    weights, in training mode on the run's device, and, with ``--fd-lambda``, the feature distance
    whose frozen reference is the backbone as it is now."""
    if args.tiny:
        log.warning("--tiny: a randomly initialised tiny segmentor, for tests and smoke runs only")
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model_cfg = PRESETS[segmentation_preset(args)]
    if model_cfg.diff is not None:  # the frozen diffusion weights (and IPKL settings) from the command line
        if args.pretrained or args.fd_lambda > 0 or getattr(args, "shade", False):
            raise SystemExit("--pretrained, --fd-lambda and --shade act on MiT backbones, not on DIFF")
        given = dict(unet=args.diff_unet, vae=args.diff_vae, text_encoder=args.diff_text_encoder,
                     prediction_type=args.diff_prediction, ipkl=args.diff_ipkl, ipkl_classes=args.diff_classes)
        model_cfg = replace(model_cfg, diff=replace(model_cfg.diff, **{k: v for k, v in given.items() if v is not None}))
    model = build_segmentor(model_cfg)
    if args.pretrained:
        model.load_backbone(args.pretrained)
        log.info(f"backbone weights from {args.pretrained}")
    model = model.to(d.device).train()
    fd = None
    if args.fd_lambda > 0:
        bad = [c for c in args.fd_classes if not 0 <= c < model_cfg.num_classes]
        if bad:
            raise SystemExit(f"--fd-classes {bad} are not classes of a {model_cfg.num_classes}-class model")
        h = model_cfg.hrda
        if h is not None and h.hr_crop_size is not None and float(h.feature_scale) == h.scales[0]:
            # the training forward returns the detail crop's features, the frozen copy sees the whole image
            raise SystemExit("--fd-lambda with HRDA needs feature_scale at the context scale "
                             f"({h.scales[1]:g}), not the cropped detail scale ({h.scales[0]:g})")
        # the reference: the backbone as initialised (ImageNet weights with --pretrained), frozen
        fd = FeatureDistance(model.backbone, args.fd_classes, args.fd_min_ratio, model_cfg.num_classes)
        log.info(f"feature distance: lambda {args.fd_lambda:g}, classes {list(fd.classes)}, min ratio "
                 f"{fd.min_ratio:g}, frozen reference = the backbone "
                 + (f"from {args.pretrained}" if args.pretrained else "as randomly initialised (no --pretrained)"))
    return model, fd


def segmentation_optimizer(args, model: nn.Module, d: Dist, log: logging.Logger, amp_dtype: torch.dtype):
    """(model, its DDP wrapper or itself, AdamW, grad scaler): SyncBatchNorm with ``--sync-bn``
    under torchrun, the recipe's parameter groups (head lr x ``--head-lr-mult``, no decay on norms
    and position blocks), each group's ``base_lr`` for `set_poly_lr`."""
    if args.sync_bn and d.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info(f"{segmentation_preset(args)}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
             f"parameters ({asdict(model.cfg)})")
    groups = param_groups(model, args.lr, args.weight_decay, args.head_lr_mult)
    for g in groups:
        log.info(f"  param group lr x{g['lr_mult']:g}, weight decay {g['weight_decay']:g}: {len(g['params'])} tensors")
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups],
                            lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    scaler = grad_scaler(d.device, amp_dtype)
    ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.distributed else model
    return model, ddp, opt, scaler


def set_poly_lr(opt, args, step: int) -> None:
    """The recipe's learning rate before iteration ``step``: poly decay after a linear warm-up."""
    factor = lr_factor(step, args.max_iters, args.warmup_iters, args.warmup_ratio, args.poly_power)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def restore_feature_distance(state: Mapping, fd: FeatureDistance | None, args, log: logging.Logger) -> None:
    """On resume: the feature distance's frozen reference from the checkpoint (a run without
    ``--pretrained`` stores it; with it, the reference was rebuilt from the file)."""
    if fd is None:
        return
    if "fd_backbone" in state:
        fd.frozen.load_state_dict(state["fd_backbone"])
        log.info("feature-distance reference from the checkpoint")
    elif not args.pretrained:
        log.warning("the checkpoint has no feature-distance reference (fd_backbone) and there is no "
                    "--pretrained file: the reference is this run's fresh initialisation, which "
                    "equals the original one only for the same seed and code")


def segmentation_state(model: nn.Module, opt, scaler, args, fd: FeatureDistance | None) -> dict:
    """A segmentation checkpoint's own entries: model, optimizer, scaler, model_config, config and,
    without ``--pretrained``, the feature distance's reference (a resume cannot rebuild it)."""
    state = {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "model_config": asdict(unwrap(model).cfg), "config": vars(args)}
    if fd is not None and not args.pretrained:  # with --pretrained, a resume rebuilds it from the file
        state["fd_backbone"] = fd.frozen.state_dict()
    return state


def segmentation_data(args, d: Dist, log: logging.Logger, photometric: bool = True):
    """(source sources, generated sources, their MixedDataset): ``--source`` (with ``--rcs``) and
    ``--generated`` through the recipe's pipelines (``photometric=False``: no photometric
    distortion, for self-training, which colour-augments its mixed images instead), mixed by
    ``--mix-ratio`` or uniformly over the union of files. Item k of rank r is a function of (seed, r, k)."""
    rcs = RCSConfig(args.rcs_temperature, args.rcs_min_pixels, args.rcs_min_crop_ratio) if args.rcs else None

    def pipeline(scale):
        return TrainPipeline(scale=tuple(scale) if scale else None, crop=args.crop, cat_max_ratio=args.cat_max_ratio,
                             photometric=photometric)

    def build(specs, pipe, rcs, default_layout, split):
        out = []
        for spec in specs:
            layout, path = parse_spec(spec, default_layout)
            ds = SegDataset(path, layout, split)
            out.append(TrainSource(ds, pipe, rcs))
            log.info(f"  {layout.name}: {len(ds)} pairs from {path}" + (" (rare-class sampling)" if rcs else ""))
        return out

    log.info("source data:")
    with main_process_first(d):  # rank 0 writes the RCS statistics cache, the others read it
        sources = build(args.source, pipeline(args.source_scale), rcs, None, args.source_split)
    generated = []
    if args.generated:
        log.info("generated data:")
        generated = build(args.generated, pipeline(args.gen_scale), None, "dginstyle", None)
    if args.mix_ratio and not generated:
        raise SystemExit("--mix-ratio needs --generated data")
    dataset = MixedDataset([sources, generated], args.mix_ratio if generated else None, seed=args.seed, rank=d.rank)
    n_src, n_gen = sum(map(len, sources)), sum(map(len, generated))
    log.info(f"mixture: {n_src} source + {n_gen} generated files; P(generated) = "
             f"{dataset.group_probs[-1] if generated else 0.0:.3f}"
             + (" (uniform over the union)" if not args.mix_ratio else f" (ratio {args.mix_ratio})"))
    return sources, generated, dataset


def segmentation_loader(dataset, args, d: Dist, step: int) -> DataLoader:
    """Items step * batch, step * batch + 1, ... of ``dataset``: resuming at ``step`` reads what an
    uninterrupted run would."""
    return DataLoader(dataset, batch_size=args.batch_size,
                      sampler=IndexStream(step * args.batch_size, (args.max_iters - step) * args.batch_size),
                      num_workers=args.num_workers, pin_memory=d.device.type == "cuda",
                      persistent_workers=args.num_workers > 0, drop_last=True,
                      generator=torch.Generator())  # its base-seed draw must not touch the global RNG


def evaluate_segmentation(args, model: nn.Module, d: Dist, amp_dtype: torch.dtype, log: logging.Logger,
                          step: int) -> dict:
    """mIoU on every ``--eval`` dataset (sharded over the ranks): ``{"mIoU/<layout>": value}``."""
    if d.distributed:  # each rank's last forward moved its BatchNorm statistics: evaluate rank 0's on
        for buf in unwrap(model).buffers():  # every rank (mmseg's DistEvalHook, broadcast_bn_buffer)
            dist.broadcast(buf, 0)
    eval_hr = is_hr_model(model) if args.eval_hr is None else args.eval_hr
    metrics = {}
    for spec in args.eval:
        layout, path = parse_spec(spec)
        scale = tuple(args.eval_scale) if args.eval_scale else layout.test_scale
        if eval_hr and scale is not None and not args.eval_scale:
            scale = (2 * scale[0], 2 * scale[1])
        ds = SegDataset(path, layout, args.eval_split, test_scale=scale)
        cm = evaluate_dataset(unwrap(model), ds, mode=args.eval_mode, crop=args.eval_crop, stride=args.eval_stride,
                              device=d.device, limit=args.eval_limit,
                              autocast_dtype=None if amp_dtype == torch.float32 else amp_dtype)
        s = summarize(cm.cpu())
        metrics[f"mIoU/{layout.name}"] = s["mIoU"]
        log.info(f"step {step}: {layout.name} mIoU x 100 = {100 * (s['mIoU'] or 0):.1f} ({len(ds)} images)")
    return metrics


# ---------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------

def create_logger(output_dir: str | os.PathLike | None, d: Dist, name: str = "train") -> logging.Logger:
    """Rank 0 logs to stdout and ``output_dir/log.txt`` (appended); other ranks get a NullHandler.

    Calling it again (a second run in the same process) replaces the handlers.
    """
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    if d.is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [_TerminalHandler(sys.stdout)]
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(Path(output_dir) / "log.txt"))
        for h in handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


class _TerminalHandler(logging.StreamHandler):
    """Log lines on stdout that first erase the progress bar a terminal shows (redrawn at the next step)."""

    def emit(self, record: logging.LogRecord) -> None:
        cli.clear_live_bar()
        super().emit(record)


def open_tensorboard(output_dir: str | os.PathLike, d: Dist):
    """A TensorBoard SummaryWriter on rank 0 when tensorboard is installed, else None."""
    if not d.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(Path(output_dir) / "tensorboard"))


def optimizer_step(opt, scaler, params=None, max_grad_norm: float | None = None) -> torch.Tensor:
    """One update after the (accumulated) backward passes: unscale (fp16), clip, step, update the
    scaler, zero the grads. Returns the gradient norm before clipping (`params`: the optimizer's
    when None).

    A non-finite norm (a NaN or inf in the loss or a gradient) skips the update: weights and
    optimizer state stay as they were, as AMP's loss scaling does under fp16, where the scaler
    also lowers its scale. `DivergenceGuard` stops a run whose steps keep being skipped."""
    params = [p for g in opt.param_groups for p in g["params"]] if params is None else list(params)
    scaler.unscale_(opt)
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if torch.isfinite(norm):
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm


class TrainingDiverged(RuntimeError):
    """Training produced non-finite losses, gradients or weights; nothing non-finite is saved."""


class DivergenceGuard:
    """Counts the optimizer steps `optimizer_step` skipped for a non-finite gradient; `max_bad` in a
    row stop the run with `TrainingDiverged` (the same on every rank: DDP's gradients are all-reduced).

    With models (the student, and a teacher whose forward passes also train BatchNorm), `start_step()`
    (before the step's first forward) keeps a copy of their buffers and a skipped step puts them back:
    a forward pass moves BatchNorm's running statistics whatever the update does, and one NaN batch
    would otherwise leave them NaN for good."""

    def __init__(self, max_bad: int, logger: logging.Logger, *models: nn.Module):
        self.max_bad, self.log, self.bad = int(max_bad), logger, 0
        self.buffers = [b for m in models for b in m.buffers()]
        self.saved: list[torch.Tensor] = []

    def start_step(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]

    def check(self, grad_norm: torch.Tensor, step: int) -> None:
        if torch.isfinite(grad_norm):
            self.bad = 0
            return
        with torch.no_grad():
            for b, s in zip(self.buffers, self.saved):
                b.copy_(s)
        self.bad += 1
        self.log.warning(f"step {step}: non-finite loss or gradient (norm {float(grad_norm)}): update skipped "
                         f"({self.bad} in a row; the run stops at {self.max_bad})")
        if self.bad >= self.max_bad:
            msg = (f"training diverged: {self.bad} optimizer steps in a row had a non-finite loss or gradient (the "
                   f"last at step {step}); the weights were not updated by them and every checkpoint written is "
                   f"finite. Lower --lr (or keep --max-grad-norm clipping, or train in bf16/fp32), then --resume")
            self.log.error(msg)
            raise TrainingDiverged(msg)


def non_finite(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating tensors in a (nested) state that hold NaN or inf."""
    if torch.is_tensor(state):
        return [prefix or "tensor"] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        return [n for k, v in state.items() for n in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in non_finite(v, f"{prefix}[{i}]")]
    return []


def check_finite(state: Any, what: str) -> None:
    """`TrainingDiverged` naming the first tensors of `state` that hold NaN or inf (nothing is written)."""
    bad = non_finite(state)
    if bad:
        raise TrainingDiverged(f"{what}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                               f"{', ...' if len(bad) > 3 else ''}), not written; training diverged. Lower --lr and "
                               f"--resume from the last checkpoint")


def log_metrics(log, output_dir: str | os.PathLike, step: int, metrics: Mapping[str, Any], d: Dist, tb=None,
                progress: cli.Progress | None = None) -> None:
    """Log one line on rank 0 (numbers only; with the peak CUDA memory and, given the run's
    `progress`, step / max steps, elapsed time and ETA) and append the metrics to ``metrics.jsonl`` /
    TensorBoard."""
    if d.device.type == "cuda":
        metrics = {**metrics, "max_mem_gb": torch.cuda.max_memory_allocated(d.device) / 2**30}
    nums = "  ".join(f"{k} {v:.5g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    where = f"step {step:7d}" + (f"/{progress.total}" if progress is not None else "")
    log.info(f"{where}  {nums}" + (f"  | {progress.timing()}" if progress is not None else ""))
    write_metrics(output_dir, step, metrics, d, tb)


def step_progress(step: int, max_steps: int, d: Dist) -> cli.Progress:
    """The run's progress over optimizer steps: a bar on rank 0's terminal (stderr) between the log
    lines, nothing in a log (the log lines carry step / max steps and the ETA)."""
    return cli.Progress(max_steps, "train", "steps", initial=step, lines=False, enabled=d.is_main)


class Meter:
    """The loss terms of the steps since the last log line, summed on their device (no host sync per
    step), and the training time they took: ``means`` and ``samples_per_s`` at a log line, then
    ``restart``."""

    def __init__(self, step: int = 0):
        self.restart(step)

    def restart(self, step: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.step0, self.t0 = 0, int(step), time.time()

    def add(self, **terms: torch.Tensor) -> None:
        """One forward pass's loss terms (scalars)."""
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def means(self, d: Dist) -> dict[str, float]:
        """Each term's mean over the forward passes and the ranks (a collective)."""
        return {k: all_reduce_mean(v / self.n, d) for k, v in self.sums.items()}

    def samples_per_s(self, step: int, samples_per_step: int) -> float:
        return (step - self.step0) * samples_per_step / max(time.time() - self.t0, 1e-9)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) does not count as training time."""
        t = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - t


def write_metrics(output_dir: str | os.PathLike, step: int, metrics: Mapping[str, Any], d: Dist, tb=None) -> None:
    """Rank 0 appends ``{"step": step, **metrics}`` to ``output_dir/metrics.jsonl`` (and scalars to
    TensorBoard). Values must be JSON-serialisable."""
    if not d.is_main:
        return
    with open(Path(output_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if tb is not None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tb.add_scalar(k, v, step)


def truncate_metrics(output_dir: str | os.PathLike, step: int, d: Dist) -> None:
    """On resume: drop the metrics rows logged after the checkpoint's step (they will be logged again)."""
    path = Path(output_dir) / "metrics.jsonl"
    if d.is_main and path.exists():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        write_text(path, "".join(r + "\n" for r in rows))  # a kill mid-rewrite keeps the old history


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_grid(images: list, ncols: int):
    """PIL images of one size -> one PIL image, row-major, `ncols` per row."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = math.ceil(len(images) / ncols)
    grid = Image.new("RGB", (ncols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % ncols) * w, (i // ncols) * h))
    return grid


# ---------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------

def _np_global_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_np_global_state(s: Mapping) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))


def rng_state(generators: Mapping[str, torch.Generator | np.random.Generator] | None = None) -> dict:
    """This process's RNG states as plain values and CPU tensors: python, numpy, torch CPU, the
    current CUDA device, and each named extra generator (torch or numpy)."""
    state = {"python": random.getstate(), "numpy": _np_global_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
             "generators": {}}
    for name, g in (generators or {}).items():
        if isinstance(g, torch.Generator):
            state["generators"][name] = {"kind": "torch", "state": g.get_state()}
        elif isinstance(g, np.random.Generator):
            state["generators"][name] = {"kind": "numpy", "state": g.bit_generator.state}
        else:
            raise TypeError(f"generator {name!r}: expected a torch or numpy Generator, got {type(g).__name__}")
    return state


def set_rng_state(state: Mapping, generators: Mapping[str, torch.Generator | np.random.Generator] | None = None) -> None:
    """Inverse of `rng_state` (the named generators are updated in place)."""
    random.setstate(_as_python_state(state["python"]))
    _set_np_global_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint holds no state for generator {name!r} (it has {sorted(saved)})")
        if isinstance(g, torch.Generator):
            g.set_state(saved[name]["state"])
        else:
            g.bit_generator.state = saved[name]["state"]


def _as_python_state(s):
    # random.setstate wants (version, tuple_of_ints, gauss_next); a round trip may give lists.
    return (s[0], tuple(s[1]), s[2])


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

def checkpoint_path(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{step:07d}.pt"


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """``step_*.pt`` files of a folder, oldest step first (temporary files are ignored)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, checkpoint_dir: str | os.PathLike) -> Path | None:
    """``--resume``: None/"" -> start fresh; "auto" -> the latest checkpoint if any; else a path (must exist).
    Temporary files a killed run left in `checkpoint_dir` are removed. A fresh start refuses a folder
    that holds an earlier run's checkpoints: the keep-last rotation would delete the new, lower-step
    ones first, and a later ``--resume auto`` would continue the old run."""
    clean_stale(checkpoint_dir)
    if not resume:
        earlier = list_checkpoints(checkpoint_dir)
        if earlier:
            raise FileExistsError(f"{checkpoint_dir} holds {len(earlier)} checkpoint(s) of an earlier run (the latest "
                                  f"{earlier[-1].name}): pass --resume auto to continue it, or start afresh in "
                                  f"another --output-dir")
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoint_dir)
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {path}: no step_*.pt checkpoint in this folder")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    return path


def gather_objects(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; a collective)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(checkpoint_dir: str | os.PathLike, step: int, state: Mapping[str, Any], d: Dist,
                    keep_last: int | None = None,
                    generators: Mapping[str, torch.Generator | np.random.Generator] | None = None) -> Path:
    """Write ``checkpoint_dir/step_<step>.pt`` (a collective: call it on every rank).

    `state`: the script's own entries (model, optimizer, scaler, ema, config, ...), as tensors and
    plain Python values. Added here: ``step``, ``world_size`` and ``rng`` (one `rng_state` per rank,
    with `generators`). Rank 0 writes a temporary file in the same folder and renames it, then
    deletes all but the newest `keep_last` checkpoints; every rank waits for it (barrier).
    """
    check_finite({k: state[k] for k in state if k != "config"}, f"checkpoint of step {step}")
    rngs = gather_objects(rng_state(generators), d)
    path = checkpoint_path(checkpoint_dir, step)
    if d.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**state, "step": int(step), "world_size": d.world_size, "rng": rngs}
        with atomic_file(path) as tmp:
            torch.save(payload, tmp)
        if keep_last is not None and keep_last > 0:
            for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
                old.unlink(missing_ok=True)
    barrier()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by `save_checkpoint`, tensors on CPU (safe unpickling: weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_rng(ckpt: Mapping, d: Dist, generators: Mapping[str, torch.Generator | np.random.Generator] | None = None,
                logger: logging.Logger | None = None) -> bool:
    """Put this rank's saved RNG states back. Returns False (and warns) when the checkpoint was
    written with another world size: the run then continues, but not bit-identically."""
    rngs = ckpt.get("rng") or []
    if len(rngs) != d.world_size:
        if logger is not None:
            logger.warning(f"checkpoint has RNG states of {len(rngs)} rank(s), this run has {d.world_size}: "
                           "keeping fresh seeds (the resumed run is not bit-identical to an uninterrupted one)")
        return False
    set_rng_state(rngs[d.rank], generators)
    return True


# Settings that may change on a resume without a word: how long to run, where and how often to log,
# save, sample or evaluate, and the command line's own.
RESUME_FREE = {"resume", "output_dir", "max_steps", "max_iters", "log_every", "ckpt_every", "keep_last", "num_workers",
               "device", "threads", "debug", "max_bad_steps", "no_progress", "num_samples", "num_validation"}
RESUME_FREE_PREFIXES = ("sample_", "validation_", "eval", "export")


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"lr: 2e-06 -> 0.001"`` for every training setting that differs between a checkpoint's
    config and this run's arguments (`RESUME_FREE` ones aside)."""
    out = []
    for k in sorted(saved.keys() & now.keys()):
        if k in RESUME_FREE or k.startswith(RESUME_FREE_PREFIXES):
            continue
        a, b = json.loads(json.dumps(saved[k], default=str)), json.loads(json.dumps(now[k], default=str))
        if a != b:
            out.append(f"{k}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be loaded (cut short, corrupt, not a checkpoint)."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """`load_checkpoint`, with any failure as `UnreadableCheckpoint` naming the file."""
    try:
        return load_checkpoint(path)
    except Exception as e:  # torch.load reports a cut-short zip as RuntimeError, others as EOFError, pickle errors ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableCheckpoint(f"{path}: cannot read the checkpoint ({reason})") from e


def load_resumable(path: Path, auto: bool, d: Dist, logger: logging.Logger) -> tuple[Path, dict] | None:
    """The checkpoint at `path` (and that path); with `auto`, an unreadable one is set aside
    (renamed ``*.unreadable`` by rank 0, out of the rotation) and the previous one is tried, down
    to a fresh start (None) when none is readable."""
    while True:
        try:
            return path, read_checkpoint(path)
        except UnreadableCheckpoint as e:
            if not auto:
                raise
            earlier = [p for p in list_checkpoints(path.parent) if p != path and int(CHECKPOINT_RE.match(p.name)[1]) <
                       int(CHECKPOINT_RE.match(path.name)[1])]
            logger.warning(f"{e}: falling back to " + (str(earlier[-1]) if earlier else "a fresh start") +
                           f" ({path.name} is kept as {path.name}.unreadable)")
            barrier()  # every rank has tried the file before rank 0 moves it
            if d.is_main and path.exists():
                os.replace(path, path.with_name(path.name + ".unreadable"))
            if not earlier:
                return None
            path = earlier[-1]


def resume_checkpoint(resume: str | None, checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, d: Dist,
                      logger: logging.Logger, *, model: nn.Module, optimizer, scaler=None,
                      ema: nn.Module | None = None, config: Mapping[str, Any] | None = None,
                      fixed: Sequence[str] = ()) -> dict | None:
    """``--resume``: the checkpoint to continue from (`resolve_resume`), or None for a fresh start.

    Loads the model, optimizer and grad-scaler states (and the EMA's: the model's for a checkpoint
    saved without one), puts this rank's RNG states back (`restore_rng`) and drops the
    ``metrics.jsonl`` rows logged after the checkpoint's step, which the resumed run logs again.
    Returns the checkpoint, for ``step`` and the script's own entries.

    With "auto", an unreadable latest checkpoint (cut short by a full disk, say) is set aside as
    ``step_*.pt.unreadable`` and the one before it is used, with a warning. The optimizer's
    hyper-parameters (lr, betas, weight decay, ...) are this run's, as `config` (the script's
    ``vars(args)``) may change them: every setting that differs from the checkpoint's ``config`` is
    logged; the `fixed` ones (those that choose which parameters train) must not differ: the run
    stops with both values. Temporary files a killed run left in `output_dir` and its sub-folders are removed."""
    for folder in (Path(output_dir), *(p for p in Path(output_dir).glob("*") if p.is_dir())):
        clean_stale(folder)
    path = resolve_resume(resume, checkpoint_dir)
    if path is None:
        return None
    found = load_resumable(path, auto=resume == "auto", d=d, logger=logger)
    if found is None:
        return None
    path, state = found
    saved = state.get("config") or {}
    moved = [f"--{k.replace('_', '-')} {saved[k]} -> {config[k]}" for k in fixed
             if config is not None and k in saved and k in config and saved[k] != config[k]]
    if moved:
        raise SystemExit(f"{path} trained other parameters than this run would: {'; '.join(moved)}; resume with "
                         f"the checkpoint's setting, or start a new run in another --output-dir")
    model.load_state_dict(state["model"])
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # torch: "... doesn't match the size of optimizer's group"
        raise SystemExit(f"{path}: its optimizer state is for other trained parameters than this run's "
                         f"({e})") from None
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)
    if config is not None:
        changed = changed_settings(state.get("config") or {}, config)
        if changed:
            logger.warning("resuming with changed settings, which apply from here on (the run no longer continues "
                           f"the checkpoint's exactly): {'; '.join(changed)}")
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    restore_rng(state, d, logger=logger)
    truncate_metrics(output_dir, state["step"], d)
    logger.info(f"resumed from {path} at step {state['step']}")
    return state
