"""The optimiser step of every run: AdamW with timm's parameter groups, a per-step learning-rate
schedule (``lr_schedule``: timm's cosine with linear warm-up, the default; or mmcv's poly with
linear warm-up, the segmentation releases'), an optional cosine weight-decay schedule, a
GradScaler (fp16) and gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "LR_SCALING",
    "LR_SCHEDULES",
    "WEIGHT_DECAY_RULES",
    "scaled_lr",
    "poly_lr",
    "PolyWarmupLR",
    "layer_decay_param_groups",
    "OptimizerStep",
]

# lr_scaling -> factor of the base lr as a function of batch / lr_base_batch (docs/method.md,
# recipes)
LR_SCALING = {"none": lambda ratio: 1.0, "linear": lambda ratio: ratio, "sqrt": math.sqrt}
# lr_schedule -> what it is (the config's choices)
LR_SCHEDULES = {
    "cosine": "timm's per-step cosine to min_lr after a linear warm-up from 0",
    "poly": "mmcv's poly decay (power poly_power) to min_lr, a linear warm-up multiplying it",
}
# which parameters are exempt from weight decay in layer_decay_param_groups
WEIGHT_DECAY_RULES = {
    "release": "1-D parameters and biases only (BEiT's mmcv constructor: the CLS token, position "
    "embedding and relative position tables are decayed)",
    "timm": "also what the backbone's no_weight_decay() names (CLS token, position embedding, "
    "relative position tables)",
}
# mmcv's warmup_ratio in the BEiT / BEiT v2 / DINOv2 segmentation configs: the first step's
# learning rate is this fraction of the (poly-decayed) one
POLY_WARMUP_RATIO = 1e-6


def scaled_lr(cfg) -> float:
    """The base learning rate after ``lr_scaling``: none, linear (x batch / lr_base_batch), sqrt
       (x
    its root)."""
    return cfg.lr * LR_SCALING[cfg.lr_scaling](cfg.batch_size / cfg.lr_base_batch)


def poly_lr(
    base: float,
    step: int,
    total_steps: int,
    warmup_steps: int,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_ratio: float = POLY_WARMUP_RATIO,
) -> float:
    """mmcv's ``PolyLrUpdaterHook`` with linear warm-up, by iteration (``step`` counted from 0):
    ``(base - min_lr) * (1 - step / total_steps) ** power + min_lr``, multiplied during the first
    ``warmup_steps`` steps by ``1 - (1 - step / warmup_steps) * (1 - warmup_ratio)``: the warm-up
    scales the already-decayed value (mmcv's rule, not timm's ramp to the peak)."""
    regular = (base - min_lr) * (1 - step / total_steps) ** power + min_lr
    if step < warmup_steps:
        return regular * (1 - (1 - step / warmup_steps) * (1 - warmup_ratio))
    return regular


class PolyWarmupLR:
    """:func:`poly_lr` for every parameter group of an optimiser, each from its own initial lr
    (``lr`` x the group's ``lr_scale``, timm's layer-decay key; mmcv's groups carry their scaled
    lr the same way). Stateless: the lr is a function of the step, so resuming needs nothing; the
    timm scheduler interface (``step_update``, ``state_dict``) the optimiser step expects."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int, power: float, min_lr: float):
        self.optimizer, self.total_steps, self.warmup_steps = optimizer, total_steps, warmup_steps
        self.power, self.min_lr = power, min_lr
        for g in optimizer.param_groups:
            g.setdefault("poly_base_lr", g["lr"] * g.get("lr_scale", 1.0))

    def step_update(self, step: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = poly_lr(
                g["poly_base_lr"],
                step,
                self.total_steps,
                self.warmup_steps,
                self.power,
                self.min_lr,
            )

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def layer_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    depth: int,
    prefix: str,
    rule: str = "release",
) -> list[dict]:
    """Parameter groups with layer-wise lr decay for a model holding a ViT under ``prefix``
    (e.g. ``"backbone.vit."``), by BEiT's ``LayerDecayOptimizerConstructor`` (its segmentation
    release): the ViT's CLS / mask token, position embedding and patch embedding are layer 0,
    block i is layer i + 1, everything else (the ViT's other parameters, necks, heads) is layer
    depth + 1; a layer's lr is scaled by ``layer_decay ** (depth + 1 - layer)`` (the heads 1.0,
    the last block ``layer_decay``). Weight decay by ``rule`` (:data:`WEIGHT_DECAY_RULES`).

    Groups carry ``lr_scale`` (timm's key, which the schedules multiply) and ``weight_decay``;
    parameters that do not require gradients are left out."""
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"rule must be one of {tuple(WEIGHT_DECAY_RULES)}, got {rule!r}")
    vit = model.get_submodule(prefix.rstrip(".")) if prefix else model
    exempt = (
        set(vit.no_weight_decay()) if rule == "timm" and hasattr(vit, "no_weight_decay") else set()
    )
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rel = name[len(prefix) :] if name.startswith(prefix) else None
        if rel is None:
            layer = depth + 1
        elif rel.split(".")[0] in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
            layer = 0
        elif rel.startswith("blocks."):
            layer = int(rel.split(".")[1]) + 1
        else:
            layer = depth + 1
        no_decay = p.ndim == 1 or name.endswith(".bias") or (rel is not None and rel in exempt)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "layer": layer,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


class OptimizerStep:
    """One optimiser step over ``total_steps`` steps: :meth:`begin` (schedules, zero grad),
    :meth:`backward` per micro-batch, then :meth:`apply` (unscale, clip, AdamW, scaler update) or
    :meth:`skip`.

    Args:
        cfg: the run config (lr, lr_scaling, lr_base_batch, lr_schedule, poly_power, min_lr,
            warmup_steps / warmup_epochs, weight_decay, weight_decay_end, beta1, beta2,
            clip_grad, precision).
        model: the trainable module.
        param_groups: optimiser groups (default: timm's weight-decay groups of ``model``,
            exempting what its ``no_weight_decay()`` names).
        total_steps, steps_per_epoch: the run's length, for the schedules.
    """

    def __init__(
        self,
        cfg,
        model: nn.Module,
        total_steps: int,
        steps_per_epoch: int,
        param_groups: list | None = None,
    ) -> None:
        from timm.optim import param_groups_weight_decay
        from timm.scheduler import CosineLRScheduler

        self.cfg, self.model, self.total_steps = cfg, model, total_steps
        warmup = (
            cfg.warmup_steps
            if cfg.warmup_steps is not None
            else round(cfg.warmup_epochs * steps_per_epoch)
        )
        self.warmup_steps = min(warmup, max(total_steps - 1, 0))
        self.lr = scaled_lr(cfg)
        if param_groups is None:
            nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
            param_groups = param_groups_weight_decay(
                model, cfg.weight_decay, no_weight_decay_list=nwd
            )
        for g in param_groups:
            g["base_weight_decay"] = g.get("weight_decay", cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=self.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8
        )
        if cfg.lr_schedule == "poly":
            self.scheduler = PolyWarmupLR(
                self.optimizer, max(total_steps, 1), self.warmup_steps, cfg.poly_power, cfg.min_lr
            )
        else:
            self.scheduler = CosineLRScheduler(
                self.optimizer,
                t_initial=max(total_steps - self.warmup_steps, 1),
                lr_min=cfg.min_lr,
                warmup_t=self.warmup_steps,
                warmup_lr_init=0.0,
                warmup_prefix=True,
                t_in_epochs=False,
            )
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def begin(self, step: int) -> float:
        """Set this step's learning rate and weight decay, clear the gradients; returns the
           weight
        decay."""
        self.scheduler.step_update(step)
        wd = self._set_weight_decay(step)
        self.optimizer.zero_grad(set_to_none=True)
        return wd

    def backward(self, loss: torch.Tensor, accum_steps: int) -> None:
        """Accumulate the gradient of one micro-batch's loss."""
        self.scaler.scale(loss / accum_steps).backward()

    def apply(self, grad_scale: float = 1.0) -> float:
        """Unscale (and multiply the gradients by ``grad_scale``), clip (``clip_grad``), step and
        update the scaler; returns the gradient norm (NaN when not clipped: it is only computed
        for clipping)."""
        self.scaler.unscale_(self.optimizer)
        if grad_scale != 1.0:  # rare: a step in which some rank had no image
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(grad_scale)
        grad_norm = float("nan")
        if self.cfg.clip_grad is not None:
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm

    def skip(self) -> None:
        """Drop this step's gradients (a non-finite loss under ``nan_policy=skip``)."""
        self.optimizer.zero_grad(set_to_none=True)

    def _set_weight_decay(self, step: int) -> float:
        cfg = self.cfg
        wd = cfg.weight_decay
        if cfg.weight_decay_end is not None:
            t = min(step / max(self.total_steps - 1, 1), 1.0)
            wd = cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (
                1 + math.cos(math.pi * t)
            )
        for g in self.optimizer.param_groups:
            if g["base_weight_decay"] > 0:
                g["weight_decay"] = wd
        return wd

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict, apply_config: bool = False) -> None:
        """Load a checkpoint's optimiser, scheduler and scaler states. ``apply_config`` (a resume
        that applies changed settings): keep this object's hyperparameters (lr, betas, weight
        decay, layer-decay scales: the new config's) and its schedule (built from the new config
        and run length); only the AdamW moments and step counts and the scaler come from
        ``state``."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        if apply_config:
            for group, own in zip(self.optimizer.param_groups, fresh):
                group.update(own)
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        scaler = state.get("scaler") or {}
        # a checkpoint of a run without loss scaling (bf16, fp32) has no scaler state: an fp16
        # run resuming it starts from a fresh scale (a disabled scaler ignores any state)
        if scaler or not self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler)
