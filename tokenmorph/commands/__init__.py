"""The ``tokenmorph`` commands, one module each (argparse + run); :mod:`tokenmorph.cli` registers
them.

Each module defines ``HELP`` (one line), ``DESCRIPTION``, ``add_arguments(parser)`` and
``run(args) -> int``. Module level imports nothing heavy, so that listing the commands is
instant; ``add_arguments`` runs only for the command asked for.
"""

# (group or None, name, module under tokenmorph.commands), in the order --help lists them
COMMANDS = [
    (None, "pretrain", "pretrain"),
    (None, "finetune", "finetune"),
    (None, "segment", "segment"),
    ("eval", "knn", "eval_knn"),
    ("eval", "linear", "eval_linear"),
    ("eval", "seg-linear", "eval_seg_linear"),
    (None, "compare", "compare"),
    (None, "export", "export"),
    ("analyze", "consistency", "analyze_consistency"),
    ("viz", "morph", "viz_morph"),
    ("viz", "reconstruct", "viz_reconstruct"),
    (None, "plot", "plot"),
    ("data", "shards", "data_shards"),
    ("bench", "morph", "bench_morph"),
    ("bench", "pretrain", "bench_pretrain"),
    ("bench", "segment", "bench_segment"),
    ("bench", "data", "bench_data"),
]
GROUPS = {
    "eval": "evaluation protocols on frozen features",
    "analyze": "analyses of teachers' targets",
    "viz": "pictures",
    "data": "data sets at scale (WebDataset shards)",
    "bench": "benchmarks that print numbers (JSON with --json)",
}
