"""``tokenmorph bench segment``: where a segmentation fine-tuning step's time goes.

:func:`bench_segment` times full UperNet training steps (the step of ``tokenmorph segment``:
ViT features of four blocks, the multi-scale neck, UperNet + the auxiliary FCN head, both
losses, backward, AdamW with BEiT's layer-decay groups) on synthetic images, per phase.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..runtime.precision import autocast, autocast_dtype

__all__ = ["bench_segment"]

PHASES = ("backbone", "neck", "heads", "loss", "backward", "optimizer")


def bench_segment(
    model: str = "base",
    batch_size: int = 2,
    img_size: int = 512,
    steps: int = 3,
    device: str = "cpu",
    precision: str = "bf16",
    num_classes: int = 150,
    patch_size: int = 16,
    head_channels: int | None = None,
    seed: int = 0,
) -> dict:
    """UperNet training steps of a random-init ``model`` BEiT (ViT-B/16 by default) at
    ``img_size``, on random images and labels; one warm-up step, then the median of ``steps``.

    Phases (device-synchronised): backbone forward (4 blocks' features), neck, heads forward
    (UperNet + auxiliary), loss (both cross-entropies at the label size), backward, optimiser
    (AdamW step with layer-decay groups). Returns ``images_per_second``, ``step_s``,
    ``phases_s`` (medians), the setup, and ``peak_memory_gib`` on CUDA."""
    from ..models.segmentation import UperNetSegmentor, ViTFeatures, default_out_indices
    from ..ops.segmentation import segmentation_loss
    from ..recipes.segment import segmentation_backbone
    from ..runtime.optim import layer_decay_param_groups

    torch.manual_seed(seed)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    vit, _ = segmentation_backbone(
        None, img_size, model_size=model, patch_size=patch_size, drop_path=0.1
    )
    depth = len(vit.blocks)
    net = UperNetSegmentor(
        ViTFeatures(vit, default_out_indices(depth)), num_classes, channels=head_channels
    ).to(dev)
    groups = layer_decay_param_groups(net, 0.05, 0.65, depth, prefix="backbone.vit.")
    for g in groups:
        g["lr"] = 1e-4 * g["lr_scale"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(dev)
    labels = torch.randint(0, num_classes, (batch_size, img_size, img_size), generator=gen).to(dev)
    labels[:, : img_size // 8] = 255  # some ignored pixels, as padding leaves
    dtype = autocast_dtype(precision)
    net.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> dict:
        marks = [time.perf_counter()]

        def mark():
            sync()
            marks.append(time.perf_counter())

        with autocast(dev.type, dtype):
            feats = net.backbone(images)
            mark()
            levels = net.neck(feats)
            mark()
            decode, aux = net.decode_head(levels), net.aux_head(levels[2])
            mark()
            loss = segmentation_loss(decode, labels) + net.aux_weight * segmentation_loss(
                aux, labels
            )
            mark()
        loss.backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        return {name: b - a for name, a, b in zip(PHASES, marks, marks[1:])}

    step()  # warm-up: allocator, kernels, lazy inits
    runs = [step() for _ in range(steps)]
    phases = {name: statistics.median(r[name] for r in runs) for name in PHASES}
    step_s = statistics.median(sum(r.values()) for r in runs)
    result = {
        "benchmark": "segment",
        "model": model,
        "embed_dim": vit.embed_dim,
        "depth": depth,
        "patch_size": patch_size,
        "img_size": img_size,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "head_channels": head_channels or vit.embed_dim,
        "precision": precision,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "step_s": step_s,
        "images_per_second": batch_size / step_s,
        "phases_s": phases,
        "num_params": sum(p.numel() for p in net.parameters()),
    }
    if dev.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        result["gpu"] = torch.cuda.get_device_name(dev)
    return result
