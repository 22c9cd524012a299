"""The frozen-feature segmentation probe (DINOv2's linear protocol); the program is
``tokenmorph eval seg-linear`` (:mod:`tokenmorph.commands.eval_seg_linear`).

A frozen backbone's normalised patch tokens of the last block (``layers="last"``, DINOv2's
"linear") or of the last four concatenated (``"last4"``) -> BatchNorm -> 1x1 conv ->
bilinear upsampling (:class:`tokenmorph.models.segmentation.LinearSegmentor`), trained with
AdamW (lr 1e-3, weight decay 1e-4, betas (0.9, 0.999)), poly decay after a linear warm-up, on
DINOv2's pipeline (the short side rescaled to crop x U[0.5, 2), random crop with a maximum
category ratio of 0.75, flip, photometric distortion); evaluated by sliding window (crop,
stride 2/3 of it) at the short side = crop: mIoU, mAcc, aAcc with mmseg's rules. DINOv2 trains
40k iterations of 16 images at 512 px; ``steps`` and ``crop`` scale it down (the Fashion-MNIST
proxy: 32 px, a few hundred steps on a CPU).

The data order and every sample's augmentation are seeded as in training runs
(:mod:`tokenmorph.runtime.sampling`), so a probe is reproducible given its seed.
"""

from __future__ import annotations

import time

import torch

__all__ = ["PROBE_LAYERS", "seg_linear_probe"]

# which blocks' tokens the probe reads
PROBE_LAYERS = {"last": "the last block (DINOv2's linear)", "last4": "the last four, concatenated"}


def seg_linear_probe(
    checkpoint: str,
    data: str = "fashion-mnist-seg",
    *,
    val_data: str | None = None,
    num_classes: int | None = None,
    reduce_zero_label: bool = False,
    layers: str = "last",
    crop: int | None = None,
    steps: int = 40000,
    warmup_steps: int = 1500,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    mode: str = "slide",
    stride: int | None = None,
    eval_batch_size: int = 1,
    limit_val: int | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 0,
    random_init: bool = False,
    on_bad_image: str = "skip",
    progress: bool = True,
) -> dict:
    """Train DINOv2's linear segmentation head on the frozen ``checkpoint`` (a pre-training
    checkpoint or run folder, an export, or ``timm:NAME``) and evaluate it.

    ``data`` / ``val_data`` / ``num_classes`` / ``reduce_zero_label``: as ``tokenmorph segment``
    (:func:`tokenmorph.data.segmentation.segmentation_datasets`). ``crop`` defaults to 32 for
    the proxy set (its 64 px canvases at about half size: the demo students' input side), 512
    otherwise; ``stride`` to 2/3 of it (DINOv2's 341 for 512).
    ``precision``: ``auto`` (bf16 autocast on CUDA, fp32 on a CPU), ``bf16`` or ``fp32``.

    Returns the metrics (:func:`~tokenmorph.ops.segmentation.segmentation_metrics`) with
    ``classes``, ``backbone``, ``layers``, ``crop``, ``steps``, ``final_loss``,
    ``train_seconds``, ``val_images`` and ``skipped_images``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data.segmentation import (
        PROXY_NAME,
        SegEvalTransform,
        SegTrainTransform,
        segmentation_datasets,
    )
    from ..errors import ConfigError
    from ..models.segmentation import LinearSegmentor, ViTFeatures
    from ..recipes.segment import evaluate_segmentation, segmentation_backbone
    from ..runtime.distributed import resolve_device
    from ..runtime.optim import poly_lr
    from ..runtime.precision import autocast
    from ..runtime.sampling import KeyedDataset, StepBatchSampler, collate_keyed
    from ..runtime.seeding import mix_seed, seed_all

    if layers not in PROBE_LAYERS:
        raise ConfigError(f"layers={layers!r} is not one of: {', '.join(PROBE_LAYERS)}")
    dev = resolve_device(device)
    amp = {"auto": dev.type == "cuda", "bf16": True, "fp32": False}[precision]
    amp_dtype = torch.bfloat16 if amp else None
    crop = crop or (32 if data.split(":")[0] == PROXY_NAME else 512)
    stride = stride or crop * 2 // 3
    if stride > crop:
        raise ConfigError(f"stride {stride} is larger than the crop {crop}")
    train_set, val_set, classes = segmentation_datasets(
        data, val_data, num_classes, reduce_zero_label, on_bad_image
    )
    seed_all(mix_seed(seed, 0x11E))  # the head's init
    vit, info = segmentation_backbone(checkpoint, crop, random_init=random_init)
    depth = len(vit.blocks)
    indices = [depth - 1] if layers == "last" else list(range(max(depth - 4, 0), depth))
    model = LinearSegmentor(ViTFeatures(vit, indices, norm=True), len(classes)).to(dev)
    scale = (None, crop)  # DINOv2's img_scale (99999999, crop): only the short side is bounded
    train_set.transform = SegTrainTransform(crop, info["mean"], info["std"], scale=scale)
    val_set.transform = SegEvalTransform(info["mean"], info["std"], scale=scale)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    sampler = StepBatchSampler(len(train_set), batch_size, 1, 0, 1, seed).span(0, steps)
    loader = DataLoader(
        KeyedDataset(train_set, seed),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_keyed,
    )
    start, loss_value = time.perf_counter(), float("nan")
    model.train()
    for step, batch in enumerate(
        tqdm(loader, total=steps, desc="seg-linear", disable=not progress, dynamic_ncols=True)
    ):
        for g in opt.param_groups:
            g["lr"] = poly_lr(lr, step, steps, min(warmup_steps, steps - 1))
        if batch["images"].shape[0] == 0:
            continue
        x, y = batch["images"].to(dev), batch["labels"].to(dev)
        with autocast(dev.type, amp_dtype):
            loss, _ = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
    train_seconds = time.perf_counter() - start
    metrics = evaluate_segmentation(
        model,
        val_set,
        len(classes),
        crop,
        stride,
        mode,
        dev,
        amp_dtype,
        batch_size=eval_batch_size,
        num_workers=num_workers,
        limit=limit_val,
        progress=progress,
    )
    metrics.pop("confusion_matrix")
    return {
        **metrics,
        "classes": list(classes),
        "backbone": info["source"],
        "layers": layers,
        "blocks": indices,
        "crop": crop,
        "stride": stride,
        "steps": steps,
        "batch_size": batch_size,
        "final_loss": loss_value,
        "train_seconds": round(train_seconds, 2),
        "device": str(dev),
        "precision": "bf16" if amp else "fp32",
    }
