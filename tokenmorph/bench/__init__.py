"""Benchmarks that print numbers (``tokenmorph bench ...``): where a step's time goes, against
   the
official release's formulation measured in the same run."""

from .morph import bench_morph
from .pretrain import bench_objectives, bench_pretrain
from .release import release_dense_dtm_loss, release_dense_membership
from .segment import bench_segment
from .timing import matmul_peak, timeit

__all__ = [
    "bench_morph",
    "bench_pretrain",
    "bench_objectives",
    "bench_segment",
    "release_dense_dtm_loss",
    "release_dense_membership",
    "matmul_peak",
    "timeit",
]
