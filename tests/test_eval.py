"""Evaluation protocols: k-NN and linear probe against direct formulations, and end to end on
       real
photos."""

import json
import math

import pytest
import torch

from tokenmorph.cli import main
from tokenmorph.data import DataError, find_fashion_mnist
from tokenmorph.eval.features import EvalData, build_eval_datasets, extract_features
from tokenmorph.eval.knn import knn_classify
from tokenmorph.eval.linear import linear_probe
from tokenmorph.hub.backbone import load_backbone

from .helpers import run_cli, smoke_args

CLASSES = ("astronaut", "coffee", "rocket")  # the class_tree fixture's (conftest.py)


def _has_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except DataError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not _has_fashion_mnist(), reason="Fashion-MNIST is not installed"
)


# -------------------------------------------------------------------------------------------
# k-NN
def naive_knn(train, train_labels, test, test_labels, k, T, C):
    """Per query, in plain Python: cosine similarities, the k most similar, exp(sim / T) votes
           per
    class."""
    top1 = top5 = 0
    for q, y in zip(test.tolist(), test_labels.tolist()):
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for t, label in zip(train.tolist(), train_labels.tolist()):
            tn = math.sqrt(sum(v * v for v in t))
            sims.append((sum(a * b for a, b in zip(q, t)) / (qn * tn), label))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * C
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / T)
        ranked = sorted(range(C), key=lambda c: -votes[c])
        top1 += ranked[0] == y
        top5 += y in ranked[:5]
    return top1 / len(test), top5 / len(test)


def clusters(centres, n, spread, gen):
    """n points around the (C, D) ``centres``, each of a random class: (n, D) float32, (n,)
    int64."""
    labels = torch.randint(0, len(centres), (n,), generator=gen)
    return centres[labels] + spread * torch.randn(
        n, centres.shape[1], generator=gen, dtype=centres.dtype
    ), labels


def test_knn_matches_naive_implementation():
    gen = torch.Generator().manual_seed(0)
    C = 7
    centres = torch.randn(C, 16, generator=gen)
    train, train_labels = clusters(centres, 120, 2.0, gen)  # overlapping: errors at every k
    test, test_labels = clusters(centres, 40, 2.0, gen)
    result = knn_classify(
        train,
        train_labels,
        test,
        test_labels,
        ks=(1, 5, 20, 500),
        temperature=0.07,
        num_classes=C,
        chunk_size=16,
    )
    assert list(result) == [1, 5, 20, 120]  # 500 capped at the train set size
    for k, r in result.items():
        top1, top5 = naive_knn(train, train_labels, test, test_labels, k, 0.07, C)
        assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5), k
    assert all(0 < r["top1"] < r["top5"] < 1 for r in result.values())


def test_knn_separable_and_chunk_independent():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 32, generator=gen)
    train, train_labels = clusters(centres, 300, 0.05, gen)
    test, test_labels = clusters(centres, 200, 0.05, gen)
    results = [
        knn_classify(train, train_labels, test, test_labels, chunk_size=c)
        for c in (1, 7, 64, 10_000)
    ]
    assert all(r == results[0] for r in results[1:])
    assert all(r["top1"] == 1.0 and r["top5"] == 1.0 for r in results[0].values())
    # Scaling features changes nothing: they are L2-normalised.
    assert knn_classify(3 * train, train_labels, 0.5 * test, test_labels) == results[0]


# ---------------------------------------------------------------------------------- linear probe
def test_linear_probe_learns_separable_problem():
    gen = torch.Generator().manual_seed(2)
    centres = 2 * torch.randn(6, 24, generator=gen)
    x, y = clusters(centres, 600, 1.0, gen)
    xv, yv = clusters(centres, 300, 1.0, gen)
    for batchnorm in (False, True):
        r = linear_probe(
            x, y, xv, yv, 6, lrs=[0.01, 0.1], epochs=10, batch_size=64, batchnorm=batchnorm
        )
        assert r["best"]["top1"] > 0.95, r["per_lr"]
        # The returned classifiers apply to raw features (BatchNorm folded in) and give the
        # reported accuracy.
        for i, entry in enumerate(r["per_lr"]):
            pred = (xv @ r["weight"][i] + r["bias"][i]).argmax(1)
            assert (pred == yv).double().mean().item() == pytest.approx(entry["top1"])


@pytest.mark.parametrize("batchnorm", [False, True])
def test_linear_probe_batched_lrs_equal_separate_runs(batchnorm):
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    # float64, so that rounding (which the matrix products' blocking may order differently for L
    # and for 1 classifier) stays far below the tolerance; overlapping classes, so that the lrs
    # end far apart.
    x, y = clusters(centres, 300, 2.0, gen)
    xv, yv = clusters(centres, 100, 2.0, gen)
    lrs = [0.003, 0.03, 0.3, 3.0]
    together = linear_probe(
        x, y, xv, yv, 5, lrs=lrs, epochs=4, batch_size=32, batchnorm=batchnorm, seed=7
    )
    for i, lr in enumerate(lrs):
        alone = linear_probe(
            x, y, xv, yv, 5, lrs=[lr], epochs=4, batch_size=32, batchnorm=batchnorm, seed=7
        )
        assert alone["per_lr"][0] == together["per_lr"][i]
        torch.testing.assert_close(
            alone["weight"][0], together["weight"][i], rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(alone["bias"][0], together["bias"][i], rtol=1e-10, atol=1e-12)
    weights = together["weight"]
    assert not torch.allclose(weights[0], weights[-1])  # the lrs did train different classifiers


# -------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smoke_run(class_tree, tmp_path_factory):
    """A run folder with a checkpoint of 2 smoke pre-training steps on class_tree's train images."""
    out = tmp_path_factory.mktemp("run")
    run_cli(
        *smoke_args(str(class_tree / "train"), str(out)),
        "--max-steps",
        "2",
    )
    return out


def test_extract_features_in_order_skipping_bad_items(smoke_run):
    backbone = load_backbone(str(smoke_run))
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dataset = [
        (images[0], 2),
        None,
        (images[1], 0),
        (images[2], 1),
        None,
        (images[3], 1),
        (images[4], 0),
    ]
    feats, labels, skipped = extract_features(
        backbone, dataset, batch_size=2, pool="mean", progress=False
    )
    assert skipped == 2 and labels.tolist() == [2, 0, 1, 1, 0]
    with torch.inference_mode():
        expected = backbone.features(images, "mean")
    assert feats.dtype == torch.float32 and feats.shape == (5, backbone.embed_dim)
    torch.testing.assert_close(
        feats, expected, rtol=1e-4, atol=1e-5
    )  # batches of 2 vs one batch of 5


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_knn_cli_on_class_tree(class_tree, smoke_run, tmp_path):
    out = tmp_path / "knn.json"
    proc = run_cli(
        "eval",
        "knn",
        "--checkpoint",
        str(smoke_run),
        "--train",
        str(class_tree / "train"),
        "--val",
        str(class_tree / "val"),
        "--num-workers",
        "0",
        "--out",
        str(out),
    )
    result = last_json(proc)
    assert 0 <= result["top1"] <= 1 and 0 <= result["top5"] <= 1
    assert result["num_train"] == 24 and result["num_val"] == 12 and result["num_classes"] == 3
    assert result["k"] == 20 and set(result["per_k"]) == {
        "10",
        "20",
        "24",
    }  # 100, 200: capped at 24 images
    assert (
        result["feature_dim"] == 192 and result["pool"] == "cls" and result["skipped_images"] == 0
    )
    assert json.loads(out.read_text()) == result
    assert "top1" in proc.stdout.splitlines()[1]  # the human table comes first


def test_linear_cli_on_class_tree(class_tree, smoke_run):
    proc = run_cli(
        "eval",
        "linear",
        "--checkpoint",
        str(smoke_run),
        "--train",
        str(class_tree / "train"),
        "--val",
        str(class_tree / "val"),
        "--num-workers",
        "2",
        "--pool",
        "mean",
        "--batchnorm",
        "--lrs",
        "0.01,0.1,1",
        "--epochs",
        "5",
    )
    result = last_json(proc)
    assert 0 <= result["top1"] <= 1 and result["pool"] == "mean" and result["batchnorm"]
    assert [r["lr"] for r in result["per_lr"]] == [0.01, 0.1, 1.0]
    assert result["top1"] == max(r["top1"] for r in result["per_lr"])


@needs_fashion_mnist
def test_linear_cli_on_fashion_mnist(smoke_run, capsys):
    # In this process (the commands above covered the subprocess path): saves the imports'
    # seconds.
    assert (
        main(
            [
                "eval",
                "linear",
                "--checkpoint",
                str(smoke_run),
                "--dataset",
                "fashion-mnist",
                "--limit-train",
                "500",
                "--limit-val",
                "200",
                "--epochs",
                "20",
                "--num-workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_train"] == 500 and result["num_val"] == 200 and result["num_classes"] == 10
    assert 0.2 < result["top1"] <= 1  # even a 2-step backbone's features beat chance (0.1) by far


@needs_fashion_mnist
def test_limit_is_a_seeded_random_subset():
    args = EvalData(dataset="fashion-mnist", limit_train=300)
    train, val, num_classes = build_eval_datasets(args, 32)
    again, _, _ = build_eval_datasets(args, 32)
    assert len(train) == 300 and len(val) == 10_000 and num_classes == 10
    assert train.indices == again.indices and train.indices != list(range(300))
    assert len({train.dataset.targets[i].item() for i in train.indices}) == 10  # classes stay mixed
    image, _ = train[0]
    assert image.shape == (3, 32, 32)  # 28 px: a plain resize (crop_pct 1.0)


# --------------------------------------------------------------------------------------- errors
def eval_error(capsys, *argv):
    """Run the CLI in this process; exit status and the stderr text of a failure."""
    status = main(list(argv))
    return status, capsys.readouterr().err.strip()


def test_flat_folder_is_refused(class_tree, smoke_run, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (class_tree / "train" / CLASSES[1]).iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    status, err = eval_error(
        capsys,
        "eval",
        "knn",
        "--checkpoint",
        str(smoke_run),
        "--train",
        str(flat),
        "--val",
        str(class_tree / "val"),
        "--no-progress",
    )
    assert status == 2 and len(err.splitlines()) == 1
    assert "has no labels" in err and "CLASS/IMAGE" in err


def test_class_mismatch_is_refused(class_tree, smoke_run, tmp_path, capsys):
    val = tmp_path / "val"
    for name in CLASSES[:2] + ("dog",):
        (val / name).mkdir(parents=True)
        src = next((class_tree / "val" / CLASSES[0]).iterdir())
        (val / name / src.name).write_bytes(src.read_bytes())
    status, err = eval_error(
        capsys,
        "eval",
        "linear",
        "--checkpoint",
        str(smoke_run),
        "--train",
        str(class_tree / "train"),
        "--val",
        str(val),
        "--no-progress",
    )
    assert status == 2 and len(err.splitlines()) == 1
    assert "class folders differ" in err and CLASSES[2] in err and "dog" in err


def test_missing_checkpoint_is_refused(class_tree, tmp_path, capsys):
    status, err = eval_error(
        capsys,
        "eval",
        "knn",
        "--checkpoint",
        str(tmp_path / "nothing"),
        "--train",
        str(class_tree / "train"),
        "--val",
        str(class_tree / "val"),
    )
    assert status == 2 and len(err.splitlines()) == 1 and "no checkpoint found" in err


def test_missing_data_flags_are_refused(smoke_run, capsys):
    status, err = eval_error(capsys, "eval", "knn", "--checkpoint", str(smoke_run), "--train", "x")
    assert status == 2 and "--train DIR and --val DIR" in err
