"""``tokenmorph bench pretrain``: where a pre-training step's time goes.

:func:`bench_pretrain` times full DTM steps per phase against the release's step;
:func:`bench_objectives` times the real step of ``tokenmorph pretrain`` for every framework x
objective in one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.attention import resolve_attention, set_attention
from ..models.rel_pos import use_deterministic_rel_pos
from ..ops.losses import dtm_loss
from ..runtime.precision import autocast, autocast_dtype
from .release import release_dense_dtm_loss, release_precision
from .timing import Timed, matmul_peak, spec_peak, timeit

__all__ = ["bench_pretrain", "bench_objectives"]


PHASES = ("teacher", "student_forward", "morph_loss", "backward", "optimizer")


def bench_pretrain(
    model: str = "small",
    teacher: str = "clip-vit-b16",
    random_init: bool = True,
    batch_size: int = 16,
    steps: int = 3,
    device: str = "cpu",
    precision: str = "bf16",
    img_size: int = 224,
    patch_size: int = 16,
    baseline: bool = True,
    seed: int = 0,
    teacher_weights=None,
    attention: str = "auto",
    compile: bool = False,
) -> dict:
    """Full DTM pre-training steps on synthetic images, timed per phase.

    Phases: teacher forward, student forward, morph + loss (forward), backward, optimiser (clip +
    AdamW), each with its FLOPs (counted by torch) and its fraction of the bf16 (``precision``)
    matrix-product peak measured in the same run. The student has the release's relative
    position bias (each block's own table plus the shared one) and runs ``attention``'s kernel
    (:func:`~tokenmorph.models.attention.resolve_attention`; both kernels are also timed on one
    of its blocks at this shape); the teacher is prepared as ``tokenmorph pretrain`` prepares it
    (weights at the autocast dtype, folded BatchNorm), and its targets' error against an fp32
    teacher is reported. ``compile``: ``torch.compile`` of student and teacher (the first step,
    with the compilation, is timed apart). ``baseline=True`` also times the official release's
    step on the same models and batch, doing the release's work
    (:func:`~.release.release_precision`): the teacher's fused attention (CLIP's
    ``nn.MultiheadAttention``), the student's explicit attention (``softmax(q k^T + bias) v``),
    the dense morphing formulation, under fp16 autocast with a GradScaler on CUDA and in fp32 on
    a CPU (the release's ``torch.cuda.amp.autocast`` does nothing to CPU tensors); the ratio of
    images/s is reported, with the ratio the precision alone would allow (bf16 / fp32 peak).
    """
    import random as _random

    from ..models import create_student
    from ..models.teachers import build_teacher
    from ..ops.losses import DTMLoss
    from ..ops.masking import block_mask
    from ..runtime.host import tune_host_allocator

    allocator = tune_host_allocator()
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    amp_dtype = autocast_dtype(precision)
    kernel = resolve_attention(attention, dev.type, amp_dtype)

    def make_teacher(amp: torch.dtype | None):
        torch.manual_seed(seed)  # the same random weights for every precision
        return build_teacher(
            teacher,
            weights=teacher_weights,
            random_init=random_init,
            amp=amp is not None,
            amp_dtype=amp or torch.bfloat16,
            patch_size=patch_size,
            device=dev,
        )

    t_model = make_teacher(amp_dtype)
    if t_model.backbone is not None:
        set_attention(t_model, kernel)
    torch.manual_seed(seed)
    student = create_student(
        model, target_dim=t_model.dim, img_size=img_size, patch_size=patch_size, rel_pos="both"
    ).to(dev)
    set_attention(student, kernel)
    grid = student.grid
    n = student.num_patches
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
    images = torch.rand(
        batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)
    ).to(dev)
    mask = block_mask(
        batch_size,
        grid,
        num_masked=round(n * 75 / 196),
        min_num_patches=max(1, round(n * 16 / 196)),
        seed=seed,
    ).to(dev)
    criterion = DTMLoss(num_levels=2)
    kernels = _time_attention_kernels(student, images, amp_dtype, sync)

    def step(setup: dict, phases: dict | None, rng, counters: dict | None = None) -> None:
        counters, scaler, opt = counters or {}, setup["scaler"], setup["opt"]
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())

        with counters.get("teacher", nullcontext()):
            target = setup["teacher"](images, grid)
        mark()
        with counters.get("student_forward", nullcontext()), autocast(dev.type, setup["amp"]):
            pred = setup["student"](images, mask)
        mark()
        # the release computes matching and loss under autocast too
        with counters.get("morph_loss", nullcontext()), autocast(dev.type, setup["amp"]):
            loss = setup["loss"](pred, target, criterion.sample_schedules(n, rng))
        mark()
        with counters.get("backward", nullcontext()):
            (loss if scaler is None else scaler.scale(loss)).backward()
        mark()
        with counters.get("optimizer", nullcontext()):
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(setup["params"], 3.0)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)
        mark()
        if phases is not None:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                phases[name] = phases.get(name, 0.0) + (b - a)

    params = list(student.parameters())
    ours = dict(student=student, teacher=t_model, loss=dtm_loss, amp=amp_dtype, opt=opt)
    ours.update(scaler=None, params=params)
    # FLOPs of one step per phase (teacher forward, student forward, loss, backward, optimiser),
    # counted by torch on the eager models (before any compilation)
    counters = {name: FlopCounterMode(display=False) for name in PHASES}
    step(ours, None, _random.Random(seed), counters)
    phase_flops = {name: c.get_total_flops() for name, c in counters.items()}
    fp32_teacher = None
    if amp_dtype is not None and t_model.backbone is not None:
        fp32_teacher = make_teacher(None)
    setups = {"tokenmorph": ours}
    if baseline:
        setups["release"] = _release_setup(student, fp32_teacher, make_teacher, dev)
    if compile:
        ours["student"] = torch.compile(student)
        if t_model.backbone is not None:
            t_model.compile_features()
    timed = _interleaved(setups, step, steps, seed, amp_dtype, device)
    mine = timed["tokenmorph"]
    compile_s = mine["first_step_s"] if compile else None
    flops = sum(phase_flops.values())
    peak, peak_ratio = timed["matmul_peak"], timed["peak_ratio_vs_fp32"]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    spec = spec_peak(gpu, amp_dtype) if gpu else None
    result = {
        "benchmark": "pretrain",
        "student": model,
        "teacher": teacher,
        "random_init": random_init,
        "batch_size": batch_size,
        "steps": steps,
        "device": device,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "host_allocator": allocator,
        "measurement": "each round: one step of every setup, then the matrix-product peaks; "
        "times are per-round medians, ratios medians of the rounds' ratios",
        "attention": {"setting": attention, "kernel": kernel, **kernels},
        "compile": compile,
        "compile_first_step_s": compile_s,
        "images_per_second": batch_size / mine["step_s"],
        "step_s": mine["step_s"],
        "phases_s": mine["phases_s"],
        "phases_fraction_of_step": {k: v / mine["step_s"] for k, v in mine["phases_s"].items()},
        "model_flops_per_step": flops,
        "phases_flops": phase_flops,
        "achieved_flops_per_s": flops / mine["step_s"],
        "matmul_peak_flops_per_s": peak,
        "fraction_of_peak": statistics.median(flops / t / p for t, p in timed["ours_and_peak"]),
        # each phase's achieved FLOP/s over the same peak (None: a phase without FLOPs counted)
        "phases_fraction_of_peak": {
            k: (phase_flops[k] / t / peak if phase_flops[k] and t > 0 else None)
            for k, t in mine["phases_s"].items()
        },
        # the ceiling of any precision-only speed-up over an fp32 step on this machine
        "matmul_peak_fp32_flops_per_s": timed["matmul_peak_fp32"],
        "peak_ratio_vs_fp32": peak_ratio,
        # the data sheet's dense peak of this GPU at this precision (None when unknown)
        "gpu": gpu,
        "spec_peak_flops_per_s": spec,
        "fraction_of_spec_peak": None if spec is None else flops / mine["step_s"] / spec,
    }
    if fp32_teacher is not None:
        with torch.no_grad():
            ref = fp32_teacher(images, grid)
            low = t_model(images, grid)
        result["teacher_target_error"] = {
            "what": f"targets of the prepared {precision} teacher against an fp32 teacher"
            + (" (compiled)" if compile else ""),
            "relative_l2": float((low - ref).norm() / ref.norm()),
            "min_token_cosine": float(torch.nn.functional.cosine_similarity(low, ref, -1).min()),
        }
    if baseline:
        base = timed["release"]
        fp32 = setups["release"]["amp"] is None
        precision_text = "fp32" if fp32 else "fp16 autocast + GradScaler"
        result["baseline"] = {
            "what": f"release step: {precision_text}, fused teacher attention, explicit student "
            "attention with per-block + shared bias (indexed tables), dense morphing",
            "precision": "fp32" if fp32 else "fp16",
            "images_per_second": batch_size / base["step_s"],
            "step_s": base["step_s"],
            "phases_s": base["phases_s"],
        }
        result["speedup_vs_release"] = timed["speedup"]
        # the target: >= 90% of what the precision alone allows over an fp32 baseline
        if fp32:
            result["speedup_vs_release_over_peak_ratio"] = timed["speedup_over_peak_ratio"]
    return result


def _release_setup(student, fp32_teacher, make_teacher, dev) -> dict:
    """The release's step on the same models: a copy of the student reading its tables by
    indexing (modeling_finetune.Attention's explicit ``softmax(q k^T + bias) v``), the teacher
    with fp32 weights and CLIP's fused attention, fp16 autocast + GradScaler on CUDA, fp32 on a
    CPU (:func:`~.release.release_precision`), the dense morphing loss."""
    import copy

    release_amp = release_precision(dev.type)
    base_teacher = fp32_teacher if release_amp is None and fp32_teacher else make_teacher(None)
    base_teacher.amp, base_teacher.amp_dtype = release_amp is not None, release_amp
    if base_teacher.backbone is not None:
        set_attention(base_teacher, "sdpa")  # CLIP's fused nn.MultiheadAttention
    base_student = copy.deepcopy(student)
    set_attention(base_student, "explicit")
    use_deterministic_rel_pos(base_student, enabled=False)
    params = list(base_student.parameters())
    return dict(
        student=base_student,
        teacher=base_teacher,
        loss=release_dense_dtm_loss,
        amp=release_amp,
        opt=torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05),
        scaler=torch.amp.GradScaler(dev.type) if release_amp is not None else None,
        params=params,
    )


def _interleaved(setups: dict, step, steps: int, seed: int, amp_dtype, device) -> dict:
    """Warm-up step of each setup, then ``steps`` rounds of one step of each setup followed by
    the matrix-product peaks (bf16 / fp32, best of 2 products each), so every ratio compares
    numbers taken within seconds of each other on a machine whose speed drifts. Per setup:
    ``first_step_s`` and the per-round medians ``step_s`` / ``phases_s``; ``matmul_peak`` (and
    ``_fp32``) the rounds' medians; ``speedup`` (release step / ours) and
    ``speedup_over_peak_ratio`` the medians of the rounds' ratios."""
    import random as _random

    rngs = {name: _random.Random(seed) for name in setups}
    out = {name: {"steps": [], "phases": []} for name in setups}
    for name, setup in setups.items():
        t0 = time.perf_counter()
        step(setup, None, rngs[name])  # warm-up (and compilation)
        out[name]["first_step_s"] = time.perf_counter() - t0
    peaks, peaks32 = [], []
    for _ in range(steps):
        for name, setup in setups.items():
            phases: dict = {}
            t0 = time.perf_counter()
            step(setup, phases, rngs[name])
            out[name]["steps"].append(time.perf_counter() - t0)
            out[name]["phases"].append(phases)
        peaks.append(matmul_peak(amp_dtype or torch.float32, device, repeats=2))
        peaks32.append(
            peaks[-1] if amp_dtype is None else matmul_peak(torch.float32, device, repeats=2)
        )
    med = statistics.median
    for r in out.values():
        r["step_s"] = med(r["steps"])
        r["phases_s"] = {k: med(p[k] for p in r["phases"]) for k in PHASES}
    ours = out["tokenmorph"]["steps"]
    out["ours_and_peak"] = list(zip(ours, peaks))
    out["matmul_peak"], out["matmul_peak_fp32"] = med(peaks), med(peaks32)
    out["peak_ratio_vs_fp32"] = med(a / b for a, b in zip(peaks, peaks32))
    if "release" in setups:
        base = out["release"]["steps"]
        out["speedup"] = med(b / a for a, b in zip(ours, base))
        out["speedup_over_peak_ratio"] = med(
            b / a / (p / q) for a, b, p, q in zip(ours, base, peaks, peaks32)
        )
    return out


def _time_attention_kernels(student, images, amp_dtype, sync, repeats: int = 3) -> dict:
    """Forward + backward of the student's first block with each attention kernel at this
    batch's shape: ``{"sdpa_s": ..., "explicit_s": ..., "fastest": ...}`` (median seconds)."""
    import copy

    enc = student.encoder
    b, n = images.shape[0], 1 + student.num_patches
    x = torch.randn(b, n, enc.embed_dim, device=images.device, requires_grad=True)
    block = copy.deepcopy(enc.blocks[0])
    with torch.no_grad():
        shared = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
    out = {}
    for kernel in ("sdpa", "explicit"):
        set_attention(block, kernel)

        def fwd_bwd():
            with autocast(x.device.type, amp_dtype):
                y = block(x, shared_rel_pos_bias=shared)
            y.float().sum().backward()
            sync()

        out[f"{kernel}_s"] = timeit(fwd_bwd, repeats, warmup=1)["median_s"]
    out["fastest"] = min(("sdpa", "explicit"), key=lambda k: out[f"{k}_s"])
    return out


def bench_objectives(
    frameworks: Sequence[str] = ("beit", "mae"),
    objectives: Sequence[str] = ("mask",),
    model: str = "small",
    teacher: str = "pixels",
    random_init: bool = True,
    batch_size: int = 16,
    steps: int = 3,
    device: str = "cpu",
    precision: str = "bf16",
    img_size: int = 224,
    patch_size: int = 16,
    decoder: str = "release",
    mask_ratio: float = 0.75,
    seed: int = 0,
    teacher_weights=None,
) -> dict:
    """The real pre-training step (:class:`tokenmorph.objectives.PretrainObjective`, the students
    and teachers ``tokenmorph pretrain`` builds) for every framework x objective, timed in one
    run.

    Phases per step (means): teacher (targets), student (forward), rest of the forward
    (degradation, masking gather/scatter, loss), backward, optimiser (clip + AdamW). ``step_s``
    is the median step after two warm-up steps. Reports each combination's step and its ratios to
    the BEiT-framework step and to plain masking of the same framework.
    """
    from ..recipes.config import PretrainConfig
    from ..recipes.objectives import PretrainObjective
    from ..recipes.pretrain import build_student_and_teacher
    from ..runtime.sampling import batch_to_device, collate_keyed

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    amp_dtype = autocast_dtype(precision)
    n = (img_size // patch_size) ** 2
    frameworks, objectives = (
        list(dict.fromkeys(frameworks)),
        list(dict.fromkeys(objectives)),
    )  # each once
    rows = []
    for framework in frameworks:
        for objective in objectives:
            cfg = PretrainConfig(
                model=model,
                img_size=img_size,
                patch_size=patch_size,
                teacher=teacher,
                teacher_random_init=random_init,
                teacher_weights=teacher_weights,
                framework=framework,
                objective=objective,
                decoder=decoder,
                mask_ratio=mask_ratio,
                precision=precision,
                num_masked=round(n * 75 / 196),
                min_mask_block=max(1, round(n * 16 / 196)),
                drop_path=0.0 if framework == "mae" else 0.1,
                seed=seed,
            ).validate()
            stats = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            student, t_model = build_student_and_teacher(cfg, dev, *stats)
            obj = PretrainObjective(t_model, student.grid, cfg, stats)
            rng = np.random.default_rng(seed)
            side = obj.degradation.view_side
            images = torch.rand(
                batch_size, 3, side, side, generator=torch.Generator().manual_seed(seed)
            )
            batch = batch_to_device(
                collate_keyed([(img, 0, obj.sample(rng)) for img in images]), dev
            )
            opt = torch.optim.AdamW(
                [p for p in student.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95)
            )
            phases: dict = {}
            obj.teacher = Timed(t_model, "teacher", phases, sync)
            timed_student = Timed(student, "student_forward", phases, sync)

            logs: dict = {}

            def step(i: int) -> None:
                sync()
                t0 = time.perf_counter()
                with torch.autocast(
                    dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    loss, step_logs = obj(timed_student, batch, i)
                logs.update({k: float(v) for k, v in step_logs.items()}, loss=float(loss))
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
            rows.append(
                {
                    "framework": framework,
                    "objective": objective,
                    "step_s": step_s,
                    "images_per_second": batch_size / step_s,
                    "phases_s": {k: ph[k] for k in order},
                    "params_trained": sum(
                        p.numel() for p in student.parameters() if p.requires_grad
                    ),
                    "last_step_logs": dict(logs),
                }
            )
    by = {(r["framework"], r["objective"]): r for r in rows}
    for r in rows:
        beit = by.get(("beit", r["objective"]))
        plain = by.get((r["framework"], "mask"))
        if beit is not None and r["framework"] != "beit":
            r["step_vs_beit"] = r["step_s"] / beit["step_s"]
        if plain is not None and r["objective"] != "mask":
            r["step_vs_mask"] = r["step_s"] / plain["step_s"]
    return {
        "benchmark": "pretrain-objectives",
        "student": model,
        "teacher": teacher,
        "random_init": random_init,
        "batch_size": batch_size,
        "steps": steps,
        "device": device,
        "precision": precision,
        "img_size": img_size,
        "patch_size": patch_size,
        "decoder": decoder,
        "mask_ratio": mask_ratio,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": rows,
    }
