"""Optimisers and learning-rate schedules of the training recipes (paper 1: Adam + triangular cyclical LR)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from smearnet.errors import SmearnetError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("triangular", "onecycle")


def build_optimizer(parameters, train_cfg: Mapping) -> torch.optim.Optimizer:
    """`train.optimizer`: adam (the paper's, with `betas`/`eps`), adamw, or sgd (Nesterov momentum `betas[0]`);
    `train.weight_decay` (default 0). The starting learning rate is `lr_min`; the schedule moves it."""
    name = str(train_cfg.get("optimizer", "adam"))
    decay = float(train_cfg.get("weight_decay") or 0.0)
    lr = float(train_cfg["lr_min"])
    betas = tuple(float(b) for b in train_cfg["betas"])
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=float(train_cfg["eps"]), weight_decay=decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=betas, eps=float(train_cfg["eps"]), weight_decay=decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=betas[0], nesterov=True, weight_decay=decay)
    raise SmearnetError(f"Unknown train.optimizer `{name}`.", f"use one of {', '.join(OPTIMIZERS)}.")


def triangular_cyclic_lr(optimizer: torch.optim.Optimizer, lr_min: float, lr_max: float,
                         steps_per_cycle: int) -> torch.optim.lr_scheduler.CyclicLR:
    """One triangular cycle per pass over the training set: lr_min -> lr_max -> lr_min."""
    up = max(1, steps_per_cycle // 2)
    return torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=lr_min, max_lr=lr_max, step_size_up=up,
                                             step_size_down=max(1, steps_per_cycle - up), mode="triangular",
                                             cycle_momentum=False)


def build_schedule(optimizer: torch.optim.Optimizer, train_cfg: Mapping, steps_per_cycle: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """`train.schedule`: triangular (the paper's: one lr_min -> lr_max -> lr_min cycle per pass) or onecycle
    (a single warm-up to lr_max over `warmup_fraction` of all steps, then cosine annealing to lr_min)."""
    name = str(train_cfg.get("schedule", "triangular"))
    lr_min, lr_max = float(train_cfg["lr_min"]), float(train_cfg["lr_max"])
    if name == "triangular":
        return triangular_cyclic_lr(optimizer, lr_min, lr_max, steps_per_cycle)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr_max, total_steps=max(2, total_steps),
            pct_start=float(train_cfg.get("warmup_fraction") or 0.15), anneal_strategy="cos",
            div_factor=lr_max / lr_min, final_div_factor=1.0, cycle_momentum=False)
    raise SmearnetError(f"Unknown train.schedule `{name}`.", f"use one of {', '.join(SCHEDULES)}.")
