"""Ready for several GPUs, checked on the CPU: several processes (torchrun, gloo) train what one
process trains for every framework x objective (the unmasked objectives leave the mask token
without a gradient), with a shard whose every image is undecodable on one rank; rank 0 chooses
the checkpoint every rank resumes; another precision on resume; the loader's uint8 images; the
pre-Ampere bf16 warning and the benchmark's peaks. (A signal to one rank only:
tests/test_adversarial.py.)"""

import itertools
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tokenmorph.ops.degrade import OBJECTIVES

from .conftest import make_photo_dir
from .helpers import final_weights, read_metrics, run_cli, run_torchrun, smoke_args

COMBOS = list(itertools.product(("beit", "mae"), OBJECTIVES))


def combo_overrides(framework: str, objective: str) -> list[str]:
    """The settings of one framework x objective smoke run (pixel targets for the MAE
    framework, the smoke config's random ViT teacher for the BEiT one), exact in fp32."""
    pixels = ["teacher=pixels"] if framework == "mae" else []
    return [f"framework={framework}", f"objective={objective}", *pixels]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_dir(tmp_path_factory.mktemp("dist-photos"))


def test_unused_parameters_are_exactly_those_without_a_gradient(photos):
    """What each objective declares unused (frozen, so DDP leaves it out) is exactly what one
    real step leaves without a gradient, for every framework x objective."""
    from tokenmorph.data import build_dataset, pretrain_transform
    from tokenmorph.recipes.config import load_config
    from tokenmorph.recipes.objectives import PretrainObjective, view_side
    from tokenmorph.recipes.pretrain import build_student_and_teacher
    from tokenmorph.runtime.sampling import KeyedDataset, collate_keyed

    for framework, objective in COMBOS:
        overrides = dict(o.split("=") for o in combo_overrides(framework, objective))
        cfg = load_config("smoke", {**overrides, "data": str(photos)})
        student, teacher = build_student_and_teacher(cfg, torch.device("cpu"))
        obj = PretrainObjective(teacher, student.grid, cfg)
        transform = pretrain_transform(view_side(cfg), (0.3, 1.0), 0.0)
        data = KeyedDataset(build_dataset(cfg.data, train=True, transform=transform), 0, obj.sample)
        batch = collate_keyed([data[(i, 0, i)] for i in range(4)])
        loss, _ = obj(student, batch, 0)
        loss.backward()
        without = {n for n, p in student.named_parameters() if p.requires_grad and p.grad is None}
        assert without == set(obj.unused_parameters()), (framework, objective)
        assert set(obj.unused_parameters()) == (
            set() if "mask" in obj.sample(np.random.default_rng(1)) else {"mask_token"}
        )


def bad_shard_data(photos, root, step: int = 1):
    """A copy of ``photos`` in which every image rank 1 of 2 loads at ``step`` (0-based) is
    undecodable; returns (folder, number of files spoilt)."""
    from tokenmorph.data import build_dataset
    from tokenmorph.recipes.config import load_config
    from tokenmorph.runtime.sampling import StepBatchSampler

    data = root / "data"
    shutil.copytree(photos, data)
    cfg = load_config("smoke", {"data": str(data)})
    files = build_dataset(cfg.data, train=True).files
    sampler = StepBatchSampler(len(files), cfg.batch_size, 1, 1, 2, cfg.seed)
    (keys,) = sampler.keys_for_step(step)
    for index, _, _ in keys:
        files[index].write_bytes(b"not an image")
    return data, len(keys)


def torchrun(port: int, *args) -> subprocess.CompletedProcess:
    proc = run_torchrun(*args, port=port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_two_match_one(data, tmp_path, port: int, overrides, spoilt: int) -> None:
    """One process and two processes (gloo) train the same weights and log the same losses;
    step 2's shard of rank 1 is all undecodable (``spoilt`` files)."""
    common = ["--config", "smoke", "--data", data, "--max-steps", "3", "precision=fp32"]
    common += ["drop_path=0", *overrides]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("pretrain", *common, "--output-dir", one)
    torchrun(port, "pretrain", *common, "--output-dir", two)
    w1, w2 = final_weights(one), final_weights(two)
    assert w2["world_size"] == 2 and w2["skipped_images"] == w1["skipped_images"] == spoilt
    for k in w1["model"]:
        torch.testing.assert_close(w1["model"][k], w2["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["skipped_images"] for r in m2] == [0, spoilt, spoilt]
    np.testing.assert_allclose([r["loss"] for r in m1], [r["loss"] for r in m2], rtol=1e-4)


@pytest.mark.slow  # also covered by the every-objective test below; ~30 s
def test_two_processes_match_one_unmasked_with_an_all_bad_shard(photos, tmp_path):
    """The issue's crash (MAE + blur: the mask token has no gradient) and hang (rank 1's shard
    all undecodable at step 2: its zero loss goes through DDP): both gone, and the weights are
    those of one process (the gradient is the mean over the ranks that had images)."""
    data, spoilt = bad_shard_data(photos, tmp_path)
    assert_two_match_one(data, tmp_path, 29561, combo_overrides("mae", "blur"), spoilt)


@pytest.mark.slow
@pytest.mark.parametrize("framework,objective", COMBOS)
def test_every_framework_and_objective_under_two_processes(photos, tmp_path, framework, objective):
    data, spoilt = bad_shard_data(photos, tmp_path)
    port = 29563 + COMBOS.index((framework, objective))
    assert_two_match_one(data, tmp_path, port, combo_overrides(framework, objective), spoilt)


# ------------------------------------------------------------------ resuming: which checkpoint
def _open_folder_in_rank(rank: int, folders: list[str], data: str, port: int, out: str) -> None:
    """Rank ``rank`` of 2 (gloo): open the run folder ``folders[rank]`` as pre-training does and
    write which checkpoint it resumes, and at which step, to ``out``.RANK."""
    import json

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tokenmorph.recipes.config import load_config
    from tokenmorph.runtime.distributed import init_distributed, shutdown_distributed
    from tokenmorph.runtime.run_folder import RunFolder

    cfg = load_config(
        "smoke", {"data": data, "output_dir": folders[rank], "save_every": 2, "max_steps": 4}
    )
    info = init_distributed("cpu")
    with RunFolder.open(cfg, info, "pretrain") as folder:
        found = {"path": str(folder.checkpoint_path), "step": folder.step}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(found, f)
    shutdown_distributed()


def test_rank_0_chooses_the_checkpoint_every_rank_resumes(photos, tmp_path):
    """A shared file system that does not yet show rank 1 the newest checkpoint (rank 1's view
    of the run folder lacks step 4): rank 1 still resumes the file rank 0 chose, at rank 0's
    step."""
    import json

    import torch.multiprocessing as mp

    from tokenmorph.runtime.checkpoints import find_checkpoints

    seen, lagging = tmp_path / "run", tmp_path / "lagging-view"
    run_cli(*smoke_args(photos, seen, "--max-steps", "4", "save_every=2"))
    shutil.copytree(seen, lagging)
    (lagging / "checkpoints" / "step_00000004.pt").unlink()
    assert [p.name for p in find_checkpoints(lagging)] == ["step_00000002.pt"]
    out = str(tmp_path / "found")
    mp.spawn(
        _open_folder_in_rank, args=([str(seen), str(lagging)], str(photos), 29585, out), nprocs=2
    )
    found = [json.loads(open(f"{out}.{r}").read()) for r in range(2)]
    chosen = str(seen / "checkpoints" / "step_00000004.pt")
    assert found == [{"path": chosen, "step": 4}] * 2


# ------------------------------------------------------------------ resuming: another precision
def test_a_bf16_checkpoint_resumes_under_fp16(tmp_path):
    """The GradScaler state of a bf16 run is empty; an fp16 run resuming it starts from a fresh
    loss scale instead of crashing, and an fp16 checkpoint's scale is kept (CPU: an enabled
    GradScaler on the CPU stands in for CUDA's, the state-dict path is the same)."""
    from tokenmorph.recipes.config import load_config
    from tokenmorph.runtime.optim import OptimizerStep

    model = torch.nn.Linear(4, 2)

    def optim_step(precision):
        step = OptimizerStep(load_config("smoke", {"precision": precision}), model, 10, 5)
        if precision == "fp16":  # CUDA's scaler is disabled without CUDA
            step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
        step.begin(0)
        step.backward(model(torch.ones(3, 4)).square().mean(), 1)
        step.apply()
        return step

    bf16 = optim_step("bf16").state_dict()
    assert bf16["scaler"] == {}
    fp16 = optim_step("fp16")
    fresh = fp16.scaler.get_scale()
    fp16.load_state_dict(bf16, apply_config=True)
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() == fresh
    saved = fp16.state_dict()
    saved["scaler"]["scale"] = 2.0**7
    again = optim_step("fp16")
    again.load_state_dict(saved)
    assert again.scaler.get_scale() == 2.0**7
    back = optim_step("bf16")  # fp16 -> bf16: the scale is ignored
    back.load_state_dict(saved, apply_config=True)
    assert not back.scaler.is_enabled()


# ------------------------------------------------------------------ the loader sends uint8
def test_uint8_loader_path_equals_the_float_path(photos):
    """The loader's uint8 images (a quarter of the shared memory), made float on the device,
    are bit for bit the float path's images, with the same per-sample draws (crop, jitter,
    flip, mask)."""
    from tokenmorph.data import build_dataset, pretrain_transform
    from tokenmorph.ops.masking import BlockMasking
    from tokenmorph.runtime.sampling import KeyedDataset, batch_to_device, collate_keyed

    masks = BlockMasking((8, 8), 24, min_num_patches=4)

    def batch(uint8):
        transform = pretrain_transform(48, (0.2, 1.0), 0.4, uint8=uint8)
        data = build_dataset(str(photos), train=True, transform=transform)
        keyed = KeyedDataset(data, 7, extra_fn=masks.sample)
        return collate_keyed([keyed[(i, 3, i)] for i in range(0, 40, 3)])

    small, ref = batch(True), batch(False)
    assert small["images"].dtype == torch.uint8 and ref["images"].dtype == torch.float32
    assert small["images"].nbytes * 4 == ref["images"].nbytes
    on_device = batch_to_device(small, torch.device("cpu"))
    assert on_device["images"].dtype == torch.float32
    assert torch.equal(on_device["images"], ref["images"])
    assert torch.equal(on_device["extra"], ref["extra"])


# ------------------------------------------------------------------ GPUs: bf16, the MFU peak
def test_bf16_before_ampere_gets_one_warning_line(monkeypatch):
    """bf16 on a compute capability 7.x GPU (V100, T4) is emulated: one line says so and names
    precision=fp16; an Ampere GPU, fp16 or the CPU get none (the capability check patched: no
    GPU here)."""
    from tokenmorph.runtime.precision import bf16_warning

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    line = bf16_warning("bf16", cuda)
    assert "\n" not in line and "Tesla V100-SXM2-16GB (compute capability 7.0" in line
    assert "use precision=fp16" in line
    assert bf16_warning("fp16", cuda) is None and bf16_warning("fp32", cuda) is None
    assert bf16_warning("bf16", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert bf16_warning("bf16", cuda) is None


def test_spec_peaks_by_device_name():
    from tokenmorph.bench.timing import matmul_peak, spec_peak

    assert spec_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert spec_peak("NVIDIA H100 PCIe", torch.float16) == 756e12
    assert spec_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert spec_peak("Tesla T4", torch.float16) == 65e12
    assert spec_peak("Tesla T4", torch.bfloat16) is None  # no bf16 tensor cores
    assert spec_peak("NVIDIA A100-SXM4-80GB", torch.float32) is None
    assert spec_peak("Some Future GPU", torch.bfloat16) is None
    # the CPU path: a small product, a plausible rate (more than 100 MFLOP/s, finite)
    assert 1e8 < matmul_peak(torch.float32, "cpu", n=256, repeats=3) < float("inf")
