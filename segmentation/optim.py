"""The optimiser recipe of the DAFormer / SegFormer configs that DGInStyle's segmentors train with:
parameter groups by mmcv's ``custom_keys`` rule, and mmcv's per-iteration poly schedule with a
linear warmup."""
from __future__ import annotations

import torch

# mmcv DefaultOptimizerConstructor custom_keys of the DAFormer / SegFormer configs, matched as
# substrings of the parameter name, longest key first (ties alphabetical), first match wins.
CUSTOM_KEYS = {"head": {"lr_mult": 10.0}, "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 10.0) -> list[dict]:
    """One optimizer group per (lr_mult, decay_mult) with mmcv's matching rule."""
    keys = dict(CUSTOM_KEYS, head={"lr_mult": head_lr_mult})
    order = sorted(sorted(keys), key=len, reverse=True)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, decay_mult = 1.0, 1.0
        for k in order:
            if k in name:
                lr_mult, decay_mult = keys[k].get("lr_mult", 1.0), keys[k].get("decay_mult", 1.0)
                break
        g = groups.setdefault((lr_mult, decay_mult), {"params": [], "names": [], "lr_mult": lr_mult,
                                                      "lr": lr * lr_mult, "weight_decay": weight_decay * decay_mult})
        g["params"].append(p)
        g["names"].append(name)
    return [{k: v for k, v in g.items() if k != "names"} | {"param_names": g["names"]} for g in groups.values()]


def lr_factor(it: int, max_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
              power: float = 1.0, min_lr_ratio: float = 0.0) -> float:
    """lr / base_lr before iteration ``it`` (0-based): poly decay, linear warmup (mmcv semantics:
    warmup_lr = regular_lr * (1 - (1 - it / warmup) * (1 - warmup_ratio)))."""
    regular = (1 - min_lr_ratio) * (1 - it / max_iters) ** power + min_lr_ratio
    if it < warmup_iters:
        return regular * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))
    return regular
