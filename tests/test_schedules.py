"""DTM's schedule draws as the release makes them (engines/engine_for_dtm.py): the order of the
draws, their distribution over >= 20,000 draws against an independent formulation, one set per
chunk of the global batch, and the same per-sample schedules whatever the processes and
micro-batches."""

import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from tokenmorph.models import create_student
from tokenmorph.models.teachers import build_teacher
from tokenmorph.morph import effective_schedule, sample_schedules
from tokenmorph.recipes.config import load_config
from tokenmorph.recipes.objectives import PretrainObjective
from tokenmorph.runtime.sampling import KeyedDataset, StepBatchSampler, collate_keyed


def release_step_schedules(draw, n1=196, n2=196, k1max=14, k2max=14):
    """The release's per-step draw, written from its engine: num_merge of level 1 then of level 2
    (inclusive bounds), then k1 and k2; r_l = floor(nm_l / k_l) if ceil(nm_l / k_l) * k_l > n1
    else the ceiling (n1 for both levels); schedule l = [r_l] * k_l. ``draw(a, b)``: an inclusive
    uniform integer (Python's random.randint in the release)."""
    nm1, nm2 = draw(0, n1), draw(0, n2)
    k1, k2 = draw(1, k1max), draw(1, k2max)
    out = []
    for nm, k in ((nm1, k1), (nm2, k2)):
        up = -(-nm // k)
        out.append([nm // k if up * k > n1 else up] * k)
    return out


def test_the_release_order_of_draws_exactly_over_20000_steps():
    """The same Python random stream gives the same schedules, draw for draw."""
    ours, theirs = random.Random(11), random.Random(11)
    for _ in range(20_000):
        assert sample_schedules(2, 196, generator=ours) == release_step_schedules(theirs.randint)


def groups_of(schedule, n=196):
    return n - sum(effective_schedule(n, schedule))


def test_training_draws_follow_the_release_distribution():
    """20,000 schedule sets as training draws them (one per (step, chunk), seeded by (seed,
    step, chunk)) against 20,000 steps of the release's draw from one global Python random:
    the distribution of k, of r and of the realised group counts, level by level."""
    cfg = load_config("smoke", {"teacher": "pixels", "loss": "dtm", "k_max": 14})
    teacher = build_teacher("pixels", patch_size=16)
    objective = PretrainObjective(teacher, (14, 14), cfg)
    ours = [
        objective.criterion.sample_schedules(196, objective.schedule_rng(step)(chunk))
        for step in range(2_500)
        for chunk in range(8)
    ]
    rel = random.Random(5)
    theirs = [release_step_schedules(rel.randint) for _ in range(20_000)]

    def chi2_same(a, b, bins):
        """Two-sample chi-square of counts over ``bins`` (small bins merged away), with its
        degrees of freedom."""
        ca = np.array([a.count(v) for v in bins], float)
        cb = np.array([b.count(v) for v in bins], float)
        keep = ca + cb >= 20
        ca, cb = ca[keep], cb[keep]
        stat = (((ca - cb) ** 2) / (ca + cb)).sum()
        return stat, keep.sum() - 1

    for level in range(2):
        for feature, bins in (
            (len, range(1, 15)),  # k
            (lambda s: s[0], range(0, 197)),  # r
            (groups_of, range(0, 197)),  # groups left after the morph's caps
        ):
            a = [feature(s[level]) for s in ours]
            b = [feature(s[level]) for s in theirs]
            stat, dof = chi2_same(a, b, bins)
            assert stat < dof + 6 * math.sqrt(2 * dof), (level, stat, dof)
    # k is uniform on 1..14 (about 1,430 draws each, sd about 37)
    counts = np.bincount([len(s[0]) for s in ours], minlength=15)[1:]
    assert np.abs(counts - 20_000 / 14).max() < 5 * math.sqrt(20_000 / 14)
    # chunks of one step and the two levels of one draw are independent draws
    k_chunk0 = np.array([len(s[0]) for s in ours[0::8]], float)
    k_chunk1 = np.array([len(s[0]) for s in ours[1::8]], float)
    assert abs(np.corrcoef(k_chunk0, k_chunk1)[0, 1]) < 0.06
    assert abs(np.corrcoef([len(s[0]) for s in ours], [len(s[1]) for s in ours])[0, 1]) < 0.03


class Noise(Dataset):
    """Fixed random 32 px images (the index decides them)."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        return torch.rand(3, 32, 32, generator=g), 0


def test_processes_and_micro_batches_give_the_same_per_sample_schedules():
    """One process against the same global batch of 16 split into 2 ranks x 2 micro-batches, and
    into 4 micro-batches (chunks of 4 images): every sample gets the same schedules, and the mean
    of the micro-batch losses is the one-process loss."""
    cfg = load_config("smoke", {"chunk_size": 4, "batch_size": 16})
    torch.manual_seed(0)
    student = create_student("tiny", target_dim=16, img_size=32, patch_size=4, depth=2).eval()
    objective = PretrainObjective(build_teacher("pixels", patch_size=4), student.grid, cfg)
    data = KeyedDataset(Noise(), cfg.seed, extra_fn=objective.sample)
    targets = {}  # the teacher's tokens of a sample, whatever batch it is in

    def run(world, accum, step=3):
        per_sample, losses = {}, []
        for rank in range(world):
            sampler = StepBatchSampler(len(data), 16, accum, rank, world, cfg.seed)
            for keys in sampler.keys_for_step(step):
                batch = collate_keyed([data[k] for k in keys])
                d, mask = objective.degrade(batch, step)
                with torch.no_grad():
                    pred = student(d.inputs, mask)
                target = torch.stack(
                    [targets.setdefault(i, torch.randn(student.num_patches, 16)) for i, *_ in keys]
                )
                objective.teacher = lambda images, grid, t=target: t
                losses.append(float(objective.loss(pred, d, mask, step, batch["positions"])[0]))
                chunks = objective.chunks(batch["positions"], len(keys))
                for (index, _, position), chunk in zip(keys, chunks):
                    per_sample[index] = (position, objective.criterion.last_chunk_schedules[chunk])
        return per_sample, float(np.mean(losses))

    one, loss_one = run(1, 1)
    assert len(one) == 16 and sorted(p for p, _ in one.values()) == list(range(16))
    assert len({str(s) for _, s in one.values()}) == 4  # 4 chunks of 4 images, a draw each
    for world, accum in ((2, 2), (1, 4), (2, 1)):
        split, loss_split = run(world, accum)
        assert split == one, (world, accum)
        assert abs(loss_split - loss_one) < 1e-5, (world, accum)
