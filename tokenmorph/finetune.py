"""Fine-tuning a pre-trained backbone: the paper's protocol (method.md 1.6) built from timm's pieces.

timm's BEiT with a classification head (mean-pooled patch tokens + a new ``fc_norm``, or the CLS token),
each block's relative position bias initialised from the pre-trained shared one, layer-wise lr decay
(``timm.optim.param_groups_layer_decay``), RandAugment + random erasing (``timm.data.create_transform``),
Mixup / CutMix with label smoothing (``timm.data.Mixup``), drop path; the same engine as pre-training
(bf16, torchrun, exact resume, metrics.jsonl, progress), then top-1 / top-5 on the validation split.

A checkpoint of the MAE framework (``student_arch["framework"] == "mae"``) is fine-tuned as in MAE: its
encoder is timm's ``VisionTransformer`` already, so the model is timm's ViT with the same shape kwargs; the
fixed sin-cos ``pos_embed`` of pre-training becomes a learnable weight (resampled to the grid when
``img_size`` changes), ``global_pool="avg"`` again replaces ``norm`` by a new ``fc_norm``, and
``rel_pos_init`` does not apply (a ViT has no relative position bias) and is ignored.
"""
from __future__ import annotations

import json

DESCRIPTION = """Fine-tune a tokenmorph pre-trained encoder (or train from scratch) for classification.

Examples:
  tokenmorph finetune --config fashion-mnist-tiny --checkpoint outputs/demo
  tokenmorph finetune --config vit-b16-in1k --checkpoint runs/vit-b16-in1k --data /data/imagenet/train \\
      --val-data /data/imagenet/val
  torchrun --nproc_per_node 8 -m tokenmorph finetune --config vit-b16-in1k ...

A run folder is resumed automatically. The pre-trained final norm is not used with mean pooling (BEiT's
protocol: a new fc_norm normalises the pooled feature); the command prints every key it drops or adds.
A checkpoint of the MAE framework gives a timm ViT (learnable position embedding; rel_pos_init is ignored)."""

TIMM_NAME = "beit_base_patch16_224"  # the registry entry; every size is this name with its shape kwargs
# per pre-training framework (a checkpoint's student_arch["framework"]; random init is a Beit)
TIMM_NAMES = {"beit": TIMM_NAME, "mae": "vit_base_patch16_224"}


def framework_of(student) -> str:
    """The pre-training framework of a student ("beit" or "mae"); "beit" for random init (None)."""
    return "beit" if student is None else student.arch.get("framework", "beit")


def add_arguments(p) -> None:
    from .config import add_run_arguments

    add_run_arguments(p, "finetune")
    p.add_argument("--checkpoint", help="pre-trained checkpoint file or run folder (its newest checkpoint)")
    p.add_argument("--data", help="training data: an ImageFolder tree, or fashion-mnist")
    p.add_argument("--val-data", help="validation ImageFolder tree (fashion-mnist uses its test split)")


def run(args) -> int:
    from .config import config_from_args
    from .train import shutdown_distributed

    cfg = config_from_args(args, "finetune", ("checkpoint", "data", "val_data", "output_dir", "max_steps", "save_every",
                                              "device"))
    if cfg is None:
        return 0
    try:
        summary = finetune(cfg)
    finally:
        shutdown_distributed()
    if summary is not None:
        print(f"[tokenmorph] fine-tuned {summary['steps']} steps in {summary['wall_time_s']:.0f} s: "
              f"val top-1 {100 * summary['val_top1']:.2f}%, top-5 {100 * summary['val_top5']:.2f}% "
              f"on {summary['val_images']} images")
        print(json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------------------ model
def shared_to_per_block(state: dict, depth: int) -> dict:
    """Copy the shared relative position bias table into every block (BEiT's fine-tuning init)."""
    state = dict(state)
    table = state.pop("rel_pos_bias.relative_position_bias_table", None)
    if table is not None:
        for i in range(depth):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return state


def load_pretrained_student(spec: str):
    """(student, checkpoint path) of a pre-training checkpoint file or run folder."""
    from .backbone import load_pretrain_checkpoint, student_from_checkpoint

    ckpt, path = load_pretrain_checkpoint(spec, "fine-tuning")
    return student_from_checkpoint(ckpt), path


def build_model(cfg, num_classes: int, student=None, source=None):
    """(timm model, timm kwargs, report): ``student``'s encoder with a new head, or a randomly initialised
    ``cfg.model`` when ``student`` is None. ``report`` lists the keys dropped from / added to the weights.

    The model is timm's Beit (``TIMM_NAMES[framework_of(student)]``), or timm's VisionTransformer for an
    MAE student: the same kwargs as its encoder (:func:`tokenmorph.models.timm_vit_kwargs`), a learnable
    ``pos_embed`` initialised from the pre-trained sin-cos one; ``cfg.rel_pos_init`` is ignored there."""
    import timm

    from .models import STUDENT_SIZES, timm_vit_kwargs
    from .train import TrainingError

    per_block = cfg.rel_pos_init == "per_block"
    framework = framework_of(student)
    if student is not None:
        arch = student.arch
    else:
        d, L, h = STUDENT_SIZES[cfg.model]
        arch = dict(img_size=cfg.img_size or 224, patch_size=cfg.patch_size, embed_dim=d, depth=L, num_heads=h,
                    init_values=0.1)
    img_size = cfg.img_size or arch["img_size"]
    if framework == "mae":
        kwargs = {**timm_vit_kwargs(arch), "img_size": img_size, "drop_path_rate": cfg.drop_path,
                  "num_classes": num_classes, "global_pool": cfg.global_pool}
    else:
        kwargs = dict(img_size=img_size, patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
                      depth=arch["depth"], num_heads=arch["num_heads"], init_values=arch["init_values"],
                      use_abs_pos_emb=False, use_rel_pos_bias=per_block, use_shared_rel_pos_bias=not per_block,
                      drop_path_rate=cfg.drop_path, num_classes=num_classes, global_pool=cfg.global_pool)
    model = timm.create_model(TIMM_NAMES[framework], pretrained=False, **kwargs)
    report = {}
    if student is not None:
        state = student.encoder.state_dict()
        if framework == "mae":
            if img_size != arch["img_size"]:  # resample the position embedding to the new grid, as timm does
                from timm.models.vision_transformer import checkpoint_filter_fn

                state = checkpoint_filter_fn(state, model)
        else:
            if per_block:
                state = shared_to_per_block(state, arch["depth"])
            if img_size != arch["img_size"]:  # resample the bias tables to the new grid, as timm does
                from timm.models.beit import checkpoint_filter_fn

                state = checkpoint_filter_fn(state, model)
        own = model.state_dict()
        dropped = sorted(k for k in state if k not in own)
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if unexpected or any(not k.startswith(("head.", "fc_norm.")) for k in missing):
            raise TrainingError(f"pre-trained weights do not fit the fine-tuning model: missing {sorted(missing)[:6]}, "
                                f"unexpected {sorted(unexpected)[:6]}")
        report = {"source": str(source), "dropped": dropped, "new": sorted(missing)}
    return model, kwargs, report


# ------------------------------------------------------------------------------------------- data
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


def build_datasets(cfg, img_size: int, mean, std):
    """(train, val, class names) with timm's training transform (RandAugment, random erasing) and eval
    transform, grey images as 3 channels."""
    import torchvision.transforms as T
    from timm.data import create_transform

    from .data import DataError, ToRGB, build_dataset, default_crop_pct

    _use_compatible_posterize()  # before the ops are built: each op keeps its function
    crop = cfg.crop_pct if cfg.crop_pct is not None else default_crop_pct(img_size)
    train_tf = T.Compose([ToRGB(), create_transform(img_size, is_training=True, auto_augment=cfg.randaug or None,
                                                    interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel",
                                                    re_count=1, mean=tuple(mean), std=tuple(std))])
    eval_tf = T.Compose([ToRGB(), create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=crop,
                                                   mean=tuple(mean), std=tuple(std))])
    train = build_dataset(cfg.data, train=True, transform=train_tf, labels="folders")
    if cfg.val_data is not None:
        val = build_dataset(cfg.val_data, train=False, transform=eval_tf, labels="folders")
    elif cfg.data.startswith("fashion-mnist"):
        val = build_dataset(cfg.data, train=False, transform=eval_tf)
    else:
        raise DataError(f"no validation data for {cfg.data}: pass --val-data DIR (an ImageFolder tree)")
    classes = list(getattr(train, "classes", []) or [])
    if not classes:
        raise DataError(f"{cfg.data} has no class labels: fine-tuning needs an ImageFolder tree (one sub-folder per class)")
    if list(getattr(val, "classes", []) or []) != classes:
        raise DataError(f"the validation classes of {cfg.val_data or cfg.data} differ from the training classes")
    return train, val, classes


class ClassificationStep:
    """Engine step: Mixup/CutMix (or label smoothing), then soft-target cross-entropy."""

    def __init__(self, cfg, num_classes: int) -> None:
        import torch
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                               num_classes=num_classes)
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
    from tqdm.auto import tqdm

    from .data import collate_skip

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip)
    model.eval()
    correct1 = correct5 = total = 0
    with torch.inference_mode():
        for images, labels, _ in tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True):
            if images.numel() == 0:
                continue
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                logits = model(images)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top5[:, 0] == labels).sum())
            correct5 += int((top5 == labels[:, None]).any(dim=1).sum())
            total += labels.numel()
    return {"val_top1": correct1 / max(total, 1), "val_top5": correct5 / max(total, 1), "val_images": total}


# ------------------------------------------------------------------------------------------ run
def finetune(cfg, dist_info=None):
    """Run (or resume) fine-tuning; returns the summary on rank 0 (None on other ranks)."""
    from timm.optim import param_groups_layer_decay

    from .pretrain import run_dir_for
    from .train import Engine, KeyedDataset, check_batch_layout, init_distributed, mix_seed, seed_all

    from .data import dataset_stats

    cfg.validate()
    dist_info = dist_info or init_distributed(cfg.device)
    run_dir = run_dir_for(cfg)
    check_batch_layout(cfg.batch_size, cfg.accum_steps, dist_info.world_size)  # before any data or model is built
    seed_all(mix_seed(cfg.seed, 0xF17E))  # the new head's init is part of the run's identity
    student, source = load_pretrained_student(cfg.checkpoint) if cfg.checkpoint else (None, None)
    if student is not None:  # the backbone's own input conventions
        mean, std = student.mean.flatten().tolist(), student.std.flatten().tolist()
        img_size = cfg.img_size or student.arch["img_size"]
    else:
        mean, std = (list(v) for v in dataset_stats(cfg.data))
        img_size = cfg.img_size or 224
    train_set, val_set, classes = build_datasets(cfg, img_size, mean, std)
    model, kwargs, report = build_model(cfg, len(classes), student, source)
    model = model.to(dist_info.device)
    groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=cfg.layer_decay)
    compat = {"timm_kwargs": {k: v for k, v in kwargs.items() if k != "drop_path_rate"}, "classes": classes}
    engine = Engine(cfg, model, ClassificationStep(cfg, len(classes)), KeyedDataset(train_set, cfg.seed), run_dir,
                    dist_info, kind="finetune", compat=compat, param_groups=groups,
                    extra_state={"timm_model": TIMM_NAMES[framework_of(student)], "timm_kwargs": kwargs,
                                 "classes": classes, "data_stats": {"mean": list(mean), "std": list(std)}})
    resumed = engine.resume()
    if dist_info.is_main:
        import yaml

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if report.get("source"):
            print(f"[tokenmorph] backbone {report['source']}: new keys {report['new']}; pre-trained keys not used "
                  f"{report['dropped']}", flush=True)
        where = f"resuming from {resumed} (step {engine.step})" if resumed else "starting"
        print(f"[tokenmorph] {where}: fine-tune {cfg.name}, {len(classes)} classes, {len(train_set)} train / "
              f"{len(val_set)} val images, {engine.total_steps} steps of {cfg.batch_size}, lr {engine.lr:.3g}, "
              f"layer decay {cfg.layer_decay}, output {run_dir}", flush=True)
    summary = engine.train()
    if not dist_info.is_main:
        return None
    summary.update(evaluate(model, val_set, cfg.eval_batch_size, dist_info.device, engine.autocast_dtype, cfg.num_workers))
    summary.update(config=cfg.name, run_dir=str(run_dir), classes=len(classes))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
