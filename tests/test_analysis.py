"""``analyze consistency``, ``viz morph --teacher``, ``plot``: metric functions against direct
computations, and each command end to end in a subprocess on real photos (scikit-image crops) and
tiny data."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tokenmorph.errors import ConfigError
from tokenmorph.eval.consistency import (
    adjacent_cosine,
    adjacent_pairs,
    fit_linear_probe,
    num_adjacent_pairs,
    probe_metrics,
    token_consistency,
)
from tokenmorph.models.teachers import build_feature_source as build_feature_teacher
from tokenmorph.morph import Morph, bipartite_morph, spread_schedule
from tokenmorph.ops.morph import default_groups, resolve_schedules, schedule_text

from .helpers import run_cli

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def run_in_process(capsys, *args):
    """``tokenmorph ARGS`` in this process (no interpreter start-up): (exit status, stderr)."""
    from tokenmorph.cli import main

    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def save_crops(folder, names=PHOTOS, size=96):
    """Real photos: the top-left ``size`` crop of each scikit-image photo, as PNG files in
    ``folder``."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = getattr(skimage.data, name)()
        for j, (top, left) in enumerate(((0, 0), (size, size))):  # two crops per photo
            Image.fromarray(image[top : top + size, left : left + size]).save(
                folder / f"{name}_{j}.png"
            )
    return folder


def direct_adjacent(h, w):
    """The 4-adjacent unordered index pairs of an (h, w) row-major grid, by brute force over all
    pairs."""
    return [
        (a, b)
        for a in range(h * w)
        for b in range(a + 1, h * w)
        if abs(a // w - b // w) + abs(a % w - b % w) == 1
    ]


# ----------------------------------------------------------------------------------- metrics (a)
def test_adjacent_cosine_on_a_hand_built_2x2_grid():
    # t0 t1      pairs: (t0, t1) cos 0, (t2, t3) cos 1/sqrt2 (horizontal); (t0, t2) 1/sqrt2, (t1,
    # t3) 0 t2 t3
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])
    cos = adjacent_cosine(tokens, (2, 2))
    r = 1 / math.sqrt(2)
    assert torch.allclose(cos, torch.tensor([[0.0, r, r, 0.0]]))
    stats = token_consistency(tokens, (2, 2))
    assert stats["adjacent_cosine"] == pytest.approx(r / 2)
    assert stats["same_group_fraction"] == 0.0 and stats["cross_group_cosine"] == pytest.approx(
        r / 2
    )


def test_adjacent_pairs_are_the_4_neighbourhood_once():
    h, w = 3, 5
    first, second = adjacent_pairs(torch.arange(h * w).expand(2, -1), (h, w))
    got = sorted(zip(first[0].tolist(), second[0].tolist()))
    assert got == direct_adjacent(h, w) and len(got) == num_adjacent_pairs((h, w)) == 22
    assert torch.equal(first[0], first[1])


def test_consistency_matches_a_direct_computation_after_morphing():
    torch.manual_seed(0)
    h, w, D = 4, 5, 8
    tokens = torch.randn(3, h * w, D) + 0.5
    m = bipartite_morph(tokens, [3, 3, 2], mode="reference")
    stats = token_consistency(tokens, (h, w), m)
    cos, same, cross = [], [], []
    for b in range(3):
        means = {g: tokens[b][m.labels[b] == g].mean(0) for g in m.labels[b].tolist()}
        for i, j in direct_adjacent(h, w):
            gi, gj = m.labels[b, i].item(), m.labels[b, j].item()
            c = F.cosine_similarity(means[gi], means[gj], dim=0).item()
            cos.append(c)
            same.append(gi == gj)
            if gi != gj:
                cross.append(c)
    assert stats["adjacent_cosine"] == pytest.approx(sum(cos) / len(cos), abs=1e-6)
    assert stats["same_group_fraction"] == pytest.approx(sum(same) / len(same))
    assert stats["cross_group_cosine"] == pytest.approx(sum(cross) / len(cross), abs=1e-6)


def test_one_group_gives_similarity_one_and_identity_changes_nothing():
    torch.manual_seed(1)
    tokens = torch.randn(2, 16, 6)
    one = Morph(torch.zeros(2, 16, dtype=torch.long), 1, torch.full((2, 1), 16))
    stats = token_consistency(tokens, (4, 4), one)
    assert stats["adjacent_cosine"] == pytest.approx(1.0) and stats["same_group_fraction"] == 1.0
    assert stats["cross_group_cosine"] is None
    # the same through the morph itself: paper mode can merge everything into one group
    m = bipartite_morph(
        tokens,
        spread_schedule(16, 1, 4, protect_first=False),
        mode="paper",
        generator=torch.Generator().manual_seed(0),
    )
    assert m.num_groups == 1 and token_consistency(tokens, (4, 4), m)[
        "adjacent_cosine"
    ] == pytest.approx(1.0)
    identity = bipartite_morph(tokens, [0], mode="reference")
    assert token_consistency(tokens, (4, 4), identity) == pytest.approx(
        token_consistency(tokens, (4, 4))
    )


# ----------------------------------------------------------------------------------- metrics (b)
def test_probe_metrics_on_hand_built_predictions():
    # image 0 (label 1): predictions 1 1 / 2 1; image 1 (label 0): 0 0 / 0 0
    pred = torch.tensor([[1, 1, 2, 1], [0, 0, 0, 0]])
    m = probe_metrics(pred, torch.tensor([1, 0]), (2, 2))
    # pairs of image 0: (1,1) (2,1) horizontal, (1,2) (1,1) vertical -> 2 of 4 agree, both right
    assert m["token_accuracy"] == pytest.approx(7 / 8)
    assert m["neighbour_agreement"] == pytest.approx(6 / 8)
    assert m["agree_and_right"] == pytest.approx(6 / 8)


def test_linear_probe_separates_separable_tokens_deterministically():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    x = (
        torch.randn(600, 5, generator=g) * 0.3 + F.one_hot(y, 5).float() * 3 + 10
    )  # offset: standardised away
    a, b = fit_linear_probe(x, y, 3, iterations=30), fit_linear_probe(x, y, 3, iterations=30)
    assert (a.predict(x) == y).float().mean() == 1.0
    assert torch.equal(a.weight, b.weight)


def test_schedules_from_group_counts():
    assert default_groups(196) == [196, 98, 49, 16, 8]
    assert resolve_schedules(196, [196, 98], iterations=14) == [[0] * 14, [7] * 14]
    assert resolve_schedules(16, schedules=[[2, 2]]) == [[2, 2]]
    assert (
        schedule_text([7] * 14) == "7x14"
        and schedule_text([11, 11, 10]) == "11x2,10"
        and schedule_text([0]) == "none"
    )
    with pytest.raises(ConfigError, match="out of range"):
        resolve_schedules(196, [1, 500])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("raw-pixels", {}),
        ("pixels", {}),
        ("efficientnet-lite0", {}),
        ("timm:resnet18", {"random_init": True}),
    ],
)
def test_every_teacher_gives_tokens_on_the_grid(name, kwargs):
    from tokenmorph.data import sample_photo

    images = torch.stack([sample_photo("coffee", 64), sample_photo("rocket", 64)])
    tokens = build_feature_teacher(name, patch_size=16, **kwargs)(images, (4, 4))
    assert tokens.shape[:2] == (2, 16) and torch.isfinite(tokens).all()


# ------------------------------------------------------------------------------- end to end, CLI
def test_viz_morph_with_a_teacher(tmp_path):
    photos = save_crops(tmp_path / "photos", PHOTOS[:2])
    out = tmp_path / "gallery.png"
    proc = run_cli(
        "viz",
        "morph",
        *sorted(photos.iterdir())[:3],
        "--teacher",
        "pixels",
        "--size",
        "96",
        "--groups",
        "36,9,2",
        "--out",
        out,
    )
    assert "3 images x 3 schedules" in proc.stdout
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 300


def test_analyze_consistency_on_a_flat_folder_of_photos(tmp_path):
    photos = save_crops(tmp_path / "photos")
    out = tmp_path / "out"
    proc = run_cli(
        "analyze",
        "consistency",
        "--data",
        photos,
        "--teacher",
        "pixels",
        "--img-size",
        "64",
        "--out",
        out,
    )
    assert "| groups |" in proc.stdout
    result = json.loads((out / "consistency.json").read_text())
    assert (out / "consistency.png").stat().st_size > 1000
    assert (
        result["images"]["analysed"] == 8 and result["probe"] is None and result["grid"] == [4, 4]
    )
    rows = result["rows"]
    assert [r["num_groups"] for r in rows] == [16, 8, 4, 2]  # default N, N/2, N/4, N/12 -> 1 -> 2
    assert (
        rows[0]["same_group_fraction"] == 0.0
        and rows[0]["cross_group_cosine"] == rows[0]["adjacent_cosine"]
    )
    assert all(-1 <= r["adjacent_cosine"] <= 1 and "probe" not in r for r in rows)
    assert rows[-1]["same_group_fraction"] > rows[1]["same_group_fraction"] > 0


def test_analyze_consistency_on_a_labelled_image_folder(tmp_path):
    root = tmp_path / "classes"
    save_crops(root / "people", ("astronaut", "camera"))  # grey camera: ToRGB makes it 3 channels
    save_crops(root / "things", ("coffee", "rocket"))
    out = tmp_path / "out"
    run_cli(
        "analyze",
        "consistency",
        "--data",
        root,
        "--teacher",
        "efficientnet-lite0",
        "--img-size",
        "64",
        "--groups",
        "16,4",
        "--probe-iterations",
        "20",
        "--out",
        out,
    )
    result = json.loads((out / "consistency.json").read_text())
    assert result["classes"] == ["people", "things"] and result["images"] == {
        "analysed": 8,
        "train": 4,
        "test": 4,
        "skipped": 0,
    }
    assert [r["num_groups"] for r in result["rows"]] == [
        16,
        4,
    ]  # the token-wise row is not repeated
    for row in result["rows"]:
        assert set(row["probe"]) == {"token_accuracy", "neighbour_agreement", "agree_and_right"}
        assert (
            0
            <= row["probe"]["agree_and_right"]
            <= min(row["probe"]["token_accuracy"], row["probe"]["neighbour_agreement"])
        )


def test_errors_are_one_line(tmp_path, capsys):
    cases = [
        (
            [
                "viz",
                "morph",
                "--teacher",
                "pixels",
                "--features",
                "pixels",
                "--out",
                tmp_path / "o.png",
            ],
            "--features and --teacher",
        ),
        (
            [
                "analyze",
                "consistency",
                "--data",
                tmp_path / "missing",
                "--teacher",
                "pixels",
                "--out",
                tmp_path,
            ],
            "neither 'fashion-mnist",
        ),
        (
            ["analyze", "consistency", "--data", tmp_path, "--img-size", "100", "--out", tmp_path],
            "multiple of --patch-size",
        ),
        (
            ["analyze", "consistency", "--data", tmp_path, "--teacher", "nope", "--out", tmp_path],
            "unknown teacher",
        ),
        (["plot", tmp_path / "missing", "--out", tmp_path / "p.png"], "does not exist"),
    ]
    for args, message in cases:
        status, err = run_in_process(capsys, *args)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_plot_overlays_runs(tmp_path, capsys):
    for name, scale in (("dtm", 1.0), ("tokenwise", 1.5)):
        run = tmp_path / name
        run.mkdir()
        lines = [
            json.dumps({"step": s, "loss": scale / s, "lr": 1e-3 * s / 20, "img_per_s": 50 + s})
            for s in range(1, 21)
        ]
        (run / "metrics.jsonl").write_text("\n".join(lines + ["{not json"]) + "\n")
    out = tmp_path / "curves.png"
    proc = run_cli(
        "plot",
        tmp_path / "dtm",
        tmp_path / "tokenwise" / "metrics.jsonl",
        "--smooth",
        "0.6",
        "--out",
        out,
    )
    assert "2 runs x 3 keys" in proc.stdout and "dtm: 20 records" in proc.stdout
    assert out.stat().st_size > 1000
    status, err = run_in_process(
        capsys, "plot", tmp_path / "dtm", "--keys", "loss,accuracy", "--out", out
    )
    assert status == 2 and "no run logs accuracy" in err


@pytest.mark.slow
def test_analyze_consistency_on_fashion_mnist(tmp_path):
    from tokenmorph.data import DataError, find_fashion_mnist

    try:
        find_fashion_mnist()
    except DataError:
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "out"
    run_cli(
        "analyze",
        "consistency",
        "--data",
        "fashion-mnist",
        "--teacher",
        "pixels",
        "--img-size",
        "28",
        "--patch-size",
        "4",
        "--limit",
        "300",
        "--test-limit",
        "100",
        "--out",
        out,
    )
    result = json.loads((out / "consistency.json").read_text())
    assert (
        result["images"]["train"] == 300
        and result["images"]["test"] == 100
        and len(result["classes"]) == 10
    )
    assert all(0 <= r["probe"]["token_accuracy"] <= 1 for r in result["rows"])


@pytest.mark.slow
def test_viz_morph_with_clip_random_init(tmp_path):
    out = tmp_path / "clip.png"
    run_cli(
        "viz",
        "morph",
        "skimage:coffee",
        "--teacher",
        "clip-vit-b16",
        "--random-init",
        "--groups",
        "98,16",
        "--out",
        out,
    )
    assert out.stat().st_size > 1000
