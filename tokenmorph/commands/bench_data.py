"""``tokenmorph bench data``: images/s of the pre-training loader from a JPEG folder, tar shards
and memory."""

from __future__ import annotations

import argparse

from ..runtime.run_logger import dump_json
from .common import parse_int_list

HELP = "images/s of the data loader: JPEG folder vs tar shards vs memory, by crop and workers"
DESCRIPTION = """\
Writes --images photo crops (500 x 375 JPEG, ImageNet's usual size) to a temporary folder, packs
them into WebDataset tar shards, and times one pass of the pre-training loader (colour jitter,
flip, RandomResizedCrop, ToTensor; per-sample seeding; skip-and-count collate) over each source
(the JPEG folder, the tar shards, the decoded images in memory) at each --crops side and each
--workers count. images/s are counted from the first batch to the last (worker start-up is paid
once per run, not per batch). --decode-device adds the decode=device rows: the workers read the
files and draw the same augmentation parameters, and each batch is decoded (decode_jpeg: nvjpeg
on CUDA) and augmented on that device, timed to its last kernel.

examples:
  tokenmorph bench data --json                                     # the defaults
  tokenmorph bench data --images 1024 --crops 224 --workers 0,4,8  # a bigger machine
  tokenmorph bench data --crops 224 --workers 4 --decode-device cuda --json  # decode=device too
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=256, help="images per pass (default 256)")
    parser.add_argument(
        "--crops", default="32,224", help="crop sides, comma list (default 32,224: demo, ImageNet)"
    )
    parser.add_argument(
        "--workers", default="0,2,4", help="data-loader workers, comma list (default 0,2,4)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    parser.add_argument(
        "--decode-device",
        default=None,
        choices=("cuda", "cpu", "auto"),
        help="also time decode=device with the batches decoded and augmented on this device "
        "(auto: cuda when there is one, else left out)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..bench.data import bench_data
    from ..errors import ConfigError

    crops, workers = (
        parse_int_list(args.crops, "--crops"),
        parse_int_list(args.workers, "--workers"),
    )
    if args.images < 2 * args.batch_size or min(crops) < 1 or min(workers) < 0:
        raise ConfigError(
            f"--images {args.images} must hold two batches of --batch-size {args.batch_size}, "
            "crops must be positive and workers not negative"
        )
    device = args.decode_device
    if device is not None:
        import torch

        from ..runtime.distributed import resolve_device

        if device != "auto" or torch.cuda.is_available():
            device = str(resolve_device(device))  # a one-line error without CUDA
        else:
            device = None
    result = bench_data(
        args.images, tuple(crops), tuple(workers), args.batch_size, args.shard_size,
        decode_device=device,
    )  # fmt: skip
    if args.json:
        print(dump_json(result))
        return 0
    m = result["machine"]
    print(
        f"data loader, {result['images']} images of 500x375 JPEG, batch {result['batch_size']}, "
        f"{m['cpus']} CPUs ({m['processor']})"
    )
    print(f"  {'source':<12} {'decode':<12} {'crop':>5} {'workers':>8} {'images/s':>10}")
    for r in result["results"]:
        print(
            f"  {r['source']:<12} {r['decode']:<12} {r['crop']:>5} {r['workers']:>8} "
            f"{r['images_per_s']:>10.1f}"
        )
    return 0
