"""The runtime in-process: the data order of StepBatchSampler against an independent formulation,
       and the
Engine on a toy regression (resume position, gradient accumulation, a micro-batch with no image
left)."""

import torch
from torch import nn
from torch.utils.data import Dataset

from tokenmorph.recipes.config import EngineConfig
from tokenmorph.runtime.distributed import DistInfo
from tokenmorph.runtime.engine import Engine
from tokenmorph.runtime.sampling import KeyedDataset, StepBatchSampler, collate_keyed
from tokenmorph.runtime.seeding import mix_seed


def expected_global_batch(n, global_batch, seed, step):
    """The rule written out: permutation of epoch e seeded by mix_seed(seed, e, 0x5A3), cut in
    order; every key carries its position in the global batch (what per-chunk draws use)."""
    per_epoch = n // global_batch
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5A3)))
    batch = perm[b * global_batch : (b + 1) * global_batch]
    return [(int(i), epoch, position) for position, i in enumerate(batch)]


def test_sampler_shards_are_the_global_batch_in_order():
    """Keys are (index, epoch, position): the global batch in order, and each sample's position
    in it (what per-chunk draws use), whatever the ranks and accumulation steps."""
    n, batch, seed = 103, 24, 5  # 4 steps per epoch, 7 images dropped each epoch
    for accum, world in [(1, 1), (2, 1), (1, 3), (2, 2), (4, 3)]:
        samplers = [StepBatchSampler(n, batch, accum, r, world, seed) for r in range(world)]
        for step in (0, 3, 4, 9):  # epoch boundaries: steps 4 and 8 start new permutations
            micro = batch // accum
            got = []
            for a in range(accum):  # micro-batch a is the concatenation of the ranks' shards
                for s in samplers:
                    got += s.keys_for_step(step)[a]
                assert len(got) == (a + 1) * micro
            assert got == expected_global_batch(n, batch, seed, step), (accum, world, step)


def test_sampler_resumes_at_the_step_it_is_given():
    full = list(StepBatchSampler(50, 8, 2, 0, 1, seed=1).span(0, 12))
    tail = list(StepBatchSampler(50, 8, 2, 0, 1, seed=1).span(7, 12))
    assert len(full) == 12 * 2 and tail == full[7 * 2 :]
    assert len(StepBatchSampler(50, 8, 2, 0, 1, seed=1).span(7, 12)) == 5 * 2
    # every epoch is a permutation: 6 steps of 8 never repeat an image within epoch 0
    epoch0 = [k for mb in full[: 6 * 2] for k in mb]
    assert len({i for i, _, _ in epoch0}) == 48 and {e for _, e, _ in epoch0} == {0}


class Points(Dataset):
    """y = x @ w_true; items listed in ``bad`` are undecodable (None), as ImageFiles returns
    them."""

    def __init__(self, n=48, bad=()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])
        self.bad = set(bad)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return None if i in self.bad else (self.x[i], float(self.y[i]))


def regression_step(model, batch, step):
    pred = model(batch["images"]).squeeze(-1)
    return (pred - batch["labels"].float()).pow(2).mean(), {"mse": 0.0}


def make_engine(tmp_path, name, dataset=None, **overrides):
    cfg = EngineConfig(
        max_steps=6,
        batch_size=8,
        lr=0.05,
        warmup_steps=1,
        min_lr=0.0,
        precision="fp32",
        num_workers=0,
        save_every=2,
        keep_last=10,
        log_every=1,
        tensorboard=False,
        clip_grad=None,
        weight_decay=0.0,
        name=name,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    engine = Engine(
        cfg,
        model,
        regression_step,
        KeyedDataset(dataset or Points(), cfg.seed),
        tmp_path / name,
        info,
        kind="test",
        compat={"what": "toy"},
    )
    return engine, model


def test_engine_resumes_where_it_stopped_bit_for_bit(tmp_path):
    whole, m_whole = make_engine(tmp_path, "whole")
    whole.train()
    first, _ = make_engine(tmp_path, "parts", stop_after=3)
    assert first.resume() is None
    first.train()
    assert first.step == 3
    again, m_again = make_engine(tmp_path, "parts")
    assert again.resume().name == "step_00000003.pt" and again.step == 3
    summary = again.train()
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6 and summary["finished"]
    assert torch.equal(m_whole.weight, m_again.weight) and torch.equal(m_whole.bias, m_again.bias)
    assert again.images_seen == whole.images_seen == 6 * 8


def test_accumulation_trains_the_same_weights(tmp_path):
    one, m_one = make_engine(tmp_path, "one")
    one.train()
    four, m_four = make_engine(tmp_path, "four", accum_steps=4)
    four.train()
    torch.testing.assert_close(m_one.weight, m_four.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_one.bias, m_four.bias, rtol=1e-5, atol=1e-6)


def test_a_micro_batch_without_images_is_skipped_and_counted(tmp_path):
    # step 0's global batch, its first micro-batch of 4: all four undecodable
    first_micro = [i for i, _, _ in expected_global_batch(48, 8, 0, 0)[:4]]
    engine, model = make_engine(
        tmp_path, "bad", Points(bad=first_micro), accum_steps=2, max_steps=1
    )
    before = model.weight.detach().clone()
    summary = engine.train()
    assert summary["skipped_images"] == 4 and summary["images_seen"] == 4
    assert summary["skipped_steps"] == 0 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert not torch.equal(before, model.weight)  # the other micro-batch still trained the model


def test_batches_carry_global_positions_past_skipped_samples():
    """Every loaded sample keeps its position in the global batch (rank 1 of 2, accumulation
    step 1 of 2 holds positions 6 and 7 of 8), also when a sample of the batch is skipped."""
    sampler = StepBatchSampler(8, 8, 2, 1, 2, seed=3)
    keys = sampler.keys_for_step(0)[1]
    assert [q for _, _, q in keys] == [6, 7]
    bad = keys[0][0]
    ds = KeyedDataset(Points(8, bad={bad}), seed=0)
    batch = collate_keyed([ds[k] for k in keys])
    assert list(batch["positions"]) == [7] and batch["skipped"] == 1
    assert collate_keyed([(torch.zeros(3), 0.0, None)])["positions"] is None


def test_tensor_logs_are_recorded_as_their_float_values(tmp_path):
    """An objective's logs may be device tensors (no host sync a step): the record holds the
    same weighted means as for Python floats."""
    import json

    import pytest

    from tokenmorph.runtime.run_logger import RunLogger

    records = []
    for kind in (float, torch.tensor):
        run = tmp_path / kind.__name__
        log = RunLogger(run, True, 2, 2, 2, False, "test", loggers="none").open(0)
        for step, (a, b) in enumerate([(0.5, 2.0), (1.5, 4.0)], start=1):
            for v in (a, b):  # two micro-batches
                log.add_logs({"ring": kind(v)}, 0.5)
            if kind is torch.tensor:  # kept on the device until the record: no host sync
                assert isinstance(log.logs["ring"], torch.Tensor)
            log.step(step, 1.0, 8, 1e-3, 0.05, 1.0, {})
        log.close()
        records.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]))
    assert records[0]["ring"] == records[1]["ring"] == pytest.approx(2.0)
