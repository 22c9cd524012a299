"""Fine-tuning a pre-trained backbone: the paper's protocol (docs/method.md 1.6) built from
       timm's
pieces.

timm's BEiT with a classification head (mean-pooled patch tokens + a new ``fc_norm``, or the CLS
token), a relative position table per block started, as the DTM release's documented launch
(``--init_both_rpb``), from the block's own pre-trained table plus the shared one
(``rel_pos_init``: :data:`~tokenmorph.models.layouts.REL_POS_INITS`), weight decay on every
weight but the class token and 1-D parameters (the release's rule: the tables are decayed),
layer-wise lr decay (``timm.optim.param_groups_layer_decay``), RandAugment + random erasing
(``timm.data.create_transform``), Mixup / CutMix with label smoothing (``timm.data.Mixup``), drop
path; the same engine as pre-training (bf16, torchrun, exact resume, metrics.jsonl, progress),
then top-1 / top-5 on the validation split.

A checkpoint of the MAE framework (``student_arch["framework"] == "mae"``) is fine-tuned as in
MAE:
its encoder is timm's ``VisionTransformer`` already, so the model is timm's ViT with the same
shape kwargs; the fixed sin-cos ``pos_embed`` of pre-training becomes a learnable weight
(resampled to the grid when ``img_size`` changes), ``global_pool="avg"`` again replaces ``norm``
by a new ``fc_norm``, and ``rel_pos_init`` does not apply (a ViT has no relative position bias)
and is ignored.
"""

from __future__ import annotations

__all__ = [
    "finetune_no_weight_decay",
    "load_pretrained_student",
    "finetune_arch",
    "build_model",
    "posterize",
    "build_datasets",
    "ClassificationStep",
    "evaluate",
    "finetune",
]


# ------------------------------------------------------------------------------------------
# model
def finetune_no_weight_decay(model, arch: dict) -> set[str]:
    """Names exempt from weight decay besides 1-D parameters (timm's layer-decay groups): for a
    Beit the DTM release's fine-tuning skip list ``{pos_embed, cls_token}``, so the relative
    position tables are decayed (timm's ``no_weight_decay()`` would exempt them); for an MAE ViT
    timm's own list."""
    from ..models.arch import timm_family

    if timm_family(arch) == "beit":
        return {"pos_embed", "cls_token"}
    return set(model.no_weight_decay())


def load_pretrained_student(spec: str):
    """(student, source) of any backbone :func:`~tokenmorph.hub.backbone.resolve_encoder` takes:
    the student of a pre-training checkpoint, or an encoder with the same ``arch``, ``encoder``,
    ``mean`` and ``std`` (an export, a timm Beit or plain ViT); ``ModelError`` for a timm model
    that is neither."""
    from ..errors import ModelError
    from ..hub.backbone import resolve_encoder

    student, source = resolve_encoder(spec, "fine-tuning")
    if student.arch is None:
        raise ModelError(
            f"{spec} is a {type(student.encoder).__name__}; fine-tuning and segmentation take a "
            "timm Beit or a plain VisionTransformer (class token)"
        )
    return student, source


def finetune_arch(cfg, student=None) -> dict:
    """The encoder architecture fine-tuned: the student's, or ``cfg.model``'s shape (a BEiT) from
    scratch."""
    from ..models.arch import STUDENT_SIZES

    if student is not None:
        return student.arch
    d, L, h = STUDENT_SIZES[cfg.model]
    return dict(
        framework="beit",
        img_size=cfg.img_size or 224,
        patch_size=cfg.patch_size,
        embed_dim=d,
        depth=L,
        num_heads=h,
        init_values=0.1,
    )


def build_model(cfg, num_classes: int, student=None, source=None):
    """(timm model, timm kwargs, report): ``student``'s encoder with a new head, or a randomly
    initialised ``cfg.model`` when ``student`` is None. ``report`` lists the keys dropped from /
    added to the weights.

    The model is the timm class of the student's encoder (:mod:`tokenmorph.models.arch`): a Beit
    for a BEiT student or a random init, with a relative position table per block started by
    ``cfg.rel_pos_init`` (or the student's own layout for ``as_pretrained``); a
    VisionTransformer for an MAE student, with a learnable ``pos_embed`` initialised from the
    pre-trained sin-cos one (``rel_pos_init`` does not apply)."""
    import timm

    from ..errors import CheckpointError
    from ..models.arch import framework_of, timm_encoder_kwargs, timm_model_name
    from ..models.layouts import per_block_tables

    arch = finetune_arch(cfg, student)
    img_size = cfg.img_size or arch["img_size"]
    keep = cfg.rel_pos_init == "as_pretrained"
    kwargs = timm_encoder_kwargs(
        arch,
        rel_pos=None if keep or framework_of(arch) == "mae" else "per_block",
        img_size=img_size,
        drop_path_rate=cfg.drop_path,
        num_classes=num_classes,
        global_pool=cfg.global_pool,
    )
    model = timm.create_model(timm_model_name(arch), pretrained=False, **kwargs)
    report = {}
    if student is not None:
        state = student.encoder.state_dict()
        if framework_of(arch) == "mae":
            if (
                img_size != arch["img_size"]
            ):  # resample the position embedding to the new grid, as timm does
                from timm.models.vision_transformer import checkpoint_filter_fn

                state = checkpoint_filter_fn(state, model)
        else:
            if not keep:
                state = per_block_tables(state, arch["depth"], cfg.rel_pos_init)
            if (
                img_size != arch["img_size"]
            ):  # resample the bias tables to the new grid, as timm does
                from timm.models.beit import checkpoint_filter_fn

                state = checkpoint_filter_fn(state, model)
        own = model.state_dict()
        dropped = sorted(k for k in state if k not in own)
        try:
            missing, unexpected = model.load_state_dict(
                {k: v for k, v in state.items() if k in own}, strict=False
            )
        except RuntimeError as e:  # a tensor of another shape
            raise CheckpointError(
                f"pre-trained weights of {source} do not fit the fine-tuning model "
                f"({' '.join(str(e).split())[:300]})"
            ) from None
        if unexpected or any(not k.startswith(("head.", "fc_norm.")) for k in missing):
            raise CheckpointError(
                f"pre-trained weights do not fit the fine-tuning model: missing "
                f"{sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}"
            )
        report = {"source": str(source), "dropped": dropped, "new": sorted(missing)}
    return model, kwargs, report


# -------------------------------------------------------------------------------------------
# data
def posterize(img, bits_to_keep, **__):
    """timm's posterize op, also for 0 bits: RandAugment's 'inc' posterize reaches 0 bits at high
    magnitudes, which Pillow < 13 turned into a black image and Pillow >= 13 rejects."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _use_compatible_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize


def build_datasets(cfg, img_size: int, mean, std, exclude=()):
    """(train, val, class names) with timm's training transform (RandAugment, random erasing) and
    eval transform, grey images as 3 channels; ``exclude``: folders left out of the scans (the
    run folder)."""
    from pathlib import Path

    import torchvision.transforms as T
    from timm.data import create_transform

    from ..data import DataError, ToRGB, build_dataset, default_crop_pct
    from ..data.shards import is_shard_folder

    _use_compatible_posterize()  # before the ops are built: each op keeps its function
    crop = cfg.crop_pct if cfg.crop_pct is not None else default_crop_pct(img_size)
    train_tf = T.Compose(
        [
            ToRGB(),
            create_transform(
                img_size,
                is_training=True,
                auto_augment=cfg.randaug or None,
                interpolation="bicubic",
                re_prob=cfg.reprob,
                re_mode="pixel",
                re_count=1,
                mean=tuple(mean),
                std=tuple(std),
            ),
        ]
    )
    eval_tf = T.Compose(
        [
            ToRGB(),
            create_transform(
                img_size,
                is_training=False,
                interpolation="bicubic",
                crop_pct=crop,
                mean=tuple(mean),
                std=tuple(std),
            ),
        ]
    )
    train = build_dataset(
        cfg.data, train=True, transform=train_tf, labels="folders", exclude=exclude
    )
    if cfg.val_data is not None:
        val = build_dataset(
            cfg.val_data, train=False, transform=eval_tf, labels="folders", exclude=exclude
        )
    elif cfg.data.startswith(("fashion-mnist", "wds:", "hfds:", "hfids:")) or is_shard_folder(
        Path(cfg.data).expanduser()
    ):
        val = build_dataset(cfg.data, train=False, transform=eval_tf, labels="folders")
    else:
        raise DataError(
            f"no validation data for {cfg.data}: pass --val-data DIR (an ImageFolder tree)"
        )
    classes = list(getattr(train, "classes", []) or [])
    if not classes:
        raise DataError(
            f"{cfg.data} has no class labels: fine-tuning needs an ImageFolder tree (one "
            "sub-folder per class)"
        )
    if list(getattr(val, "classes", []) or []) != classes:
        raise DataError(
            f"the validation classes of {cfg.val_data or cfg.data} differ from the training classes"
        )
    return train, val, classes


class ClassificationStep:
    """Engine step: Mixup/CutMix (or label smoothing), then soft-target cross-entropy."""

    def __init__(self, cfg, num_classes: int) -> None:
        import torch
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.smoothing,
                num_classes=num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

    def __call__(self, model, batch: dict, step: int):
        x, y = batch["images"], batch["labels"]
        if self.mixup is not None:
            if x.shape[0] % 2:  # Mixup pairs samples; a skipped image can leave an odd batch
                x, y = x[:-1], y[:-1]
            x, y = self.mixup(x, y)
        return self.criterion(model(x), y), {}


def evaluate(model, dataset, batch_size: int, device, autocast_dtype, num_workers: int = 2) -> dict:
    """Top-1 / top-5 accuracy of ``model`` on ``dataset`` (skipped images are not counted)."""
    import torch
    from torch.utils.data import DataLoader

    from ..data import collate_skip
    from ..runtime.precision import autocast
    from ..runtime.progress import Progress

    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip
    )
    model.eval()
    correct1 = correct5 = total = 0
    with torch.inference_mode(), Progress(len(loader), "evaluate", "batch") as progress:
        for images, labels, _ in loader:
            progress.update(1)
            if images.numel() == 0:
                continue
            images, labels = images.to(device), labels.to(device)
            with autocast(device.type, autocast_dtype):
                logits = model(images)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top5[:, 0] == labels).sum())
            correct5 += int((top5 == labels[:, None]).any(dim=1).sum())
            total += labels.numel()
    return {
        "val_top1": correct1 / max(total, 1),
        "val_top5": correct5 / max(total, 1),
        "val_images": total,
    }


# ------------------------------------------------------------------------------------------ run
def finetune(cfg, dist_info=None):
    """Run (or resume) fine-tuning; returns the summary on rank 0 (None on other ranks).
    Everything that can be refused (settings, run folder, data) is checked before the model is
    built; a finished run is reported and left as it is."""
    from ..runtime.distributed import init_distributed
    from ..runtime.run_folder import RunFolder
    from ..runtime.sampling import check_batch_layout

    cfg.validate()
    dist_info = dist_info or init_distributed(cfg.device)
    check_batch_layout(
        cfg.batch_size, cfg.accum_steps, dist_info.world_size
    )  # before any data or model is built
    with RunFolder.open(cfg, dist_info, "finetune") as folder:
        return _finetune_in(folder, cfg, dist_info)


def _finetune_in(folder, cfg, dist_info):
    import torch
    from timm.optim import param_groups_layer_decay

    from ..data import dataset_stats
    from ..models.arch import timm_model_name
    from ..runtime.engine import Engine
    from ..runtime.sampling import KeyedDataset
    from ..runtime.seeding import mix_seed, seed_all

    seed_all(mix_seed(cfg.seed, 0xF17E))  # the new head's init is part of the run's identity
    student, source = load_pretrained_student(cfg.checkpoint) if cfg.checkpoint else (None, None)
    if student is not None:  # the backbone's own input conventions
        mean, std = (torch.as_tensor(v).flatten().tolist() for v in (student.mean, student.std))
        img_size = cfg.img_size or student.arch["img_size"]
    else:
        mean, std = (list(v) for v in dataset_stats(cfg.data))
        img_size = cfg.img_size or 224
    train_set, val_set, classes = build_datasets(cfg, img_size, mean, std, (folder.path,))
    done = folder.check_data(train_set)
    if done is not None:
        return done
    model, kwargs, report = build_model(cfg, len(classes), student, source)
    model = model.to(dist_info.device)
    groups = param_groups_layer_decay(
        model,
        cfg.weight_decay,
        no_weight_decay_list=finetune_no_weight_decay(model, finetune_arch(cfg, student)),
        layer_decay=cfg.layer_decay,
    )
    compat = {
        "timm_kwargs": {k: v for k, v in kwargs.items() if k != "drop_path_rate"},
        "classes": classes,
    }
    engine = Engine(
        cfg,
        model,
        ClassificationStep(cfg, len(classes)),
        KeyedDataset(train_set, cfg.seed),
        folder.path,
        dist_info,
        kind="finetune",
        compat=compat,
        param_groups=groups,
        extra_state={
            "timm_model": timm_model_name(finetune_arch(cfg, student)),
            "timm_kwargs": kwargs,
            "classes": classes,
            "data_stats": {"mean": list(mean), "std": list(std)},
        },
    )
    if dist_info.is_main and report.get("source"):
        print(
            f"[tokenmorph] backbone {report['source']}: new keys {report['new']}; pre-trained keys "
            "not used "
            f"{report['dropped']}",
            flush=True,
        )
    describe = (
        f"fine-tune {cfg.name}, {len(classes)} classes, {len(train_set)} train / {len(val_set)} "
        "val images, "
        f"{engine.total_steps} steps of {cfg.batch_size}, lr {engine.lr:.3g}, layer decay "
        f"{cfg.layer_decay}, "
        f"output {engine.run_dir}"
    )

    def final_evaluation(summary: dict) -> dict:
        return {
            **evaluate(
                model,
                val_set,
                cfg.eval_batch_size,
                dist_info.device,
                engine.autocast_dtype,
                cfg.num_workers,
            ),
            "classes": len(classes),
        }

    return folder.run(engine, describe, finish=final_evaluation, plot=False)
