"""Pre-training: build data, teacher, student and objective from a config, then run the engine."""

from __future__ import annotations

import torch

from ..data import build_dataset, dataset_stats, pretrain_transform
from ..data.device_decode import DeviceAugment
from ..models import DECODER_PRESETS, StudentRecord, create_mae_student, create_student
from ..models.attention import resolve_attention, set_attention
from ..models.teachers import build_teacher
from ..runtime.distributed import DistInfo, init_distributed
from ..runtime.engine import Engine
from ..runtime.precision import autocast_dtype
from ..runtime.resume import FIXED, keys_of_kind
from ..runtime.run_folder import RunFolder
from ..runtime.sampling import check_batch_layout, keyed_data
from ..runtime.seeding import mix_seed, seed_all
from .config import PretrainConfig
from .objectives import PretrainObjective, resolve_loss, view_side

__all__ = ["decoder_shape", "build_student_and_teacher", "pretrain"]


def decoder_shape(cfg: PretrainConfig) -> dict:
    """framework=mae: decoder depth, width and heads from the preset, with ``decoder_depth`` /
    ``decoder_dim`` / ``decoder_heads`` on top (another width without ``decoder_heads``: width /
    32 heads)."""
    depth, dim, heads = DECODER_PRESETS[cfg.decoder]
    width = cfg.decoder_dim or dim
    heads = cfg.decoder_heads or (heads if width == dim else max(width // 32, 1))
    return dict(decoder_depth=cfg.decoder_depth or depth, decoder_dim=width, decoder_heads=heads)


def build_student_and_teacher(cfg: PretrainConfig, device: torch.device, mean=None, std=None):
    """(student, teacher) on ``device``; ``mean``/``std`` normalise the student's input (data set
    stats)."""
    if mean is None or std is None:
        mean, std = dataset_stats(cfg.data)
    # random inits (the student, a random teacher) are part of a run's identity: rebuilt
    # identically on resume
    seed_all(mix_seed(cfg.seed, 0xB11D))
    amp_dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    kwargs = dict(cfg.teacher_kwargs)
    # pixel targets use the student's patch; a timm teacher keeps its own unless teacher_kwargs
    # sets one
    patch_size = kwargs.pop("patch_size", cfg.patch_size if cfg.teacher == "pixels" else None)
    if cfg.teacher == "pixels":  # joint / input normalise the image as the student's input
        kwargs.setdefault("norm", cfg.pixel_norm)
        kwargs.setdefault("mean", tuple(mean))
        kwargs.setdefault("std", tuple(std))
    teacher = build_teacher(
        cfg.teacher,
        weights=cfg.teacher_weights,
        random_init=cfg.teacher_random_init,
        input_size=cfg.teacher_input_size,
        normalization=cfg.teacher_normalization,
        amp=cfg.precision != "fp32",
        amp_dtype=amp_dtype,
        patch_size=patch_size,
        device=device,
        **kwargs,
    )
    if teacher.backbone is not None:  # the run's kernel rule (the student's: the engine's)
        set_attention(
            teacher, resolve_attention(cfg.attention, device.type, autocast_dtype(cfg.precision))
        )
        if cfg.compile:
            teacher.compile_features()
    common = dict(
        target_dim=teacher.dim,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        drop_path_rate=cfg.drop_path,
        mean=mean,
        std=std,
        depth=cfg.depth,
    )
    if cfg.framework == "mae":
        student = create_mae_student(cfg.model, **common, **decoder_shape(cfg)).to(device)
    else:
        student = create_student(
            cfg.model,
            **common,
            init_values=cfg.layer_scale_init,
            rel_pos=cfg.rel_pos_bias,
            init=cfg.init,
        ).to(device)
    student.grad_checkpointing = cfg.grad_checkpointing
    return student, teacher


def pretrain(cfg: PretrainConfig, dist_info: DistInfo | None = None) -> dict:
    """Run (or resume) pre-training as configured; returns the summary (also in summary.json).
    Everything that can be refused (settings, run folder, data) is checked before a model is
    built; a finished run is reported and left as it is."""
    cfg.validate()
    dist_info = dist_info or init_distributed(cfg.device)
    check_batch_layout(
        cfg.batch_size, cfg.accum_steps, dist_info.world_size
    )  # before any data or model is built
    with RunFolder.open(cfg, dist_info, "pretrain") as folder:
        dataset = build_dataset(
            cfg.data,
            train=True,
            on_error=cfg.on_bad_image,
            transform=_transform(cfg),
            exclude=(folder.path,),
            stream=True,  # wds: read as a stream, its position saved in the checkpoints
        )
        done = folder.check_data(dataset)
        if done is not None:
            return done
        resuming = folder.checkpoint is not None
        engine, describe = _build_engine(cfg, dist_info, dataset, folder.path, resuming)
        return folder.run(engine, describe)


def _transform(cfg: PretrainConfig):
    """The loader's augmentation: decoded in the workers (``decode=cpu``), or only its
    parameters drawn there and the images decoded on the device (``decode=device``)."""
    # the loader crops the objective's view (the input side, or the larger zoom-in view)
    args = (
        view_side(cfg),
        (cfg.crop_scale_min, 1.0),
        cfg.color_jitter,
        cfg.hflip,
        cfg.crop_interpolation,
    )
    if cfg.decode == "device":
        return DeviceAugment(*args, on_error=cfg.on_bad_image)
    # uint8: normalised on the device (batch_to_device), 4x less shared memory
    return pretrain_transform(*args, uint8=True)


def _build_engine(
    cfg: PretrainConfig, dist_info: DistInfo, dataset, run_dir, resuming: bool = False
) -> tuple:
    """(engine, banner text): teacher, student and objective of ``cfg`` on ``dataset``;
    ``init_from`` (or its older name ``init_weights``) is loaded unless the run resumes (its
    checkpoint holds the weights)."""
    mean, std = dataset_stats(cfg.data)
    student, teacher = build_student_and_teacher(cfg, dist_info.device, mean, std)
    init_note = ""
    source = cfg.init_from or cfg.init_weights
    if source is not None and not resuming:
        from ..hub.init_from import init_student

        init_note = f", initialised from {init_student(student, source, cfg.init_strict)}"
    objective = PretrainObjective(teacher, student.grid, cfg, (mean, std))
    record = StudentRecord(
        cfg.framework, cfg.model, student.arch, teacher.dim, cfg.teacher, tuple(mean), tuple(std)
    )
    compat = {k: getattr(cfg, k) for k in keys_of_kind(cfg, FIXED)} | {
        "target_dim": teacher.dim,
        "loss": resolve_loss(cfg),
    }
    monitor, monitor_note = _build_monitor(cfg, dist_info)
    engine = Engine(
        cfg,
        student,
        objective,
        keyed_data(dataset, cfg.seed, extra_fn=objective.sample),
        run_dir,
        dist_info,
        kind="pretrain",
        compat=compat,
        extra_state=record.checkpoint_entries(),
        unused=objective.unused_parameters(),
        monitor=monitor,
        monitor_every=cfg.monitor_every,
    )
    n_params = sum(p.numel() for p in student.parameters())
    what = f"{cfg.framework} framework, objective {cfg.objective}, {resolve_loss(cfg)} loss"
    describe = (
        f"{cfg.name} ({what}), student {cfg.model} ({n_params / 1e6:.1f} M params, grid "
        f"{student.grid[0]}x"
        f"{student.grid[1]}), teacher {cfg.teacher} ({teacher.dim}-d), {len(dataset)} images, "
        f"{engine.total_steps} steps of {cfg.batch_size}, lr {engine.lr:.3g}, "
        f"{dist_info.world_size} process(es) "
        f"on {dist_info.device}, output {engine.run_dir}{init_note}{monitor_note}"
    )
    return engine, describe


def _build_monitor(cfg: PretrainConfig, dist_info: DistInfo) -> tuple:
    """(the k-NN monitor or None, its banner text). Every process builds its data (cheap), so a
    bad monitor_data fails on all of them at once; only the main process runs it."""
    if cfg.monitor_every is None:
        return None, ""
    from ..errors import DataError
    from ..runtime.monitor import KnnMonitor

    try:
        monitor = KnnMonitor(
            cfg.monitor_eval_data(),
            cfg.img_size,
            dist_info.device,
            k=cfg.monitor_k,
            # the run's precision, with the run's attention kernel (the explicit product makes
            # bf16 3x faster than fp32 on a CPU: 8 s instead of 25 s per point in the main job)
            amp_dtype=autocast_dtype(cfg.precision),
        )
    except DataError as e:
        raise DataError(f"monitor_data={cfg.monitor_data}: {e}") from None
    return monitor, f", k-NN monitor every {cfg.monitor_every} steps ({monitor.describe()})"
