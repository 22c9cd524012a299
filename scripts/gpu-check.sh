#!/usr/bin/env bash
# The first check of tokenmorph on a GPU (issue 18), under 10 minutes on one GPU: versions and
# bf16 support; smoke pre-trainings on CUDA in bf16 and fp16 for a masked (beit + mask) and an
# unmasked (mae + blur) objective; resume on CUDA against an uninterrupted run, and the
# checkpoint loaded on the CPU; host syncs per training step (torch.cuda.set_sync_debug_mode);
# which SDPA kernels the student's attention can use (its relative position bias rules out
# flash attention); with two or more GPUs, a 2-process NCCL run of the unmasked objective; the
# ViT-B DTM step benchmark at batch 128.
#
# Every section prints one JSON object on stdout (a line starting with '{'); progress goes to
# stderr. Run from anywhere:  bash scripts/gpu-check.sh > gpu-check.jsonl
# Environment: PYTHON (default python), OUT_DIR (default a fresh temporary folder),
# SKIP_BENCH=1 to leave the benchmark out, DEVICE=cpu for a dry run of the script itself on a
# machine without a GPU (bf16 only; the GPU-only sections are left out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT_DIR:-$(mktemp -d -t tokenmorph-gpu-check.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA="$OUT/photos"
DEVICE=${DEVICE:-cuda}
export DEVICE
PRECISIONS="bf16 fp16"
[ "$DEVICE" = cuda ] || PRECISIONS="bf16"
say() { echo "== $*" >&2; }
tm() { timeout "${LIMIT:-300}" "$PY" -m tokenmorph "$@"; }
summary() { tail -n 1; }  # a pretrain run's last stdout line is its JSON summary

say "versions and bf16 support"
"$PY" - <<'EOF'
import json, platform
import torch, torchvision, timm
import os
if os.environ["DEVICE"] == "cpu":
    print(json.dumps({"check": "versions", "torch": torch.__version__, "device": "cpu"}))
    raise SystemExit
assert torch.cuda.is_available(), "no CUDA device visible: this check needs a GPU"
d = torch.device("cuda", 0)
print(json.dumps({
    "check": "versions",
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "timm": timm.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "gpus": torch.cuda.device_count(),
    "gpu": torch.cuda.get_device_name(d),
    "capability": ".".join(map(str, torch.cuda.get_device_capability(d))),
    "bf16_supported": torch.cuda.is_bf16_supported(),
    "memory_gib": round(torch.cuda.get_device_properties(d).total_memory / 2**30, 1),
}))
EOF

say "photos for the smoke runs in $DATA"
"$PY" -c "
import pathlib, sys
from tests.conftest import make_photo_dir
p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True)
if not any(p.iterdir()): make_photo_dir(p)
" "$DATA"

MASKED="framework=beit objective=mask"
UNMASKED="framework=mae objective=blur teacher=pixels"
for precision in $PRECISIONS; do
  for name in masked unmasked; do
    if [ "$name" = masked ]; then combo=$MASKED; else combo=$UNMASKED; fi
    say "smoke run on CUDA: $name objective ($combo), $precision"
    # shellcheck disable=SC2086  # the combo is several key=value words
    tm pretrain --config smoke $combo "precision=$precision" --device "$DEVICE" --data "$DATA" \
      --output-dir "$OUT/smoke-$name-$precision" --max-steps 6 | summary
  done
done

say "resume on CUDA (3 + 3 steps against 6 uninterrupted), then the checkpoint on the CPU"
for combo_name in masked unmasked; do
  if [ "$combo_name" = masked ]; then combo=$MASKED; else combo=$UNMASKED; fi
  # shellcheck disable=SC2086
  tm pretrain --config smoke $combo --device "$DEVICE" --data "$DATA" \
    --output-dir "$OUT/resumed-$combo_name" --max-steps 6 stop_after=3 save_every=3 > /dev/null
  # shellcheck disable=SC2086
  tm pretrain --config smoke $combo --device "$DEVICE" --data "$DATA" \
    --output-dir "$OUT/resumed-$combo_name" --max-steps 6 save_every=3 > /dev/null
  "$PY" - "$OUT/resumed-$combo_name" "$OUT/smoke-$combo_name-bf16" "$combo_name" <<'EOF'
import json, sys
import torch
from tokenmorph.models.build import student_from_checkpoint
from tokenmorph.runtime.checkpoints import find_checkpoints, load_checkpoint
resumed, straight = (load_checkpoint(find_checkpoints(p)[-1]) for p in sys.argv[1:3])
diff = max((resumed["model"][k].float() - straight["model"][k].float()).abs().max().item()
           for k in straight["model"])
student = student_from_checkpoint(resumed).eval()  # on the CPU
side = student.arch["img_size"]
with torch.no_grad():
    out = student(torch.rand(2, 3, side, side))
print(json.dumps({
    "check": "resume", "objective": sys.argv[3], "steps": resumed["step"],
    # not bit-exact on a GPU (float atomics in index_add_/scatter_add_, kernel choice): small
    "max_abs_weight_diff_vs_uninterrupted": diff,
    "cpu_forward_finite": bool(torch.isfinite(out).all()), "cpu_output_shape": list(out.shape),
}))
EOF
done

if [ "$DEVICE" != cuda ]; then
  say "dry run on $DEVICE: the GPU-only sections are left out; run folders in $OUT"
  exit 0
fi

say "host syncs per training step (set_sync_debug_mode warn), both objectives"
"$PY" - "$DATA" "$OUT" <<'EOF'
import contextlib, json, sys, warnings
import torch
from tokenmorph.cli import main
data, out = sys.argv[1:3]
combos = {"masked": ["framework=beit", "objective=mask"],
          "unmasked": ["framework=mae", "objective=blur", "teacher=pixels"]}
for name, combo in combos.items():
    counts = {}
    for steps in (2, 6):  # the difference: the syncs of 4 steps, start-up and saving excluded
        args = ["pretrain", "--config", "smoke", *combo, "--device", "cuda", "--data", data,
                "--output-dir", f"{out}/sync-{name}-{steps}", "--max-steps", str(steps),
                "save_every=1000", "log_every=1000"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:  # the run's own lines to stderr: stdout keeps this check's JSON
                with contextlib.redirect_stdout(sys.stderr):
                    status = main(args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert status == 0, f"pretrain exited {status}"
        counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
    print(json.dumps({"check": "syncs", "objective": name, "syncs_2_steps": counts[2],
                      "syncs_6_steps": counts[6],
                      "syncs_per_step": (counts[6] - counts[2]) / 4}))
EOF

say "SDPA kernels of the student's attention (ViT-B, 224 px, bf16)"
"$PY" - <<'EOF'
import json
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tokenmorph.models import create_mae_student, create_student
d = torch.device("cuda", 0)
x = torch.rand(8, 3, 224, 224, device=d)
result = {"check": "sdpa"}
for name, student in (("beit", create_student("base", target_dim=512)),
                      ("mae", create_mae_student("base", target_dim=768))):
    student = student.to(d).eval()
    encoder = student.encoder
    usable = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]), torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                student(x)
            usable.append(backend.name)
        except RuntimeError:
            pass
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:  # the aten op and its kernel
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            student(x)
        torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages()
                      if any(k in e.key.lower() for k in ("flash", "fmha", "attention", "sdpa"))})
    result[name] = {"timm_fused_attn": bool(getattr(encoder.blocks[0].attn, "fused_attn", False)),
                    "usable_backends": usable, "attention_ops_and_kernels": kernels[:8]}
print(json.dumps(result))
EOF

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  say "2 processes on 2 GPUs (NCCL), unmasked objective"
  # shellcheck disable=SC2086
  timeout 300 "$PY" -m torch.distributed.run --nproc_per_node 2 -m tokenmorph pretrain \
    --config smoke $UNMASKED --device cuda --data "$DATA" --output-dir "$OUT/ddp-unmasked" \
    --max-steps 4 batch_size=16 | summary
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  say "ViT-B DTM step benchmark at batch 128 (bf16, random CLIP teacher)"
  LIMIT=400 tm bench pretrain --model base --teacher clip-vit-b16 --random-init --device cuda \
    --precision bf16 --batch-size 128 --steps 5 --no-baseline --json
  say "ViT-B steps of both frameworks at batch 128"
  LIMIT=400 tm bench pretrain --model base --random-init --device cuda --precision bf16 \
    --batch-size 128 --steps 3 --framework beit,mae --objective mask,blur --json
fi
say "done; run folders in $OUT"
