"""``tokenmorph data shards SRC OUT``: a folder of images or Fashion-MNIST as WebDataset tar
shards."""

from __future__ import annotations

import argparse

from ..runtime.run_logger import dump_json

HELP = "write a folder of images or Fashion-MNIST as WebDataset tar shards"
DESCRIPTION = """\
Write SRC (a folder of images, an ImageFolder tree, or fashion-mnist[:DIR]) as WebDataset tar
shards in OUT: OUT/NAME-SPLIT-000000.tar, ... with one sample per image (KEY.jpg/png/..., the
file's own bytes; Fashion-MNIST as lossless PNG; KEY.cls with the class index when the data is
labelled) and OUT/_info.json in timm's format (splits, sample counts, shard names and lengths,
class names). Shards are written under a temporary name and renamed when complete, the index
last. Fashion-MNIST gives two splits, train and validation (its test split); a folder gives
--split (run again with another --split to add one).

Then use OUT wherever a data folder goes (tokenmorph pretrain --data OUT, finetune, compare; eval
knn/linear --dataset OUT for its train and validation splits): it is read with random access (a
small index written next to each shard gives every sample's offset), so the data order, the
per-sample seeding, skip-and-count of undecodable images and exact resume are those of a folder.
The layout and _info.json are those timm's wds/ reader parses
(timm.data.create_dataset("wds/NAME", root=OUT, ...), which needs the webdataset package).

examples:
  tokenmorph data shards fashion-mnist shards/fmnist --shard-size 5000
  tokenmorph data shards /data/imagenet/train shards/in1k --name imagenet --shard-size 1250
  tokenmorph data shards /data/imagenet/val shards/in1k --name imagenet --split validation
  tokenmorph pretrain --config smoke --data shards/fmnist --output-dir runs/smoke
  tokenmorph eval knn --checkpoint runs/smoke --dataset shards/fmnist
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="folder of images, or fashion-mnist[:DIR]")
    parser.add_argument("out", metavar="OUT", help="folder for the shards and _info.json")
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument("--name", help="the shards' name prefix (default: the name of OUT)")
    parser.add_argument(
        "--split", default="train", help="split name of a folder's samples (default train)"
    )
    parser.add_argument(
        "--labels",
        default="auto",
        choices=["auto", "none", "folders"],
        help="a folder's labels: its class sub-folders (auto: when it has some), or none",
    )
    parser.add_argument("--json", action="store_true", help="print the splits as one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..data import FashionMNIST, ImageFiles
    from ..data.shards import array_samples, folder_samples, write_shards
    from ..data.sources import _parse_source
    from ..errors import ConfigError, DataError

    if args.shard_size < 1:
        raise ConfigError(f"--shard-size {args.shard_size}: give a positive number of samples")
    name = args.name or (args.out.rstrip("/").split("/")[-1] or "shards")
    if "-" in name or "." in name:
        # WebDataset keys end at the first dot; timm's names are NAME-SPLIT-NNNNNN
        name = name.replace("-", "_").replace(".", "_")
    kind, path = _parse_source(args.source)
    splits = {}
    if kind == "fashion-mnist":
        for split, train in (("train", True), ("validation", False)):
            ds = FashionMNIST(path, train=train)
            samples = array_samples(ds.data.numpy(), ds.targets.tolist())
            splits[split] = write_shards(
                samples, args.out, name, split, args.shard_size, ds.classes
            )
    elif kind == "images":
        if not path.exists():
            raise DataError(f"{args.source} is neither fashion-mnist[:DIR] nor a folder of images")
        ds = ImageFiles(path, labels=args.labels)
        splits[args.split] = write_shards(
            folder_samples(ds), args.out, name, args.split, args.shard_size, ds.classes
        )
    else:
        raise ConfigError(f"{args.source} is already a folder of shards")
    if args.json:
        print(dump_json(splits))
        return 0
    for split, entry in splits.items():
        print(
            f"{split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards "
            f"({entry['filenames'][0]} ...), {len(entry.get('classes', []))} classes"
        )
    print(f"index: {args.out}/_info.json; use --data {args.out}")
    return 0
