"""Benchmarks that print numbers (``tokenmorph bench ...``): where a step's time goes.

``bench morph`` times the DTM loss forward + backward of this library against the official release's
dense formulation (:func:`release_dense_dtm_loss`, reproduced here as the baseline) in the same run, and
checks that both give the same loss.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .losses import dtm_loss

__all__ = ["release_dense_membership", "release_dense_dtm_loss", "bench_morph", "bench_pretrain", "bench_objectives",
           "matmul_peak", "timeit"]


def release_dense_membership(tokens: torch.Tensor, schedule: Sequence[int]) -> torch.Tensor:
    """The release's morphing, as it computes it: (B, N, D) -> binary membership (B, G, N).

    Every iteration normalises the size-weighted group features, matches the alternating halves with a
    (B, n/2, n/2) similarity product, merges features (``x * size`` summed) and the (B, n, N) source
    matrix with gather/scatter. First token protected (the release's class-token flag).
    """
    B, N, D = tokens.shape
    x = tokens.detach().float()
    size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device)
    source = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
    for r in schedule:
        t = x.shape[1]
        r = min(int(r), (t - 1) // 2)
        if r <= 0:
            continue
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)

        def merge(y: torch.Tensor, reduce: str) -> torch.Tensor:
            src, dst = y[:, ::2], y[:, 1::2]
            c = y.shape[-1]
            unm = src.gather(1, unm_idx.expand(-1, -1, c))
            src = src.gather(1, src_idx.expand(-1, -1, c))
            dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce=reduce)
            return torch.cat([unm, dst], dim=1)

        x = merge(x * size, "sum")
        size = merge(size, "sum")
        x = x / size
        source = merge(source, "amax")
    return source


def release_dense_dtm_loss(pred: torch.Tensor, target: torch.Tensor, schedules, beta: float = 2.0) -> torch.Tensor:
    """The release's DTM loss: dense aggregation ``source @ x / size``, broadcast back with
    ``source^T @``, smooth-L1 mean over all B x N x C, averaged over levels."""
    losses = []
    for schedule in schedules:
        source = release_dense_membership(target, schedule)
        size = source.sum(-1, keepdim=True)
        u = source.transpose(1, 2) @ ((source @ pred) / size)
        v = source.transpose(1, 2) @ ((source @ target) / size)
        losses.append(F.smooth_l1_loss(u, v, beta=beta))
    return torch.stack(losses).mean()


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median and min wall time (seconds) of ``fn`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def bench_morph(
    batch: int = 64,
    tokens: int = 196,
    dim: int = 512,
    schedules: Sequence[Sequence[int]] = ((14,) * 14, (7,) * 10),
    repeats: int = 5,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """DTM loss forward + backward: tokenmorph vs the release's dense formulation, fp32."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, tokens, dim, generator=gen).to(device)
    pred0 = torch.randn(batch, tokens, dim, generator=gen).to(device)
    schedules = [list(s) for s in schedules]

    def run(loss_fn):
        pred = pred0.clone().requires_grad_(True)
        loss = loss_fn(pred, target, schedules)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.detach(), pred.grad

    ours = lambda p, t, s: dtm_loss(p, t, s)  # noqa: E731
    dense = lambda p, t, s: release_dense_dtm_loss(p, t, s)  # noqa: E731
    loss_ours, grad_ours = run(ours)
    loss_dense, grad_dense = run(dense)
    t_ours = timeit(lambda: run(ours), repeats)
    t_dense = timeit(lambda: run(dense), repeats)
    return {
        "benchmark": "morph",
        "what": "DTM loss forward+backward, fp32",
        "batch": batch,
        "tokens": tokens,
        "dim": dim,
        "schedules": schedules,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "tokenmorph_s": t_ours["median_s"],
        "dense_s": t_dense["median_s"],
        "speedup": t_dense["median_s"] / t_ours["median_s"],
        "repeats": repeats,
        "loss_tokenmorph": float(loss_ours),
        "loss_dense": float(loss_dense),
        "loss_abs_diff": float((loss_ours - loss_dense).abs()),
        "grad_max_abs_diff": float((grad_ours - grad_dense).abs().max()),
    }


def matmul_peak(dtype: torch.dtype = torch.bfloat16, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an (n x n) @ (n x n) product at ``dtype``: the same-run reference peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def mm():
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t = timeit(mm, repeats, warmup=2)
    return 2 * n**3 / t["min_s"]


def _set_naive_attention(module: torch.nn.Module) -> None:
    """Switch timm attention layers to the explicit softmax(QK^T)V path (what the release runs)."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


def bench_pretrain(model: str = "small", teacher: str = "clip-vit-b16", random_init: bool = True, batch_size: int = 16,
                   steps: int = 3, device: str = "cpu", precision: str = "bf16", img_size: int = 224,
                   patch_size: int = 16, baseline: bool = True, seed: int = 0, teacher_weights=None) -> dict:
    """Full DTM pre-training steps on synthetic images, timed per phase.

    Phases: teacher forward, student forward, morph + loss (forward), backward, optimiser (clip + AdamW).
    ``baseline=True`` also times the official release's step on the same models and batch: fp32, the
    explicit attention path, the dense morphing formulation; the ratio of images/s is reported.
    """
    import random as _random

    from torch.utils.flop_counter import FlopCounterMode

    from .losses import DTMLoss
    from .masking import block_mask
    from .models import create_student
    from .teachers import build_teacher

    torch.manual_seed(seed)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    t_model = build_teacher(teacher, weights=teacher_weights, random_init=random_init, amp=amp_dtype is not None,
                            amp_dtype=amp_dtype or torch.bfloat16, patch_size=patch_size, device=dev)
    student = create_student(model, target_dim=t_model.dim, img_size=img_size, patch_size=patch_size).to(dev)
    grid = student.grid
    n = student.num_patches
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
    images = torch.rand(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)).to(dev)
    mask = block_mask(batch_size, grid, num_masked=round(n * 75 / 196), min_num_patches=max(1, round(n * 16 / 196)),
                      seed=seed).to(dev)
    criterion = DTMLoss(num_levels=2)

    def autocast():
        if amp_dtype is None:
            return torch.autocast(dev.type, enabled=False)
        return torch.autocast(dev.type, dtype=amp_dtype)

    def step(phases: Optional[dict], loss_fn, rng) -> None:
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())

        target = t_model(images, grid)
        mark()
        with autocast():
            pred = student(images, mask)
        mark()
        loss = loss_fn(pred, target, criterion.sample_schedules(n, rng))
        mark()
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        if phases is not None:
            for name, a, b in zip(("teacher", "student_forward", "morph_loss", "backward", "optimizer"), marks, marks[1:]):
                phases[name] = phases.get(name, 0.0) + (b - a)

    def run(loss_fn, label: str) -> dict:
        rng = _random.Random(seed)
        step(None, loss_fn, rng)  # warm-up
        phases: dict = {}
        t0 = time.perf_counter()
        for _ in range(steps):
            step(phases, loss_fn, rng)
        total = time.perf_counter() - t0
        return {"label": label, "step_s": total / steps, "images_per_second": batch_size * steps / total,
                "phases_s": {k: v / steps for k, v in phases.items()}}

    ours = run(lambda p, t, s: dtm_loss(p, t, s), "tokenmorph")
    # FLOPs of one step's models (teacher forward, student forward + backward), counted by torch.
    counter = FlopCounterMode(display=False)
    with counter:
        step(None, lambda p, t, s: dtm_loss(p, t, s), _random.Random(seed))
    flops = counter.get_total_flops()
    peak = matmul_peak(amp_dtype or torch.float32, device)
    peak_fp32 = peak if amp_dtype is None else matmul_peak(torch.float32, device)
    result = {
        "benchmark": "pretrain",
        "student": model, "teacher": teacher, "random_init": random_init, "batch_size": batch_size, "steps": steps,
        "device": device, "precision": precision, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "images_per_second": ours["images_per_second"], "step_s": ours["step_s"], "phases_s": ours["phases_s"],
        "model_flops_per_step": flops, "achieved_flops_per_s": flops / ours["step_s"],
        "matmul_peak_flops_per_s": peak, "fraction_of_peak": flops / ours["step_s"] / peak,
        # the ceiling of any precision-only speed-up over an fp32 step on this machine
        "matmul_peak_fp32_flops_per_s": peak_fp32, "peak_ratio_vs_fp32": peak / peak_fp32,
    }
    if baseline:
        t_model.amp = False
        _set_naive_attention(t_model)
        _set_naive_attention(student)
        amp_dtype = None
        base = run(lambda p, t, s: release_dense_dtm_loss(p.float(), t, s), "release")
        result["baseline"] = {"what": "release step: fp32, explicit attention, dense morphing",
                              "images_per_second": base["images_per_second"], "step_s": base["step_s"],
                              "phases_s": base["phases_s"]}
        result["speedup_vs_release"] = ours["images_per_second"] / base["images_per_second"]
    return result


class _Timed:
    """Wraps a callable and adds its wall time (device-synchronised) to ``phases[phase]``; every other
    attribute is the wrapped object's (a teacher's ``name``, ``dim``, ...)."""

    def __init__(self, fn: Callable, phase: str, phases: dict, sync: Callable) -> None:
        self._fn, self._phase, self._phases, self._sync = fn, phase, phases, sync

    def __getattr__(self, name: str):
        return getattr(self._fn, name)

    def __call__(self, *args, **kwargs):
        self._sync()
        t0 = time.perf_counter()
        out = self._fn(*args, **kwargs)
        self._sync()
        self._phases[self._phase] = self._phases.get(self._phase, 0.0) + time.perf_counter() - t0
        return out


def bench_objectives(frameworks: Sequence[str] = ("beit", "mae"), objectives: Sequence[str] = ("mask",),
                     model: str = "small", teacher: str = "pixels", random_init: bool = True, batch_size: int = 16,
                     steps: int = 3, device: str = "cpu", precision: str = "bf16", img_size: int = 224,
                     patch_size: int = 16, decoder: str = "release", mask_ratio: float = 0.75, seed: int = 0,
                     teacher_weights=None) -> dict:
    """The real pre-training step (:class:`tokenmorph.objectives.PretrainObjective`, the students and
    teachers ``tokenmorph pretrain`` builds) for every framework x objective, timed in one run.

    Phases per step (means): teacher (targets), student (forward), rest of the forward (degradation,
    masking gather/scatter, loss), backward, optimiser (clip + AdamW). ``step_s`` is the median step
    after two warm-up steps. Reports each combination's step and its ratios to the BEiT-framework step
    and to plain masking of the same framework.
    """
    from .config import PretrainConfig
    from .objectives import PretrainObjective
    from .pretrain import build_student_and_teacher
    from .train import batch_to_device, collate_keyed

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    n = (img_size // patch_size) ** 2
    frameworks, objectives = list(dict.fromkeys(frameworks)), list(dict.fromkeys(objectives))  # each once
    rows = []
    for framework in frameworks:
        for objective in objectives:
            cfg = PretrainConfig(model=model, img_size=img_size, patch_size=patch_size, teacher=teacher,
                                 teacher_random_init=random_init, teacher_weights=teacher_weights, framework=framework,
                                 objective=objective, decoder=decoder, mask_ratio=mask_ratio, precision=precision,
                                 num_masked=round(n * 75 / 196), min_mask_block=max(1, round(n * 16 / 196)),
                                 drop_path=0.0 if framework == "mae" else 0.1, seed=seed).validate()
            student, t_model = build_student_and_teacher(cfg, dev, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            obj = PretrainObjective(t_model, student.grid, cfg)
            rng = np.random.default_rng(seed)
            side = obj.degradation.view_side
            images = torch.rand(batch_size, 3, side, side, generator=torch.Generator().manual_seed(seed))
            batch = batch_to_device(collate_keyed([(img, 0, obj.sample(rng)) for img in images]), dev)
            opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
            phases: dict = {}
            obj.teacher = _Timed(t_model, "teacher", phases, sync)
            timed_student = _Timed(student, "student_forward", phases, sync)

            logs: dict = {}

            def step(i: int) -> None:
                sync()
                t0 = time.perf_counter()
                with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, step_logs = obj(timed_student, batch, i)
                logs.update(step_logs, loss=float(loss.detach()))
                sync()
                t1 = time.perf_counter()
                phases["forward"] = phases.get("forward", 0.0) + t1 - t0
                loss.backward()
                sync()
                t2 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                phases["backward"] = phases.get("backward", 0.0) + t2 - t1
                phases["optimizer"] = phases.get("optimizer", 0.0) + time.perf_counter() - t2

            step(0)  # warm-up (allocations, kernel selection)
            step(1)
            phases.clear()
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                step(i + 2)
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)  # robust to other jobs on shared cores
            ph = {k: v / steps for k, v in phases.items()}
            ph["loss_and_degradation"] = ph.pop("forward") - ph["teacher"] - ph["student_forward"]
            order = ("teacher", "student_forward", "loss_and_degradation", "backward", "optimizer")
            rows.append({"framework": framework, "objective": objective, "step_s": step_s,
                         "images_per_second": batch_size / step_s, "phases_s": {k: ph[k] for k in order},
                         "params_trained": sum(p.numel() for p in student.parameters() if p.requires_grad),
                         "last_step_logs": dict(logs)})
            del student, t_model, obj, opt
    by = {(r["framework"], r["objective"]): r for r in rows}
    for r in rows:
        beit = by.get(("beit", r["objective"]))
        plain = by.get((r["framework"], "mask"))
        if beit is not None and r["framework"] != "beit":
            r["step_vs_beit"] = r["step_s"] / beit["step_s"]
        if plain is not None and r["objective"] != "mask":
            r["step_vs_mask"] = r["step_s"] / plain["step_s"]
    return {"benchmark": "pretrain-objectives", "student": model, "teacher": teacher, "random_init": random_init,
            "batch_size": batch_size, "steps": steps, "device": device, "precision": precision, "img_size": img_size,
            "patch_size": patch_size, "decoder": decoder, "mask_ratio": mask_ratio, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "results": rows}
