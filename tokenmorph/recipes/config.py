"""Validated run configurations: a dataclass of typed fields, YAML files, ``key=value``
       overrides.

Every problem is one line that names the key and what is allowed: an unknown key (with the
closest valid names), a value of the wrong type, a value outside its choices or range. All checks
run before any model or data set is built. The choices of the keys that name a component
(teacher, objective, distance, student size, decoder, ...) come from that component's registry,
so a new entry needs no edit here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from ..data.device_decode import DECODES, check_device_interpolation, check_device_source
from ..data.sources import source_kind
from ..data.transforms import INTERPOLATIONS
from ..errors import ConfigError
from ..models.arch import DECODER_PRESETS, FRAMEWORKS, REL_POS, STUDENT_SIZES
from ..models.attention import ATTENTION_KERNELS
from ..models.layouts import REL_POS_INITS
from ..models.segmentation import CLASSIFIER_INITS, REL_POS_RESIZE
from ..models.student import STUDENT_INITS
from ..models.teachers import TEACHER_NAMES, is_teacher_name
from ..ops.degrade import DEGRADATIONS, default_zoom_out_content
from ..ops.losses import DISTANCES, SCHEDULERS
from ..ops.masking import num_random_masked
from ..ops.morph import MODES
from ..ops.patches import PIXEL_NORMS
from ..ops.segmentation import INFERENCE_MODES
from ..runtime.log_sinks import LOGGERS, check_loggers
from ..runtime.optim import LR_SCALING, LR_SCHEDULES, WEIGHT_DECAY_RULES, scaled_lr
from ..runtime.precision import PRECISIONS
from ..runtime.resume import FIXED, FREE
from ..runtime.sampling import check_batch_layout
from .objectives import resolve_loss

__all__ = [
    "ConfigError",
    "EngineConfig",
    "PretrainConfig",
    "FinetuneConfig",
    "SegmentConfig",
    "load_config",
    "config_names",
    "CONFIG_DIR",
    "parse_overrides",
    "describe_keys",
    "masks_input",
    "config_from_checkpoint",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SIZES = tuple(STUDENT_SIZES)
_UNIONS = (Union, types.UnionType)  # Optional[X] and X | None
# Upper bounds of the sizes: far beyond any real run, low enough that a typo (img_size=100000)
# is a one-line error instead of a 30 GB allocation.
MAX_IMG_SIZE, MAX_DEPTH, MAX_WIDTH = 4096, 128, 8192

# Field metadata: doc (the --list-keys text), choices, check (a predicate), min / max (inclusive
# bounds), below (an exclusive upper bound), teacher_setting, and resume: how the key may change
# when a run folder is resumed (FREE: does not change training; FIXED: the model is built from
# it; unmarked: changes the run's meaning, see tokenmorph.runtime.resume).


def masks_input(cfg) -> bool:
    """Whether the config's objective masks the student's input (plain masking, the best
    practice)."""
    return DEGRADATIONS[cfg.objective].masked


@dataclass
class EngineConfig:
    """Settings of the training engine, shared by every kind of run (pre-training, fine-tuning)."""

    # optimisation
    epochs: float = field(
        default=300, metadata=dict(doc="training length in epochs (if max_steps is unset)", min=0.0)
    )
    max_steps: int | None = field(
        default=None,
        metadata=dict(doc="training length in optimiser steps (overrides epochs)", min=1),
    )
    batch_size: int = field(
        default=1024, metadata=dict(doc="global batch (all ranks, all accumulation steps)", min=1)
    )
    accum_steps: int = field(
        default=1,
        metadata=dict(
            resume=FREE, doc="gradient-accumulation micro-steps per optimiser step", min=1
        ),
    )
    lr: float = field(
        default=1.5e-4, metadata=dict(doc="base learning rate (scaled by lr_scaling)", min=0.0)
    )
    lr_scaling: str = field(
        default="none",
        metadata=dict(
            doc="lr = lr * (batch / lr_base_batch) for linear, its square root for sqrt",
            choices=tuple(LR_SCALING),
        ),
    )
    lr_base_batch: int = field(
        default=256, metadata=dict(doc="reference batch of lr_scaling", min=1)
    )
    min_lr: float = field(
        default=1e-5, metadata=dict(doc="final learning rate of the cosine", min=0.0)
    )
    lr_schedule: str = field(
        default="cosine",
        metadata=dict(doc="learning-rate schedule after the warm-up", choices=tuple(LR_SCHEDULES)),
    )
    poly_power: float = field(
        default=1.0, metadata=dict(doc="lr_schedule=poly: the exponent of the decay", min=0.0)
    )
    warmup_epochs: float = field(
        default=10, metadata=dict(doc="linear warm-up length in epochs", min=0.0)
    )
    warmup_steps: int | None = field(
        default=None, metadata=dict(doc="warm-up in steps (overrides warmup_epochs)", min=0)
    )
    weight_decay: float = field(default=0.05, metadata=dict(doc="AdamW weight decay", min=0.0))
    weight_decay_end: float | None = field(
        default=None, metadata=dict(doc="cosine weight-decay schedule end value", min=0.0)
    )
    beta1: float = field(default=0.9, metadata=dict(doc="AdamW beta1", min=0.0, below=1.0))
    beta2: float = field(default=0.98, metadata=dict(doc="AdamW beta2", min=0.0, below=1.0))
    clip_grad: float | None = field(
        default=3.0, metadata=dict(doc="gradient-norm clipping (None = off)", min=0.0)
    )
    # runtime
    precision: str = field(
        default="bf16",
        metadata=dict(
            doc="autocast dtype (fp16 uses a GradScaler, CUDA only)", choices=tuple(PRECISIONS)
        ),
    )
    device: str = field(
        default="auto",
        metadata=dict(resume=FREE, doc="cpu, cuda, or auto", choices=("auto", "cpu", "cuda")),
    )
    seed: int = field(default=0, metadata=dict(doc="seed of every random choice"))
    num_workers: int = field(
        default=2, metadata=dict(resume=FREE, doc="data-loader worker processes per rank", min=0)
    )
    prefetch_factor: int = field(
        default=4,
        metadata=dict(
            resume=FREE,
            doc="micro-batches each worker loads ahead; with num_workers and the per-rank batch "
            "this sets the shared memory a rank needs (docs/cluster.md)",
            min=1,
        ),
    )
    output_dir: str | None = field(
        default=None, metadata=dict(resume=FREE, doc="run folder (default runs/<config name>)")
    )
    stop_after: int | None = field(
        default=None,
        metadata=dict(
            resume=FREE,
            doc="end this invocation after N more steps with a checkpoint (the schedule still "
            "spans the whole run; rerun to go on)",
            min=1,
        ),
    )
    save_every: int = field(
        default=1000,
        metadata=dict(resume=FREE, doc="checkpoint every N steps (and at the end)", min=1),
    )
    keep_last: int = field(default=3, metadata=dict(resume=FREE, doc="checkpoints kept", min=1))
    log_every: int = field(
        default=10, metadata=dict(resume=FREE, doc="metrics.jsonl line every N steps", min=1)
    )
    nan_policy: str = field(
        default="stop",
        metadata=dict(
            resume=FREE, doc="non-finite loss: stop, or skip the step", choices=("stop", "skip")
        ),
    )
    tensorboard: bool = field(
        default=True,
        metadata=dict(resume=FREE, doc="write TensorBoard logs (false: off, whatever loggers say)"),
    )
    loggers: str = field(
        default="tensorboard",
        metadata=dict(
            resume=FREE,
            doc="where records go besides metrics.jsonl, comma-separated: "
            + "; ".join(f"{k}: {v}" for k, v in LOGGERS.items()),
        ),
    )
    grad_checkpointing: bool = field(
        default=False,
        metadata=dict(resume=FREE, doc="recompute activations in backward (saves memory)"),
    )
    attention: str = field(
        default="auto",
        metadata=dict(
            resume=FREE,
            doc="attention kernel of the model's (and teacher's) timm layers: sdpa, explicit, or "
            "auto (SDPA on CUDA and in fp32; explicit under bf16/fp16 on a CPU, where it is "
            "faster)",
            choices=ATTENTION_KERNELS,
        ),
    )
    compile: bool = field(
        default=False,
        metadata=dict(
            resume=FREE,
            doc="torch.compile the model (and a pre-training teacher's backbone): a slower "
            "start for faster steps (README, Benchmarks)",
        ),
    )
    name: str = field(
        default="run", metadata=dict(resume=FREE, doc="run name (set from the config file name)")
    )
    apply_changes: bool = field(
        default=False,
        metadata=dict(
            resume=FREE,
            doc="on resume, apply changed settings from the current step (--apply-changes) "
            "instead of refusing them",
        ),
    )
    allow_output_in_data: bool = field(
        default=False,
        metadata=dict(
            resume=FREE,
            doc="allow an output folder inside the data folder (it is left out of the data)",
        ),
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        """Field checks, then the engine's cross-field checks; subclasses add their own."""
        for f in fields(self):
            _check_value(f, getattr(self, f.name))
        check_batch_layout(
            self.batch_size, self.accum_steps, 1
        )  # the process count is checked at launch
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps")
        check_loggers(self.loggers)
        peak = scaled_lr(self)
        if self.min_lr > peak:
            raise ConfigError(
                f"min_lr={self.min_lr:g} is above the learning rate {peak:g} (lr={self.lr:g}, "
                f"lr_scaling={self.lr_scaling}): the cosine would climb; set min_lr <= lr"
            )
        return self


@dataclass
class PretrainConfig(EngineConfig):
    """Every setting of a pre-training run. ``doc`` metadata is shown by ``tokenmorph pretrain
    --list-keys``."""

    # student
    model: str = field(
        default="small", metadata=dict(resume=FIXED, doc="student size", choices=SIZES)
    )
    img_size: int = field(
        default=224,
        metadata=dict(resume=FIXED, doc="input side in pixels", min=8, max=MAX_IMG_SIZE),
    )
    patch_size: int = field(
        default=16,
        metadata=dict(resume=FIXED, doc="patch side in pixels", min=1, max=MAX_IMG_SIZE),
    )
    depth: int | None = field(
        default=None,
        metadata=dict(resume=FIXED, doc="override the size's depth", min=1, max=MAX_DEPTH),
    )
    drop_path: float = field(
        default=0.1, metadata=dict(doc="stochastic depth rate", min=0.0, max=1.0)
    )
    layer_scale_init: float = field(
        default=0.1, metadata=dict(resume=FIXED, doc="LayerScale init value", min=0.0)
    )
    rel_pos_bias: str = field(
        default="both",
        metadata=dict(
            resume=FIXED,
            doc="framework=beit relative position bias: both (each block's own table + the "
            "shared one, the DTM release's), shared, or per_block",
            choices=REL_POS,
        ),
    )
    init: str = field(
        default="release",
        metadata=dict(
            resume=FIXED,
            doc="framework=beit student init: release (DTM's: trunc normal std 0.02 cut at "
            "+-0.02, biases 0, per-layer output rescaling) or timm (timm's Beit init)",
            choices=tuple(STUDENT_INITS),
        ),
    )
    # teacher
    teacher: str = field(
        default="clip-vit-b16",
        metadata=dict(resume=FIXED, doc=" | ".join(TEACHER_NAMES), check=is_teacher_name),
    )
    # settings written for one teacher (teacher_setting): reset when an override changes the
    # teacher
    teacher_weights: str | None = field(
        default=None,
        metadata=dict(doc="teacher weights file (safetensors or torch)", teacher_setting=True),
    )
    teacher_random_init: bool = field(
        default=False, metadata=dict(doc="random teacher weights (tests, benchmarks)")
    )
    teacher_input_size: int | None = field(
        default=None,
        metadata=dict(
            doc="side the teacher sees (default: its own)",
            min=8,
            max=MAX_IMG_SIZE,
            teacher_setting=True,
        ),
    )
    teacher_normalization: str = field(
        default="default",
        metadata=dict(
            doc="teacher input normalisation: its own, or the release's ImageNet one for CLIP",
            choices=("default", "imagenet"),
            teacher_setting=True,
        ),
    )
    teacher_kwargs: dict = field(
        default_factory=dict,
        metadata=dict(
            doc="extra teacher arguments (JSON object); teacher_* keys reset when an override "
            "changes teacher",
            teacher_setting=True,
        ),
    )
    # framework and objective (docs/method.md 2)
    framework: str = field(
        default="beit",
        metadata=dict(
            resume=FIXED,
            doc="beit: the student sees all tokens (mask token, block masks); mae: encoder on "
            "visible tokens + decoder",
            choices=tuple(FRAMEWORKS),
        ),
    )
    objective: str = field(
        default="mask",
        metadata=dict(
            resume=FIXED,
            doc="input degradation: masking, or a Beyond Masking objective (zoom_in_mask = the "
            "best practice)",
            choices=tuple(DEGRADATIONS),
        ),
    )
    loss: str = field(
        default="auto",
        metadata=dict(
            resume=FIXED,
            doc="auto: mse for teacher=pixels, dtm otherwise",
            choices=("auto", "dtm", "mse"),
        ),
    )
    pixel_norm: str = field(
        default="per_channel",
        metadata=dict(
            doc="teacher=pixels: per-patch normalisation per channel (Beyond Masking), joint "
            "(MAE's norm_pix_loss), input (MAE without it) or none (raw pixels)",
            choices=PIXEL_NORMS,
        ),
    )
    mask_ratio: float = field(
        default=0.75,
        metadata=dict(
            doc="framework=mae: fraction of tokens removed per sample", min=0.0, max=0.99
        ),
    )
    decoder: str = field(
        default="release",
        metadata=dict(
            resume=FIXED,
            doc="framework=mae decoder preset: release 4 x 384, mae 8 x 512",
            choices=tuple(DECODER_PRESETS),
        ),
    )
    decoder_depth: int | None = field(
        default=None,
        metadata=dict(
            resume=FIXED, doc="decoder blocks (default: the preset's)", min=1, max=MAX_DEPTH
        ),
    )
    decoder_dim: int | None = field(
        default=None,
        metadata=dict(
            resume=FIXED, doc="decoder width (default: the preset's)", min=8, max=MAX_WIDTH
        ),
    )
    decoder_heads: int | None = field(
        default=None,
        metadata=dict(
            resume=FIXED,
            doc="decoder attention heads (default: the preset's; width / 32 for another width)",
            min=1,
        ),
    )
    init_from: str | None = field(
        default=None,
        metadata=dict(
            resume=FIXED,
            doc="start the student from weights: a tokenmorph checkpoint, run folder or export, "
            "an official MAE checkpoint (encoder only, or with the decoder), a DTM release "
            "checkpoint (dtm-release:FILE or the file), timm:NAME or local-dir:DIR; loaded "
            "before step 0 (a resumed run's checkpoint wins)",
        ),
    )
    init_strict: bool = field(
        default=True,
        metadata=dict(
            resume=FIXED,
            doc="init_from: refuse missing or unexpected keys and other shapes (false: load what "
            "fits, report the rest)",
        ),
    )
    init_weights: str | None = field(
        default=None,
        metadata=dict(
            resume=FIXED,
            doc="framework=mae: an official MAE checkpoint to start from (the older name of "
            "init_from for that layout)",
        ),
    )
    zoom_ring_patches: int | None = field(
        default=None,
        metadata=dict(
            doc="zoom-in border ring in patches (default img_size / 7 rounded: 2 at 224/16, the "
            "288 view)",
            min=1,
        ),
    )
    zoom_out_content: int | None = field(
        default=None,
        metadata=dict(
            doc="zoom-out content side in pixels (default 5/7 of img_size: 160 at 224)", min=1
        ),
    )
    decolorize_saturation: float = field(
        default=0.3,
        metadata=dict(
            doc="objective=decolorize: HSV saturation factor applied first, to input and target "
            "(0.3 as the release; 1 = off)",
            min=0.0,
            max=1.0,
        ),
    )
    chunk_size: int = field(
        default=128,
        metadata=dict(
            doc="images of the global batch that share one per-batch random draw, seeded by (seed, "
            "step, chunk): DTM's schedules, the zoom-out offset, the de-colorisation weights (the "
            "release draws them once per GPU batch of 128 images)",
            min=1,
        ),
    )
    ring_loss_weight: float = field(
        default=0.2,
        metadata=dict(
            doc="zoom_in_mask with pixels: weight of the border-ring MSE (the masked tokens get "
            "1 - it)",
            min=0.0,
            max=1.0,
        ),
    )
    # data
    data: str = field(
        default="fashion-mnist",
        metadata=dict(
            resume=FREE,
            doc="folder of images (flat or class tree), fashion-mnist[:DIR], a shard folder, "
            "wds:DIR_OR_PATTERN (.tar shards read as a stream) or hfds:PATH (local Hugging Face)",
        ),
    )
    crop_scale_min: float = field(
        default=0.08, metadata=dict(doc="RandomResizedCrop smallest scale", min=0.0, max=1.0)
    )
    color_jitter: float = field(
        default=0.4, metadata=dict(doc="ColorJitter strength (0 = off)", min=0.0)
    )
    hflip: bool = field(default=True, metadata=dict(doc="random horizontal flip"))
    crop_interpolation: str = field(
        default="bicubic",
        metadata=dict(
            doc="RandomResizedCrop interpolation (bilinear: the de-colorisation release's)",
            choices=INTERPOLATIONS,
        ),
    )
    on_bad_image: str = field(
        default="skip",
        metadata=dict(
            resume=FREE, doc="undecodable file: skip and count, or stop", choices=("skip", "raise")
        ),
    )
    decode: str = field(
        default="cpu",
        metadata=dict(
            doc="where images are decoded and augmented: cpu (the loader's workers, PIL) or "
            "device (the workers read the files and draw each sample's crop, flip and jitter; "
            "decode_jpeg and the augmentation run on the training device: docs/cluster.md)",
            choices=tuple(DECODES),
        ),
    )
    # masking
    num_masked: int = field(
        default=75, metadata=dict(doc="masked patches per image (block-wise)", min=0)
    )
    min_mask_block: int = field(
        default=16, metadata=dict(doc="smallest masking block, in patches", min=1)
    )
    # DTM
    num_levels: int = field(default=2, metadata=dict(doc="morphing schedules per step (L)", min=1))
    n_max: int | None = field(
        default=None, metadata=dict(doc="largest num_merge (default: all patches)", min=0)
    )
    k_max: int = field(
        default=14, metadata=dict(doc="largest number of matching iterations", min=1)
    )
    scheduler: str = field(
        default="release", metadata=dict(doc="dynamic scheduler", choices=SCHEDULERS)
    )
    morph_mode: str = field(
        default="reference", metadata=dict(doc="matching semantics", choices=MODES)
    )
    distance: str = field(
        default="smooth_l1", metadata=dict(doc="per-token distance", choices=tuple(DISTANCES))
    )
    beta: float = field(default=2.0, metadata=dict(doc="smooth-L1 beta", min=0.0))
    normalize_target: bool = field(
        default=False,
        metadata=dict(doc="standardise aggregated targets per token (unbiased variance, eps 1e-6)"),
    )
    loss_on: str = field(
        default="all", metadata=dict(doc="tokens in the loss", choices=("all", "masked"))
    )
    per_group: bool = field(
        default=False, metadata=dict(doc="one loss term per group instead of per token")
    )
    # k-NN monitor (tokenmorph.runtime.monitor): does not change the training
    monitor_every: int | None = field(
        default=None,
        metadata=dict(
            resume=FREE,
            doc="k-NN top-1 of the encoder every N steps (and at the start and the end) on "
            "monitor_data (None = off)",
            min=1,
        ),
    )
    monitor_data: str = field(
        default="fashion-mnist",
        metadata=dict(
            resume=FREE,
            doc="labelled monitor set: fashion-mnist[:DIR] (bank from the train split, queries "
            "from the test split) or TRAIN_DIR,VAL_DIR (ImageFolder trees)",
        ),
    )
    monitor_limit: int = field(
        default=2000,
        metadata=dict(resume=FREE, doc="monitor queries (a fixed seeded subset)", min=1),
    )
    monitor_bank: int | None = field(
        default=10000,
        metadata=dict(
            resume=FREE, doc="monitor memory-bank images (a fixed seeded subset; None = all)", min=1
        ),
    )
    monitor_k: int = field(
        default=20, metadata=dict(resume=FREE, doc="monitor neighbours (weighted vote)", min=1)
    )

    def validate(self) -> PretrainConfig:
        super().validate()
        if self.decode == "device":
            check_device_source(source_kind(self.data))
            check_device_interpolation(self.crop_interpolation)
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}"
            )
        n = (self.img_size // self.patch_size) ** 2
        if self.framework == "beit" and self.num_masked > n:
            raise ConfigError(
                f"num_masked={self.num_masked} exceeds the {n} patches of a {self.img_size}px "
                "image "
                f"with patch_size={self.patch_size}"
            )
        if self.n_max is not None and self.n_max > n:
            raise ConfigError(f"n_max={self.n_max} exceeds the {n} patches per image")
        masked_objective = masks_input(self)
        if self.loss_on == "masked" and (
            not masked_objective or self.framework == "beit" and self.num_masked == 0
        ):
            raise ConfigError(
                f"loss_on=masked needs a masked input: objective={self.objective} with framework="
                f"{self.framework} masks nothing (use objective=mask or zoom_in_mask, num_masked > "
                "0)"
            )
        if self.loss_on == "masked" and not DEGRADATIONS[self.objective].aligned:
            raise ConfigError(
                f"loss_on=masked does not apply to objective={self.objective}: the masked tokens "
                "are input-frame tokens and the student predicts another frame; use loss_on=all"
            )
        if self.init_weights is not None and self.framework != "mae":
            raise ConfigError(
                f"init_weights={self.init_weights} loads an official MAE checkpoint: it needs "
                "framework=mae"
            )
        self._check_monitor()
        if self.objective == "zoom_out":
            content = self.zoom_out_content or default_zoom_out_content(self.img_size)
            if not self.img_size / 2 < content < self.img_size:
                raise ConfigError(
                    f"zoom_out_content={content} must lie between half of img_size={self.img_size} "
                    "and "
                    f"img_size (mirror padding reflects the content once)"
                )
        self._check_masking(n, masked_objective)
        return self

    def monitor_eval_data(self):
        """The monitor's labelled data as :class:`~tokenmorph.data.labelled.EvalData`."""
        from ..data.labelled import EvalData

        name, _, _ = self.monitor_data.partition(":")
        if name.strip().lower() == "fashion-mnist":
            data = dict(dataset=self.monitor_data)
        else:
            train, val = self.monitor_data.split(",")
            data = dict(train=train.strip(), val=val.strip())
        return EvalData(
            **data, limit_train=self.monitor_bank, limit_val=self.monitor_limit, seed=self.seed
        )

    def _check_monitor(self) -> None:
        name = self.monitor_data.partition(":")[0].strip().lower()
        if name != "fashion-mnist" and self.monitor_data.count(",") != 1:
            raise ConfigError(
                f"monitor_data={self.monitor_data!r}: give fashion-mnist[:DIR] or "
                "TRAIN_DIR,VAL_DIR (two ImageFolder trees)"
            )

    def _check_masking(self, n: int, masked_objective: bool) -> None:
        """Masks that leave nothing to learn, or that the block sampler cannot draw."""
        beit = self.framework == "beit"
        if beit and masked_objective and self.num_masked > 0 and self.min_mask_block > n:
            raise ConfigError(
                f"min_mask_block={self.min_mask_block} exceeds the {n} patches of a "
                f"{self.img_size}px image with patch_size={self.patch_size}; lower it"
            )
        masked = self.num_masked if beit else num_random_masked(n, self.mask_ratio)
        on_masked_only = self.loss_on == "masked" or resolve_loss(self) == "mse"
        if self.objective == "mask" and masked == 0 and on_masked_only:
            what = "num_masked=0" if beit else f"mask_ratio={self.mask_ratio} masks 0 of {n} tokens"
            raise ConfigError(
                f"{what}: the loss covers the masked tokens only, so it is zero and nothing is "
                "learnt; mask some tokens (raise num_masked or mask_ratio)"
            )


@dataclass
class FinetuneConfig(EngineConfig):
    """Every setting of a fine-tuning run (docs/method.md 1.6's protocol on timm's pieces)."""

    # backbone
    checkpoint: str | None = field(
        default=None,
        metadata=dict(
            resume=FIXED,
            doc="pre-trained backbone: a tokenmorph checkpoint or run folder, an export folder "
            "(or .safetensors/.json), local-dir:DIR, hf-hub:NAME or timm:NAME (a timm Beit or "
            "plain ViT) (None = random init of model)",
        ),
    )
    model: str = field(
        default="small",
        metadata=dict(resume=FIXED, doc="size when training from scratch", choices=SIZES),
    )
    img_size: int | None = field(
        default=None,
        metadata=dict(
            resume=FIXED, doc="input side (default: the checkpoint's)", min=8, max=MAX_IMG_SIZE
        ),
    )
    patch_size: int = field(
        default=16,
        metadata=dict(
            resume=FIXED, doc="patch side when training from scratch", min=1, max=MAX_IMG_SIZE
        ),
    )
    drop_path: float = field(
        default=0.1, metadata=dict(doc="stochastic depth rate", min=0.0, max=1.0)
    )
    layer_decay: float = field(
        default=0.6, metadata=dict(doc="layer-wise lr decay (timm param groups)", min=0.0, max=1.0)
    )
    global_pool: str = field(
        default="avg",
        metadata=dict(
            resume=FIXED,
            doc="mean-pooled patch tokens + fc_norm, or the CLS token",
            choices=("avg", "token"),
        ),
    )
    rel_pos_init: str = field(
        default="own_plus_shared",
        metadata=dict(
            resume=FIXED,
            doc="each block's relative position table starts from its own + the shared one "
            "(the release's documented launch), the shared one only (the script's default), its "
            "own only, or the pre-trained layout as it is",
            choices=tuple(REL_POS_INITS),
        ),
    )
    # data and augmentation
    data: str = field(
        default="fashion-mnist",
        metadata=dict(resume=FREE, doc="training data: an ImageFolder tree, or fashion-mnist"),
    )
    val_data: str | None = field(
        default=None,
        metadata=dict(
            resume=FREE, doc="validation ImageFolder tree (fashion-mnist: its test split)"
        ),
    )
    crop_pct: float | None = field(
        default=None,
        metadata=dict(
            doc="eval centre-crop fraction (default 0.875; 1.0 below 64 px)", min=0.1, max=1.0
        ),
    )
    randaug: str = field(
        default="rand-m9-mstd0.5-inc1", metadata=dict(doc="timm RandAugment spec ('' = off)")
    )
    mixup: float = field(default=0.8, metadata=dict(doc="Mixup alpha (0 = off)", min=0.0))
    cutmix: float = field(default=1.0, metadata=dict(doc="CutMix alpha (0 = off)", min=0.0))
    smoothing: float = field(default=0.1, metadata=dict(doc="label smoothing", min=0.0, max=1.0))
    reprob: float = field(
        default=0.25, metadata=dict(doc="random-erasing probability", min=0.0, max=1.0)
    )
    eval_batch_size: int = field(
        default=256, metadata=dict(resume=FREE, doc="batch of the final evaluation", min=1)
    )
    # the paper's fine-tuning optimiser (AdamW, lr 5e-4, wd 0.05), overriding the pre-training
    # defaults
    lr: float = field(
        default=5e-4, metadata=dict(doc="base learning rate (scaled by lr_scaling)", min=0.0)
    )
    beta2: float = field(default=0.999, metadata=dict(doc="AdamW beta2", min=0.0, below=1.0))
    clip_grad: float | None = field(
        default=None, metadata=dict(doc="gradient-norm clipping (None = off)", min=0.0)
    )
    epochs: float = field(
        default=100, metadata=dict(doc="training length in epochs (if max_steps is unset)", min=0.0)
    )
    min_lr: float = field(
        default=1e-6, metadata=dict(doc="final learning rate of the cosine", min=0.0)
    )

    def validate(self) -> FinetuneConfig:
        super().validate()
        if (self.mixup > 0 or self.cutmix > 0) and (self.batch_size // self.accum_steps) % 2:
            raise ConfigError(
                f"Mixup/CutMix need an even micro-batch; batch_size={self.batch_size} / "
                "accum_steps="
                f"{self.accum_steps} is odd (or set mixup=0 cutmix=0)"
            )
        return self


@dataclass
class SegmentConfig(EngineConfig):
    """Every setting of a semantic-segmentation fine-tuning run (UperNet on a ViT; the defaults
    are the ADE20K recipe for a self-supervised ViT-B: configs/segment/vit-b16-ade20k.yaml says
    where each value comes from)."""

    # backbone
    checkpoint: str | None = field(
        default=None,
        metadata=dict(
            resume=FIXED,
            doc="backbone: a tokenmorph checkpoint or run folder, an export folder (or "
            ".json/.safetensors), local-dir:DIR, hf-hub:NAME or timm:NAME (None = random init of "
            "model)",
        ),
    )
    random_init: bool = field(
        default=False,
        metadata=dict(resume=FIXED, doc="timm:NAME with random weights (no download)"),
    )
    model: str = field(
        default="base",
        metadata=dict(resume=FIXED, doc="size when training from scratch", choices=SIZES),
    )
    patch_size: int = field(
        default=16, metadata=dict(resume=FIXED, doc="patch side when training from scratch", min=1)
    )
    drop_path: float = field(
        default=0.1, metadata=dict(doc="stochastic depth rate", min=0.0, max=1.0)
    )
    layer_decay: float = field(
        default=0.65,
        metadata=dict(doc="layer-wise lr decay (BEiT's rule: heads 1.0)", min=0.0, max=1.0),
    )
    weight_decay_rule: str = field(
        default="release",
        metadata=dict(doc="what is exempt from weight decay", choices=tuple(WEIGHT_DECAY_RULES)),
    )
    rel_pos_init: str = field(
        default="own_plus_shared",
        metadata=dict(
            resume=FIXED,
            doc="each block's relative position table starts by one of classification "
            "fine-tuning's rules (its default; shared_only is BEiT v2's segmentation loader, "
            "which copies a shared table into every block)",
            choices=tuple(REL_POS_INITS),
        ),
    )
    rel_pos_resize: str = field(
        default="release",
        metadata=dict(
            resume=FIXED,
            doc="bias tables to the crop's grid: the release's cubic spline or timm's linear",
            choices=REL_POS_RESIZE,
        ),
    )
    out_indices: str = field(
        default="auto",
        metadata=dict(
            resume=FIXED, doc="the 4 blocks UperNet reads, e.g. 3,5,7,11 (auto: BEiT's rule)"
        ),
    )
    # heads
    head_channels: int | None = field(
        default=None,
        metadata=dict(
            resume=FIXED, doc="UperNet width (default: the backbone's width, as BEiT)", min=1
        ),
    )
    aux_channels: int = field(
        default=256, metadata=dict(resume=FIXED, doc="auxiliary FCN head width", min=1)
    )
    aux_weight: float = field(
        default=0.4, metadata=dict(doc="auxiliary loss weight (0 = no auxiliary head)", min=0.0)
    )
    dropout: float = field(
        default=0.1, metadata=dict(doc="dropout before the classifiers", min=0.0, max=1.0)
    )
    classifier_init: str = field(
        default="release",
        metadata=dict(
            resume=FIXED,
            doc="the heads' 1x1 classifiers: mmseg's N(0, 0.01) or PyTorch's default (short runs)",
            choices=tuple(CLASSIFIER_INITS),
        ),
    )
    # data
    data: str = field(
        default="data/ade/ADEChallengeData2016",
        metadata=dict(
            doc="ADE20K folder, a folder with images/ + masks/, or fashion-mnist-seg (the proxy)"
        ),
    )
    val_data: str | None = field(
        default=None, metadata=dict(doc="validation folder (images/ + masks/) for your own data")
    )
    num_classes: int | None = field(
        default=None,
        metadata=dict(resume=FIXED, doc="classes of your own data without classes.txt", min=1),
    )
    reduce_zero_label: bool = field(
        default=False,
        metadata=dict(
            resume=FIXED, doc="your own data: label 0 -> ignore, v -> v - 1 (ADE20K: always)"
        ),
    )
    on_bad_image: str = field(
        default="skip",
        metadata=dict(
            doc="a bad pair (missing mask, size mismatch, undecodable): skip and count, or stop",
            choices=("skip", "raise"),
        ),
    )
    crop_size: int = field(
        default=512, metadata=dict(resume=FIXED, doc="training crop side", min=8)
    )
    scale_long: int | None = field(
        default=2048,
        metadata=dict(doc="rescale bound of the long side (None: short side only)", min=1),
    )
    scale_short: int = field(
        default=512, metadata=dict(doc="rescale bound of the short side", min=1)
    )
    ratio_min: float = field(default=0.5, metadata=dict(doc="random rescale ratio, low", min=0.01))
    ratio_max: float = field(default=2.0, metadata=dict(doc="random rescale ratio, high", min=0.01))
    cat_max_ratio: float = field(
        default=0.75,
        metadata=dict(doc="random crop: largest share of one class (1 = off)", min=0.0, max=1.0),
    )
    hflip: bool = field(default=True, metadata=dict(doc="random horizontal flip"))
    photometric: bool = field(default=True, metadata=dict(doc="photometric distortion"))
    # evaluation
    eval_mode: str = field(
        default="slide",
        metadata=dict(doc="inference on the validation images", choices=tuple(INFERENCE_MODES)),
    )
    eval_stride: int = field(default=341, metadata=dict(doc="sliding-window stride", min=1))
    eval_batch_size: int = field(
        default=1,
        metadata=dict(
            resume=FREE, doc="validation images per forward (> 1 needs images of one size)", min=1
        ),
    )
    limit_val: int | None = field(
        default=None, metadata=dict(doc="evaluate on N validation images (the first N)", min=1)
    )
    # the optimiser of the segmentation releases, overriding the pre-training defaults
    lr: float = field(
        default=4e-4, metadata=dict(doc="base learning rate (scaled by lr_scaling)", min=0.0)
    )
    beta2: float = field(default=0.999, metadata=dict(doc="AdamW beta2", min=0.0, max=1.0))
    clip_grad: float | None = field(
        default=None, metadata=dict(doc="gradient-norm clipping (None = off)", min=0.0)
    )
    min_lr: float = field(default=0.0, metadata=dict(doc="final learning rate", min=0.0))
    lr_schedule: str = field(
        default="poly",
        metadata=dict(doc="learning-rate schedule after the warm-up", choices=tuple(LR_SCHEDULES)),
    )
    warmup_steps: int | None = field(
        default=1500, metadata=dict(doc="warm-up in steps (overrides warmup_epochs)", min=0)
    )
    max_steps: int | None = field(
        default=160000,
        metadata=dict(doc="training length in optimiser steps (overrides epochs)", min=0),
    )
    batch_size: int = field(
        default=16, metadata=dict(doc="global batch (all ranks, all accumulation steps)", min=1)
    )
    save_every: int = field(
        default=16000, metadata=dict(doc="checkpoint every N steps (and at the end)", min=1)
    )

    def validate(self) -> SegmentConfig:
        super().validate()
        if self.ratio_min > self.ratio_max:
            raise ConfigError(f"ratio_min={self.ratio_min} is above ratio_max={self.ratio_max}")
        if self.eval_stride > self.crop_size:
            raise ConfigError(
                f"eval_stride={self.eval_stride} is larger than crop_size={self.crop_size}: "
                "windows would leave gaps"
            )
        if self.out_indices != "auto":
            try:
                indices = [int(v) for v in self.out_indices.split(",")]
            except ValueError:
                indices = []
            if len(indices) != 4 or min(indices) < 0:
                raise ConfigError(
                    f"out_indices={self.out_indices!r}: give 4 block indices, e.g. 3,5,7,11"
                )
        return self


CONFIG_CLASSES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "segment": SegmentConfig}
KINDS_BY_CLASS = {v: k for k, v in CONFIG_CLASSES.items()}


def describe_keys(kind: str) -> str:
    """One line per key of a config kind: name, default, meaning, choices, and how it may change
    on resume when it is free or fixed (unmarked keys change the run's meaning), for
    --list-keys."""
    lines = []
    for f in fields(CONFIG_CLASSES[kind]):
        meta = f.metadata
        choices = f" [{' | '.join(meta['choices'])}]" if "choices" in meta else ""
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        resume = f" (on resume: {meta['resume']})" if "resume" in meta else ""
        lines.append(f"{f.name:24s} {str(default):14s} {meta.get('doc', '')}{choices}{resume}")
    return "\n".join(lines)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or None"
    return getattr(tp, "__name__", str(tp))


def _coerce(cls, f, value: Any) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise ConfigError."""
    tp = typing.get_type_hints(cls)[f.name]
    optional = typing.get_origin(tp) in _UNIONS and type(None) in typing.get_args(tp)
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", "null", ""):
            return None
        if base is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
        elif base is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif base is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif base is dict:
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                return parsed
        elif base is str:
            return text
        raise ConfigError(f"{f.name}={value!r} is not a valid {_type_name(tp)}")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{f.name} cannot be None (expected {_type_name(tp)})")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool) or base is not bool and isinstance(value, bool):
        raise ConfigError(f"{f.name}={value!r} is not a valid {_type_name(tp)}")
    if not isinstance(value, base):
        raise ConfigError(f"{f.name}={value!r} is not a valid {_type_name(tp)}")
    return value


def _check_value(f, value: Any) -> None:
    meta = f.metadata
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{f.name}={value!r} is not a finite number")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{f.name}={value!r} is not one of: {', '.join(map(str, choices))}")
    if "check" in meta and not meta["check"](value):
        raise ConfigError(f"{f.name}={value!r} is not one of: {meta['doc']}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{f.name}={value!r} is below its minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{f.name}={value!r} is above its maximum {meta['max']}")
    if "below" in meta and value >= meta["below"]:
        raise ConfigError(f"{f.name}={value!r} must be below {meta['below']}")


def _field(cls, name: str):
    by_name = {f.name: f for f in fields(cls)}
    if name not in by_name:
        close = difflib.get_close_matches(name, list(by_name), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown config key {name!r}{hint}; see `tokenmorph {KINDS_BY_CLASS[cls]} --list-keys`"
        )
    return by_name[name]


def apply(cfg: EngineConfig, updates: dict, source: str) -> EngineConfig:
    """Set keys on ``cfg`` with type coercion and checks; ``source`` names where they came from."""
    cls = type(cfg)
    for key, value in updates.items():
        try:
            f = _field(cls, key)
            value = _coerce(cls, f, value)
            _check_value(f, value)
        except ConfigError as e:
            raise ConfigError(f"{e} (in {source})") from None
        setattr(cfg, key, value)
    return cfg


def parse_overrides(items: list[str]) -> dict:
    """['lr=1e-3', 'model=tiny'] -> {'lr': '1e-3', 'model': 'tiny'} (values typed later)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. lr=1e-3)")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _config_dir(kind: str) -> Path:
    return CONFIG_DIR if kind == "pretrain" else CONFIG_DIR / kind


def config_names(kind: str = "pretrain") -> list[str]:
    """Names of the configs of ``kind`` ("pretrain", "finetune", "segment") that ship with
    tokenmorph."""
    return sorted(p.stem for p in _config_dir(kind).glob("*.yaml"))


def load_config(name_or_path: str, overrides: dict | None = None, kind: str = "pretrain"):
    """A shipped config by name, or a YAML file by path; then ``overrides``; then validation.

    ``kind`` is "pretrain" (:class:`PretrainConfig`), "finetune" (:class:`FinetuneConfig`) or
    "segment" (:class:`SegmentConfig`). A config file may name a ``base:`` config whose values it
    extends.
    """
    cfg = CONFIG_CLASSES[kind]()
    _load_into(cfg, name_or_path, kind, seen=set())
    file_teacher = getattr(cfg, "teacher", None)
    if overrides:
        apply(cfg, overrides, "command-line overrides")
        # a config's teacher settings were written for its teacher: another teacher starts from
        # the defaults
        if getattr(cfg, "teacher", None) != file_teacher:
            defaults = type(cfg)()
            for f in fields(cfg):
                if f.metadata.get("teacher_setting") and f.name not in overrides:
                    setattr(cfg, f.name, getattr(defaults, f.name))
    return cfg.validate()


def _load_into(
    cfg: EngineConfig, name_or_path: str, kind: str, seen: set, folder: Path | None = None
) -> None:
    """Load a config file into ``cfg``, its ``base:`` first. ``folder``: the folder of the file
    that names ``name_or_path`` as its base; a relative path there is resolved against it."""
    path = Path(name_or_path).expanduser()
    if folder is not None and path.suffix in (".yaml", ".yml") and not path.is_absolute():
        path = folder / path
        if not path.exists():
            raise ConfigError(
                f"base: {name_or_path} names {path}, which does not exist (a base path is "
                "relative to the file that names it)"
            )
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        shipped = _config_dir(kind) / f"{name_or_path}.yaml"
        if not shipped.exists():
            raise ConfigError(
                f"no {kind} config named {name_or_path!r}: give a YAML file path or one of "
                f"{', '.join(config_names(kind))}"
            )
        path = shipped
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'")
    seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value")
    base = data.pop("base", None)
    if base:
        _load_into(cfg, str(base), kind, seen, folder=path.parent)
    cfg.name = path.stem
    apply(cfg, data, str(path))


def config_from_checkpoint(ckpt: dict) -> PretrainConfig:
    """The pre-training config a checkpoint was written with (keys this version does not know are
    left out)."""
    known = {f.name for f in fields(PretrainConfig)}
    return PretrainConfig(**{k: v for k, v in ckpt.get("config", {}).items() if k in known})
