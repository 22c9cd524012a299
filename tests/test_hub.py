"""timm's hub format (``tokenmorph export CKPT FOLDER``) and the one backbone resolver.

An export folder must load with ``timm.create_model("local-dir:DIR", pretrained=True)`` alone,
strictly (every ``load_state_dict`` call is intercepted), and give the checkpoint's features;
every backbone form must resolve to the same encoder.
"""

import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenmorph.hub.backbone import load_backbone, resolve_encoder
from tokenmorph.hub.export import export_encoder, export_hub, hub_architecture
from tokenmorph.models import student_from_checkpoint
from tokenmorph.models.arch import STUDENT_SIZES
from tokenmorph.runtime.checkpoints import find_checkpoints, load_checkpoint

from .helpers import run_main
from .test_export import SMOKE_ARCH, photos, recorded_loads, write_checkpoint


@pytest.fixture(scope="module")
def beit_run(tmp_path_factory):
    """A run folder holding one BEiT-framework checkpoint of the smoke geometry ("both" rel-pos
    layout: per-block tables plus the shared one, merged on export)."""
    run = tmp_path_factory.mktemp("beit") / "run"
    write_checkpoint(run / "checkpoints" / "step_00000003.pt", **SMOKE_ARCH, rel_pos="both")
    return run


def student_of(run):
    return student_from_checkpoint(load_checkpoint(find_checkpoints(run)[-1])).eval()


def timm_alone(folder, images):
    """``timm.create_model("local-dir:FOLDER", pretrained=True)`` in a fresh interpreter that
    never imports tokenmorph; returns its forward_features of ``images`` (normalised with the
    resolved data config's mean/std), its class name and input size. The one load it makes must
    be strict and complete."""
    code = f"""
import sys, timm, torch
assert "tokenmorph" not in sys.modules
calls, original = [], torch.nn.Module.load_state_dict
def spy(self, state_dict, strict=True, **kw):
    result = original(self, state_dict, strict=strict, **kw)
    calls.append((strict, result.missing_keys, result.unexpected_keys))
    return result
torch.nn.Module.load_state_dict = spy
model = timm.create_model("local-dir:{folder}", pretrained=True).eval()
assert calls == [(True, [], [])], calls
cfg = timm.data.resolve_data_config(model=model)
mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
x = torch.load(sys.argv[1])
with torch.no_grad():
    out = model.forward_features((x - mean) / std)
assert "tokenmorph" not in sys.modules
torch.save((out, type(model).__name__, cfg["input_size"]), sys.argv[2])
"""
    x, out = Path(folder).parent / "x.pt", Path(folder).parent / "timm_alone.pt"
    torch.save(images, x)
    subprocess.run([sys.executable, "-c", code, str(x), str(out)], check=True, timeout=300)
    return torch.load(out)


@pytest.mark.parametrize("framework", ["beit", "mae"])
def test_hub_export_loads_in_timm_alone_strictly_with_the_same_features(
    framework, beit_run, mae_run, tmp_path, capsys
):
    run = beit_run if framework == "beit" else mae_run
    old = os.umask(0o027)  # a group-shared umask: the export must be readable by the group
    try:
        status, out, err = run_main(capsys, "export", run, tmp_path / "hub")
    finally:
        os.umask(old)
    folder = tmp_path / "hub"
    assert status == 0 and sorted(os.listdir(folder)) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in folder.iterdir())
    config = json.loads((folder / "config.json").read_text())
    meta = config["tokenmorph"]
    expected = "beit_base_patch16_224" if framework == "beit" else "vit_tiny_patch16_224"
    assert config["architecture"] == expected and meta["student_size"] == "tiny"
    assert config["model_args"]["embed_dim"] == 192 and config["model_args"]["depth"] == 2
    assert config["pretrained_cfg"]["tag"] == "tokenmorph"
    assert "license" not in config["pretrained_cfg"]  # the registry entry's does not leak in
    assert f"local-dir:{folder.resolve()}" in out
    student = student_of(run)
    feats, cls, input_size = timm_alone(folder, photos(32))
    with torch.no_grad():
        ours = student.forward_features(photos(32))
    assert cls == ("Beit" if framework == "beit" else "VisionTransformer")
    assert tuple(input_size) == (3, 32, 32)
    assert feats.shape == ours.shape and (feats - ours).abs().max().item() < 1e-4
    # a "both" student's shared table is merged into each block's own
    saved = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith("rel_pos_bias.") for k in saved)
    # a head for fine-tuning: timm's usual path, every other weight loaded
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=5)
    assert model.head.out_features == 5
    assert torch.equal(model.state_dict()["norm.weight"], saved["norm.weight"])


@pytest.mark.parametrize("framework", ["beit", "mae"])
@pytest.mark.parametrize("size", list(STUDENT_SIZES))
def test_every_size_is_recorded_under_its_class_and_size(framework, size):
    """The registered name of every size rebuilds the same class as the student's (on the meta
    device), and names the real size wherever timm registers one."""
    import timm

    d, L, h = STUDENT_SIZES[size]
    arch = dict(img_size=224, patch_size=16, embed_dim=d, depth=L, num_heads=h)
    arch.update(framework="mae") if framework == "mae" else arch.update(init_values=0.1)
    name = hub_architecture(arch)
    assert timm.is_model(name)
    if framework == "mae":
        assert name == f"vit_{size}_patch16_224"
    else:  # timm registers BEiT at base and large only
        assert name == f"beit_{'large' if size == 'large' else 'base'}_patch16_224"
    assert hub_architecture({**arch, "patch_size": 8}) == (
        f"vit_{size}_patch8_224"
        if framework == "mae" and timm.is_model(f"vit_{size}_patch8_224")
        else name
    )


def test_every_backbone_form_resolves_to_the_same_encoder(beit_run, tmp_path):
    folder = export_hub(beit_run, tmp_path / "hub")
    weights, json_path = export_encoder(beit_run, tmp_path / "enc.safetensors")
    x = photos(32)
    with torch.no_grad():
        ours = student_of(beit_run).forward_features(x)
    forms = [
        beit_run,
        find_checkpoints(beit_run)[-1],
        folder,
        f"local-dir:{folder}",
        weights,
        json_path,
    ]
    for spec in forms:
        backbone = load_backbone(str(spec))
        assert backbone.img_size == 32 and backbone.num_prefix_tokens == 1
        with torch.no_grad():
            assert (backbone.tokens(x) - ours).abs().max().item() < 1e-4, spec
    # timm:NAME (random init: no network) and hf-hub:NAME go through the same resolver
    enc, source = resolve_encoder("timm:vit_tiny_patch16_224", "x", random_init=True, img_size=32)
    assert source == "timm:vit_tiny_patch16_224" and enc.arch["framework"] == "mae"
    assert enc.arch["embed_dim"] == 192 and enc.arch["img_size"] == 32


def test_older_format_recipe_works_from_another_folder_and_after_a_move(beit_run, tmp_path):
    weights, json_path = export_encoder(beit_run, tmp_path / "a" / "enc.safetensors")
    recipe = json.loads(json_path.read_text())
    assert Path(recipe["weights"]).is_absolute() and Path(recipe["weights"]) == weights.resolve()
    assert stat.S_IMODE(weights.stat().st_mode) & 0o044  # not safetensors' 0600
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    backbone = load_backbone(str(moved / "enc.json"))  # the weights next to the recipe
    assert backbone.embed_dim == 192


def test_eval_knn_takes_an_export(beit_run, class_tree, tmp_path, capsys):
    weights, _ = export_encoder(beit_run, tmp_path / "enc.safetensors")
    results = []
    for spec in (weights, export_hub(beit_run, tmp_path / "hub"), beit_run):
        args = ("eval", "knn", "--checkpoint", spec, "--num-workers", "0")
        status, out, err = run_main(
            capsys, *args, "--train", class_tree / "train", "--val", class_tree / "val"
        )
        assert status == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        results.append({k: result[k] for k in ("top1", "top5", "num_train", "feature_dim")})
    assert results[0] == results[1] == results[2]  # the same features, the same neighbours


def test_push_to_hub_uploads_the_folder(beit_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # everything up to the network: repo created, the folder uploaded
        def __init__(self, token=None, **kw):
            calls.append(("init", kw.get("library_name")))

        def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
            calls.append(("create", repo_id, private, exist_ok))
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kw):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = ("export", beit_run, tmp_path / "hub", "--push-to-hub", "me/tm", "--private")
    status, out, _ = run_main(capsys, *args)
    assert status == 0 and "hf-hub:me/tm" in out
    assert calls == [
        ("init", "tokenmorph"),
        ("create", "me/tm", True, True),
        ("upload", "me/tm", ["README.md", "config.json", "model.safetensors"]),
    ]


def test_errors_are_one_line(beit_run, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine\n")
    export_hub(beit_run, tmp_path / "hub")
    cases = [
        (("export", beit_run, tmp_path / "notes"), "not an export"),
        (("export", beit_run, tmp_path / "hub"), "--force"),
        (("export", beit_run, tmp_path / "enc.pt"), "give a folder"),
        (("export", beit_run, tmp_path / "x.safetensors", "--push-to-hub", "me/x"), "folder"),
        (("eval", "knn", "--checkpoint", "local-dir:/no/such", "--dataset", "x"), "no such"),
        (
            ("viz", "reconstruct", "--checkpoint", tmp_path / "hub", "--image", "astronaut")
            + ("--out", tmp_path / "r.png"),
            "encoder only",
        ),
    ]
    for args, message in cases:
        status, _, err = run_main(capsys, *args)
        assert status == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine\n"  # never replaced
    assert run_main(capsys, "export", beit_run, tmp_path / "hub", "--force")[0] == 0


def test_push_and_hf_hub_offline_fail_in_one_line(beit_run, tmp_path):
    """With no network (HF_HUB_OFFLINE=1 set before huggingface_hub is imported): the export is
    written, the push fails with one line naming the repository; hf-hub:NAME likewise."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tokenmorph"]
    proc = subprocess.run(
        [*cmd, "export", str(beit_run), str(tmp_path / "hub"), "--push-to-hub", "me/tm"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "'me/tm'" in proc.stderr and proc.stderr.count("\n") == 1
    assert (tmp_path / "hub" / "model.safetensors").is_file()
    proc = subprocess.run(
        [*cmd, "eval", "knn", "--checkpoint", "hf-hub:me/none", "--dataset", "fashion-mnist"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "hf-hub:me/none" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_finetune_and_segment_build_the_same_model_from_an_export_folder(beit_run, tmp_path):
    """Fine-tuning's and segmentation's models from the export folder (as a path and as
    local-dir:) equal those from the run folder, weight for weight (a new head aside)."""
    from tokenmorph.recipes.config import FinetuneConfig
    from tokenmorph.recipes.finetune import build_model, load_pretrained_student
    from tokenmorph.recipes.segment import segmentation_backbone

    folder = export_hub(beit_run, tmp_path / "hub")
    cfg = FinetuneConfig(model="tiny", patch_size=4)
    torch.manual_seed(0)
    ref, _, ref_report = build_model(cfg, 3, *load_pretrained_student(str(beit_run)))
    seg_ref, _ = segmentation_backbone(str(beit_run), 64, model_size="tiny", patch_size=4)
    for spec in (str(folder), f"local-dir:{folder}"):
        torch.manual_seed(0)
        model, _, report = build_model(cfg, 3, *load_pretrained_student(spec))
        assert report["new"] == ref_report["new"]  # the new head (and fc_norm of avg pooling)
        a, b = ref.state_dict(), model.state_dict()
        new = {k.split(".")[0] for k in report["new"]}
        assert all(torch.equal(a[k], b[k]) for k in a if k.split(".")[0] not in new), spec
        seg, info = segmentation_backbone(spec, 64, model_size="tiny", patch_size=4)
        a, b = seg_ref.state_dict(), seg.state_dict()
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a), spec


@pytest.mark.parametrize("size", list(STUDENT_SIZES))
def test_every_size_exports_and_loads_strictly_with_the_same_features(size, tmp_path):
    """One block of each size's width (the depth changes no rule), at patch 16: local-dir alone,
    one strict load, the checkpoint's features."""
    import timm

    ckpt, student = write_checkpoint(
        tmp_path / "run" / "checkpoints" / "step_00000003.pt",
        size=size,
        depth=1,
        img_size=32,
        patch_size=16,
    )
    folder = export_hub(tmp_path / "run", tmp_path / "hub")
    with recorded_loads() as calls:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert [(strict, r.missing_keys, r.unexpected_keys) for strict, r in calls] == [(True, [], [])]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == hub_architecture(student.arch)
    assert config["tokenmorph"]["student_size"] == size
    assert model.embed_dim == STUDENT_SIZES[size][0] and len(model.blocks) == 1
    x = photos(32)
    mean, std = (
        torch.tensor(config["pretrained_cfg"][k]).view(1, 3, 1, 1) for k in ("mean", "std")
    )
    with torch.no_grad():
        ours = student.forward_features(x)
        assert (model.forward_features((x - mean) / std) - ours).abs().max().item() < 1e-4
