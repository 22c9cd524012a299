"""Semantic-segmentation fine-tuning: BEiT's ADE20K protocol (UperNet on a ViT) in the shared
engine, so resume, DDP, bf16, logs and checkpoints work as for every run.

The backbone is a tokenmorph checkpoint of either framework, an export, any timm ViT
(``timm:NAME``) or a random init. A tokenmorph encoder becomes the classification fine-tuning
model first (:func:`tokenmorph.recipes.finetune.build_model`: each block's relative position
bias initialised as fine-tuning does it, an MAE encoder's position embedding made learnable), at
its pre-training size; its bias tables (or position embedding) are then resampled to the crop's
grid (:func:`tokenmorph.models.segmentation.resize_rel_pos_table`: the release's cubic spline
by default). The features of four blocks go through BEiT's multi-scale neck into UperNet with an
auxiliary FCN head (:class:`tokenmorph.models.segmentation.UperNetSegmentor`); AdamW with BEiT's
layer-wise lr decay, poly decay after a linear warm-up; mmseg's training pipeline
(:class:`tokenmorph.data.segmentation.SegTrainTransform`); at the end, mIoU / mAcc / aAcc on the
validation set by sliding-window (or whole-image) inference, and the per-class table in the run
folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..runtime.run_logger import dump_json

__all__ = [
    "parse_out_indices",
    "segmentation_backbone",
    "build_segmentor",
    "build_transforms",
    "SegmentationStep",
    "evaluate_segmentation",
    "per_class_table",
    "write_segmentation_report",
    "segment",
]


def parse_out_indices(text: str, depth: int) -> list[int]:
    """``"auto"`` -> BEiT's four blocks for ``depth``; ``"3,5,7,11"`` -> [3, 5, 7, 11]
    (``ConfigError`` past the last block)."""
    from ..models.segmentation import default_out_indices

    if text == "auto":
        return default_out_indices(depth)
    indices = [int(v) for v in text.split(",")]
    if max(indices) >= depth:
        raise ConfigError(f"out_indices={text}: the backbone has {depth} blocks (0 to {depth - 1})")
    return indices


def _resize_state(state: dict, model: nn.Module, method: str) -> dict:
    """``state`` of a model at another input size -> ``model``'s grid: every relative position
    bias table by ``method`` (:func:`~tokenmorph.models.segmentation.resize_rel_pos_table`), an
    absolute position embedding bicubically (timm's ``resample_abs_pos_embed``, the CLS row
    kept, as BEiT's and MAE's segmentation loaders)."""
    from timm.layers import resample_abs_pos_embed

    from ..models.segmentation import resize_rel_pos_table

    own = model.state_dict()
    out = {}
    suffix = ".relative_position_bias_table"
    for k, v in state.items():
        if k in own and v.shape != own[k].shape:
            if k.endswith("relative_position_bias_table"):
                owner = model.get_submodule(k[: -len(suffix)])
                v = resize_rel_pos_table(v, tuple(owner.window_size), method)
            elif k == "pos_embed":
                v = resample_abs_pos_embed(
                    v, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=1
                )
        out[k] = v
    return out


def _as_list(v) -> list[float]:
    return [float(x) for x in torch.as_tensor(v).flatten().tolist()]


def segmentation_backbone(
    spec: str | None,
    img_size: int,
    *,
    drop_path: float = 0.0,
    rel_pos_init: str = "own_plus_shared",
    rel_pos_resize: str = "release",
    random_init: bool = False,
    model_size: str = "base",
    patch_size: int = 16,
) -> tuple[nn.Module, dict]:
    """A timm ViT (``Beit`` or ``VisionTransformer``) for ``img_size`` inputs, and a record
    (``source``, ``timm_model``, ``timm_kwargs``, ``mean``, ``std`` of [0, 1] inputs, ``report``
    of keys dropped / added).

    ``spec``: any backbone :func:`~tokenmorph.hub.backbone.resolve_encoder` takes; ``timm:NAME``
    and ``hf-hub:NAME`` are built by timm at ``img_size`` (their weights resampled by timm;
    ``random_init`` for none); None: a random ``model_size`` BEiT. Fine-tuning's model
    (classification fine-tuning's :func:`~tokenmorph.recipes.finetune.build_model`, with
    ``rel_pos_init``) is built at the encoder's own size, then its tables are resampled to
    ``img_size`` by ``rel_pos_resize``."""
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ..hub.backbone import resolve_encoder
    from ..models.arch import timm_model_name
    from .config import FinetuneConfig
    from .finetune import build_model, finetune_arch, load_pretrained_student

    if spec is not None and spec.startswith(("timm:", "hf-hub:")):
        kwargs = dict(num_classes=0, img_size=img_size, drop_path_rate=drop_path)
        enc, _ = resolve_encoder(spec, "segmentation", random_init, **kwargs)
        vit = enc.encoder
        if not (hasattr(vit, "blocks") and hasattr(vit, "forward_intermediates")):
            raise ModelError(f"{spec} is not a plain ViT (blocks + forward_intermediates)")
        info = dict(timm_model=spec.split(":", 1)[1], timm_kwargs=kwargs, report={})
        return vit, {"source": spec, **info, "mean": list(enc.mean), "std": list(enc.std)}
    # classification fine-tuning's model of this encoder, with its class token and final norm
    ft = FinetuneConfig(
        model=model_size,
        patch_size=patch_size,
        drop_path=drop_path,
        global_pool="token",
        rel_pos_init=rel_pos_init,
    )
    if spec is None:
        ft.img_size = img_size
        vit, kwargs, report = build_model(ft, 0)
        arch, source = finetune_arch(ft), "random init"
        mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    else:
        encoder, path = load_pretrained_student(spec)
        vit, kwargs, report = build_model(ft, 0, encoder, path)
        arch, source = encoder.arch, str(path)
        mean, std = _as_list(encoder.mean), _as_list(encoder.std)
        if img_size != arch["img_size"]:
            kwargs = {**kwargs, "img_size": img_size}
            target = timm.create_model(timm_model_name(arch), pretrained=False, **kwargs)
            target.load_state_dict(_resize_state(vit.state_dict(), target, rel_pos_resize))
            vit = target
    info = dict(timm_model=timm_model_name(arch), timm_kwargs=kwargs, report=report)
    return vit, {"source": source, **info, "mean": mean, "std": std}


def build_segmentor(cfg, num_classes: int):
    """(:class:`~tokenmorph.models.segmentation.UperNetSegmentor`, backbone record) of a
    :class:`~tokenmorph.recipes.config.SegmentConfig`."""
    from ..models.segmentation import UperNetSegmentor, ViTFeatures

    vit, info = segmentation_backbone(
        cfg.checkpoint,
        cfg.crop_size,
        drop_path=cfg.drop_path,
        rel_pos_init=cfg.rel_pos_init,
        rel_pos_resize=cfg.rel_pos_resize,
        random_init=cfg.random_init,
        model_size=cfg.model,
        patch_size=cfg.patch_size,
    )
    patch = vit.patch_embed.patch_size[0]
    if cfg.crop_size % patch:
        raise ConfigError(f"crop_size={cfg.crop_size} is not a multiple of the patch size {patch}")
    if cfg.grad_checkpointing:
        vit.set_grad_checkpointing(True)
    indices = parse_out_indices(cfg.out_indices, len(vit.blocks))
    model = UperNetSegmentor(
        ViTFeatures(vit, indices),
        num_classes,
        channels=cfg.head_channels,
        aux_channels=cfg.aux_channels,
        aux_weight=cfg.aux_weight,
        dropout=cfg.dropout,
        classifier_init=cfg.classifier_init,
    )
    return model, {**info, "out_indices": indices, "depth": len(vit.blocks), "patch_size": patch}


def build_transforms(cfg, mean, std):
    """(train, eval) transforms of a SegmentConfig: mmseg's ADE20K pipelines at its sizes."""
    from ..data.segmentation import SegEvalTransform, SegTrainTransform

    scale = (cfg.scale_long, cfg.scale_short)
    train = SegTrainTransform(
        crop=cfg.crop_size,
        mean=mean,
        std=std,
        scale=scale,
        ratio_range=(cfg.ratio_min, cfg.ratio_max),
        cat_max_ratio=cfg.cat_max_ratio,
        flip_prob=0.5 if cfg.hflip else 0.0,
        photometric=cfg.photometric,
    )
    return train, SegEvalTransform(mean=mean, std=std, scale=scale)


class SegmentationStep:
    """Engine step: the segmentor's training forward (its loss and per-head logs)."""

    def __call__(self, model, batch: dict, step: int):
        return model(batch["images"], batch["labels"])


def evaluate_segmentation(
    model: nn.Module,
    dataset,
    num_classes: int,
    crop: int,
    stride: int,
    mode: str,
    device,
    autocast_dtype=None,
    batch_size: int = 1,
    num_workers: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """mIoU / mAcc / aAcc of ``model`` (``x -> logits``) on ``dataset`` (items ``(image (3, h,
    w), mask (H, W))`` of :class:`~tokenmorph.data.segmentation.SegEvalTransform`, or None for a
    skipped pair): each image's logits by ``mode`` (``slide``: ``crop`` windows every ``stride``;
    ``whole``), resized bilinearly to the mask's original size, argmax, summed into one confusion
    matrix on ``device``. Returns :func:`~tokenmorph.ops.segmentation.segmentation_metrics` plus
    ``val_images`` and ``skipped_images``."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from ..data import DataError, collate_skip
    from ..ops.segmentation import (
        confusion_matrix,
        resize_logits,
        segmentation_metrics,
        slide_inference,
        whole_inference,
    )
    from ..runtime.precision import autocast

    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip
    )
    was_training = model.training
    model.eval()

    def logits_fn(x):
        with autocast(device.type, autocast_dtype):
            return model(x)

    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    images = skipped = 0
    try:
        with torch.inference_mode():
            for x, masks, n_skipped in tqdm(
                loader, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True
            ):
                skipped += n_skipped
                if x.numel() == 0:
                    continue
                x, masks = x.to(device), masks.to(device)
                if mode == "slide":
                    logits = slide_inference(logits_fn, x, crop, stride)
                else:
                    logits = whole_inference(logits_fn, x, crop)
                pred = resize_logits(logits, masks.shape[-2:]).argmax(dim=1)
                cm += confusion_matrix(pred, masks, num_classes)
                images += len(x)
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        raise DataError(
            "validation images of different sizes cannot share a batch: use eval_batch_size=1"
        ) from None
    finally:
        model.train(was_training)
    return {
        **segmentation_metrics(cm),
        "val_images": images,
        "skipped_images": skipped,
        "confusion_matrix": cm.cpu(),
    }


def per_class_table(metrics: dict, classes) -> str:
    """A Markdown table: class, IoU, Acc (in %, "n/a" for NaN), labelled pixels; the means
    last."""

    def pct(v):
        return "n/a" if v != v else f"{100 * v:.2f}"

    lines = ["| class | IoU | Acc | pixels |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {pct(iou)} | {pct(acc)} | {px} |"
        for name, iou, acc, px in zip(classes, metrics["IoU"], metrics["Acc"], metrics["pixels"])
    ]
    lines.append(
        f"| **mean** | **{pct(metrics['mIoU'])}** | **{pct(metrics['mAcc'])}** | "
        f"aAcc {pct(metrics['aAcc'])} |"
    )
    return "\n".join(lines)


def write_segmentation_report(folder, metrics: dict, classes, extra: dict | None = None) -> dict:
    """``folder/per_class.md`` (the table) and ``folder/segmentation_metrics.json`` (metrics,
    per-class values by name, NaN as null, and ``extra``); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table, record = folder / "per_class.md", folder / "segmentation_metrics.json"
    table.write_text(per_class_table(metrics, classes) + "\n")

    record.write_text(
        dump_json(  # NaN (a class never seen) -> null
            {
                **{k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")},
                "val_images": metrics.get("val_images"),
                "per_class": {
                    name: {"IoU": i, "Acc": a, "pixels": p}
                    for name, i, a, p in zip(
                        classes, metrics["IoU"], metrics["Acc"], metrics["pixels"]
                    )
                },
                **(extra or {}),
            },
            indent=2,
        )
    )
    return {"per_class_table": str(table), "metrics_file": str(record)}


# ------------------------------------------------------------------------------------------ run
def segment(cfg, dist_info=None):
    """Run (or resume) segmentation fine-tuning; returns the summary on rank 0 (None on the other
    ranks)."""
    from ..data.segmentation import segmentation_datasets
    from ..runtime.distributed import init_distributed
    from ..runtime.run_folder import RunFolder
    from ..runtime.sampling import check_batch_layout

    cfg.validate()
    dist_info = dist_info or init_distributed(cfg.device)
    check_batch_layout(cfg.batch_size, cfg.accum_steps, dist_info.world_size)
    # settings, run folder and data are checked before the model is built
    with RunFolder.open(cfg, dist_info, "segment") as folder:
        train_set, val_set, classes = segmentation_datasets(
            cfg.data, cfg.val_data, cfg.num_classes, cfg.reduce_zero_label, cfg.on_bad_image
        )
        done = folder.check_data(train_set)
        if done is not None:
            return done
        return _segment_in(folder, cfg, dist_info, train_set, val_set, classes)


def _segment_in(folder, cfg, dist_info, train_set, val_set, classes):
    from ..runtime.engine import Engine
    from ..runtime.optim import layer_decay_param_groups
    from ..runtime.sampling import KeyedDataset
    from ..runtime.seeding import mix_seed, seed_all

    seed_all(mix_seed(cfg.seed, 0x5E6))  # the heads' init is part of the run's identity
    model, info = build_segmentor(cfg, len(classes))
    train_set.transform, val_set.transform = build_transforms(cfg, info["mean"], info["std"])
    model = model.to(dist_info.device)
    if dist_info.distributed and dist_info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the release's SyncBN
    groups = layer_decay_param_groups(
        model,
        cfg.weight_decay,
        cfg.layer_decay,
        info["depth"],
        prefix="backbone.vit.",
        rule=cfg.weight_decay_rule,
    )
    described = {
        "timm_model": info["timm_model"],
        "timm_kwargs": {k: v for k, v in info["timm_kwargs"].items() if k != "drop_path_rate"},
        "out_indices": info["out_indices"],
        "classes": list(classes),
        "head_channels": cfg.head_channels,
        "aux_channels": cfg.aux_channels,
        "crop_size": cfg.crop_size,
    }
    engine = Engine(
        cfg,
        model,
        SegmentationStep(),
        KeyedDataset(train_set, cfg.seed),
        folder.path,
        dist_info,
        kind="segment",
        compat=described,
        param_groups=groups,
        extra_state={
            "segmentor": {**described, "data_stats": {"mean": info["mean"], "std": info["std"]}}
        },
    )
    missing = train_set.num_missing + val_set.num_missing
    if dist_info.is_main:
        report = info["report"]
        print(
            f"[tokenmorph] backbone {info['source']} ({info['timm_model']}, blocks "
            f"{info['out_indices']}); new keys {report.get('new', [])}; pre-trained keys not used "
            f"{report.get('dropped', [])}",
            flush=True,
        )
    describe = (
        f"segment {cfg.name}, {len(classes)} classes, {len(train_set)} train / {len(val_set)} val "
        f"pairs ({missing} images without a mask skipped), {engine.total_steps} steps of "
        f"{cfg.batch_size}, crop {cfg.crop_size}, lr {engine.lr:.3g} ({cfg.lr_schedule}), layer "
        f"decay {cfg.layer_decay}, output {engine.run_dir}"
    )

    def final_evaluation(summary: dict) -> dict:
        metrics = evaluate_segmentation(
            model,
            val_set,
            len(classes),
            cfg.crop_size,
            cfg.eval_stride,
            cfg.eval_mode,
            dist_info.device,
            engine.autocast_dtype,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            limit=cfg.limit_val,
        )
        files = write_segmentation_report(
            engine.run_dir, metrics, classes, {"eval_mode": cfg.eval_mode, "step": engine.step}
        )
        return {
            "mIoU": metrics["mIoU"],
            "mAcc": metrics["mAcc"],
            "aAcc": metrics["aAcc"],
            "val_images": metrics["val_images"],
            "val_skipped": metrics["skipped_images"],
            "images_without_mask": missing,
            "classes": len(classes),
            **files,
        }

    return folder.run(engine, describe, finish=final_evaluation, plot=False)
