"""Pretrain a CLIP text tower on captioned images with CLIP's contrastive objective (Radford et al.
2021), as SD-1.5's text encoder was, for a text-to-image U-Net trained from scratch on top of it.

A fresh text encoder (--config: a preset name or a JSON CLIPTextConfig; SD-1.5's tokenizer) and an
image tower (a MiT backbone, average-pooled, LayerNorm and a linear map) are trained together: the
caption's feature is the text encoder's last hidden state at its end-of-text token (as CLIP pools),
linearly projected; both features are L2-normalised and compared by cosine similarity times a learnt
temperature (initialised to 1 / 0.07, capped at 100, as CLIP). The loss is the symmetric cross-entropy
of the image-caption similarity matrix of each batch, with one difference to CLIP: captions that are
the same text are positives of each other (soft targets spread over them), so a corpus with repeated
captions does not teach the towers to tell identical captions apart. Only the text encoder is
exported; the image tower and projections are training scaffolding (kept in the checkpoints).

Why a pretrained text encoder: a U-Net's cross-attention starts out attending uniformly to all 77
token states. With a random (or jointly trained) encoder, only the caption's own words differ between
captions and the 60-odd padding states barely do, so the uniform average hides what a style word
says and the U-Net never learns to look for it (the miniature world's prior ignored its style words
after 3000 steps this way). After contrastive pretraining the end-of-text and padding states carry
the caption's meaning, and the U-Net picks it up from the start (BENCHMARKS.md: style-prompt
accuracy of the world's U^P).

    python -m train.train_text_encoder --data world/prior --config mini --resolution 64 \
        --output-dir runs/text_encoder --max-steps 1500
    torchrun --standalone --nproc_per_node=N -m train.train_text_encoder ...same arguments...
Under torchrun each process contrasts its own batch (negatives are not gathered across processes).
Resume (exact: same world size): add --resume auto or --resume PATH.

--data is an image folder with captions (ROOT/metadata.jsonl, as train.finetune_unet reads it).
--val-split holds out that share of it: at the end, val.json has the held-out image -> caption
top-1 retrieval accuracy in batches of --batch-size (chance: 1 / batch, more with repeated captions).
Outputs in --output-dir: log.txt, metrics.jsonl (loss, acc: the batch's image -> caption top-1),
checkpoints/step_*.pt, val.json and at the end text_encoder.safetensors (native; loads wherever a text
encoder does, e.g. ``train.finetune_unet --text-encoder``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ldm import checkpoint as ckpt_io
from ldm import cli
from ldm.atomic import write_text
from ldm.clip import CLIPTextModel
from ldm.config import config_from_text
from ldm.tokenizer import Tokenizer
from segmentation.models.mit import MIT_CONFIGS, MixVisionTransformer
from train import common
from train.data import METADATA_FILE, ImageDataset, find_captioned_images, shard_loader

MAX_LOGIT_SCALE = 100.0


class ImageTower(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> (B, dim) features: MiT, average-pooled, LayerNorm, linear."""

    def __init__(self, dim: int, backbone: str = "mit_tiny"):
        super().__init__()
        self.backbone = MixVisionTransformer(replace(MIT_CONFIGS[backbone], drop_path_rate=0.0))
        width = self.backbone.out_channels[-1]
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.backbone(x)[-1].mean(dim=(2, 3))))


class Contrastive(nn.Module):
    """The text encoder and the image tower, scored together. forward(images, ids, same) -> (loss, acc),
    `same` the (B, B) bool matrix of which captions are the same text."""

    def __init__(self, text_encoder: CLIPTextModel, dim: int, backbone: str = "mit_tiny"):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.cfg.width, dim, bias=False)
        self.image_tower = ImageTower(dim, backbone)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.text_encoder(ids)
        eos = ids.argmax(dim=-1)  # the end-of-text id is the vocabulary's highest; argmax finds its first use
        return F.normalize(self.text_projection(h[torch.arange(len(ids), device=ids.device), eos]), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, same: torch.Tensor):
        img = F.normalize(self.image_tower(images), dim=-1)
        logits = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * img.float() @ self.text_features(ids).float().T
        target = same.float() / same.sum(dim=1, keepdim=True)  # symmetric: same is symmetric
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        acc = same[torch.arange(len(ids)), logits.argmax(dim=1)].float().mean()
        return loss, acc


def same_text(captions) -> torch.Tensor:
    """(B, B) bool: caption i is the same text as caption j."""
    codes = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([codes[c] for c in captions])
    return ids[:, None] == ids[None, :]


def split(files: list, captions: list, share: float, seed: int) -> tuple[list, list, list, list]:
    """(train files, train captions, held-out files, held-out captions): a seeded random share held out."""
    n_val = int(round(share * len(files)))
    order = np.random.default_rng(seed).permutation(len(files))
    val, train = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    return pick(files, train), pick(captions, train), pick(files, val), pick(captions, val)


@torch.no_grad()
def retrieval_accuracy(model: Contrastive, files, captions, tokenizer, resolution: int, batch: int, device) -> dict:
    """Image -> caption top-1 accuracy over held-out images in batches of `batch` (centre crops)."""
    model.eval()
    data = ImageDataset(files, resolution, (1.0,), "center", captions=captions)
    hits, chance = [], []
    for i in range(0, len(files), batch):
        idx = range(i, min(i + batch, len(files)))
        x = torch.stack([data.view(k) for k in idx]).to(device)
        caps = [captions[k] for k in idx]
        same = same_text(caps).to(device)
        _, acc = model(x, tokenizer(caps).to(device), same)
        hits.append(float(acc) * len(caps))
        chance.append(float(same.float().mean()) * len(caps))
    model.train()
    n = max(len(files), 1)
    return {"images": len(files), "batch": batch, "accuracy": sum(hits) / n, "chance": sum(chance) / n}


def main(args):
    d, log, tb, amp_dtype = common.start_run(args)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    files, captions = find_captioned_images(args.data, args.caption_column)
    files, captions, val_files, val_captions = split(files, captions, args.val_split, args.seed)
    if args.batch_size < 2:
        raise SystemExit("--batch-size must be at least 2: a caption's negatives are the batch's other images")
    if len(files) < args.batch_size:
        raise SystemExit(f"{args.data}: {len(files)} training images, fewer than --batch-size {args.batch_size}")
    te = CLIPTextModel(config_from_text("text_encoder", args.config))
    tokenizer = Tokenizer(max_length=te.cfg.max_length)
    model = Contrastive(te, args.embed_dim, args.backbone).to(d.device).train()
    ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.distributed else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log.info(f"{len(files)} captioned images ({len(val_files)} held out); text encoder {te.cfg.to_json()}: "
             f"{sum(p.numel() for p in te.parameters()) / 1e6:.2f} M parameters; image tower "
             f"{sum(p.numel() for p in model.image_tower.parameters()) / 1e6:.2f} M")
    step, position = 0, 0
    scaler = common.grad_scaler(d.device, amp_dtype)
    state = common.resume_checkpoint(args.resume, ckpt_dir, out, d, log, model=model, optimizer=opt, scaler=scaler,
                                     config=vars(args))
    if state is not None:
        step, position = state["step"], state["sampler"]["position"]
        del state
    dataset = ImageDataset(files, args.resolution, tuple(args.scales), "random", seed=args.seed, rank=d.rank,
                           captions=captions, flip=True)
    batches = iter(shard_loader(dataset, args.batch_size, d.rank, d.world_size, args.seed, position,
                                args.num_workers, pin_memory=d.device.type == "cuda"))
    amp = common.autocast(d.device, amp_dtype)
    meter = common.Meter(step)
    guard = common.DivergenceGuard(args.max_bad_steps, log)
    progress = common.step_progress(step, args.max_steps, d)
    while step < args.max_steps:
        lr = common.cosine_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches)
        position += args.batch_size
        caps = list(batch["caption"])
        with amp:
            loss, acc = ddp(batch["pixel_values"].to(d.device), tokenizer(caps).to(d.device),
                            same_text(caps).to(d.device))
        scaler.scale(loss).backward()
        grad_norm = common.optimizer_step(opt, scaler)
        step += 1
        guard.check(grad_norm, step)
        progress.update()
        meter.add(loss=loss, acc=acc)
        if step % args.log_every == 0 or step == args.max_steps:
            metrics = meter.means(d) | {"lr": lr, "grad_norm": float(grad_norm),
                                        "temperature": 1 / min(math.exp(model.logit_scale.item()), MAX_LOGIT_SCALE),
                                        "samples_per_s": meter.samples_per_s(step, args.batch_size * d.world_size)}
            common.log_metrics(log, out, step, metrics, d, tb, progress)
            meter.restart(step)
        if step % args.ckpt_every == 0 or step == args.max_steps:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "config": vars(args), "sampler": {"position": position, "world_size": d.world_size}}
            log.info(f"saved {common.save_checkpoint(ckpt_dir, step, state, d, keep_last=args.keep_last)}")
            state = None
    progress.close()
    if d.is_main:
        if val_files:
            result = retrieval_accuracy(model, val_files, val_captions, tokenizer, args.resolution, args.batch_size,
                                        d.device)
            write_text(out / "val.json", json.dumps(result, indent=1) + "\n")
            log.info(f"held-out image -> caption top-1 accuracy {result['accuracy']:.4f} "
                     f"(chance {result['chance']:.4f}, batches of {args.batch_size})")
        path = ckpt_io.save_native(out / "text_encoder.safetensors", {"text_encoder": te.to("cpu").eval()},
                                   overwrite=True)
        log.info(f"exported {path}")
    common.finish_run(log, tb)


def get_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m train.train_text_encoder", __doc__)
    g = p.add_argument_group("model and data")
    g.add_argument("--data", required=True, help=f"an image folder with captions in {METADATA_FILE}")
    g.add_argument("--caption-column", default="text", help=f"the caption key of {METADATA_FILE}")
    g.add_argument("--val-split", type=cli.real(0, 1, open_max=True), default=0.05,
                   help="share of the images held out for the retrieval accuracy in val.json")
    g.add_argument("--config", default="mini", help="CLIPTextConfig: a preset name (mini, tiny, sd15) or JSON")
    g.add_argument("--embed-dim", type=cli.positive_int, default=32, help="width of the shared embedding space")
    g.add_argument("--backbone", default="mit_tiny", choices=sorted(MIT_CONFIGS), help="the image tower's MiT")
    g.add_argument("--resolution", type=cli.integer(8), default=64, help="training crop side in pixels")
    g.add_argument("--scales", type=cli.positive, nargs="+", default=[1.0], help="random rescale ratios before the crop")
    common.add_cosine_optimisation(p, batch_size=64, max_steps=1500, lr=1e-3, warmup_steps=50, weight_decay=0.0,
                                   batch_help="batch per process (the negatives)")
    common.add_run_arguments(p, num_workers=2, log_every=50, ckpt_every=500, keep_last=2)
    return p


if __name__ == "__main__":
    sys.exit(cli.run_cli(lambda argv: common.run(main, get_parser().parse_args(argv))))
