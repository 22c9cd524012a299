"""The optimiser step of every run: AdamW with timm's parameter groups, timm's per-step cosine
schedule with linear warm-up, an optional cosine weight-decay schedule, a GradScaler (fp16) and
gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LR_SCALING", "scaled_lr", "OptimizerStep"]

# lr_scaling -> factor of the base lr as a function of batch / lr_base_batch (docs/method.md,
# recipes)
LR_SCALING = {"none": lambda ratio: 1.0, "linear": lambda ratio: ratio, "sqrt": math.sqrt}


def scaled_lr(cfg) -> float:
    """The base learning rate after ``lr_scaling``: none, linear (x batch / lr_base_batch), sqrt
       (x
    its root)."""
    return cfg.lr * LR_SCALING[cfg.lr_scaling](cfg.batch_size / cfg.lr_base_batch)


class OptimizerStep:
    """One optimiser step over ``total_steps`` steps: :meth:`begin` (schedules, zero grad),
    :meth:`backward` per micro-batch, then :meth:`apply` (unscale, clip, AdamW, scaler update) or
    :meth:`skip`.

    Args:
        cfg: the run config (lr, lr_scaling, lr_base_batch, min_lr, warmup_steps / warmup_epochs,
            weight_decay, weight_decay_end, beta1, beta2, clip_grad, precision).
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

    def apply(self) -> float:
        """Unscale, clip (``clip_grad``), step and update the scaler; returns the gradient norm
           (NaN
        when not clipped: it is only computed for clipping)."""
        self.scaler.unscale_(self.optimizer)
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
        self.scaler.load_state_dict(state["scaler"])
