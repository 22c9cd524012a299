"""Fixtures shared by the test modules: real photos from scikit-image, as a flat folder and as
ImageFolder trees."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """A flat folder (plus one nested sub-folder) of 40 real photo crops from scikit-image."""
    return make_photo_dir(tmp_path_factory.mktemp("photos"))


def make_photo_dir(root):
    import skimage.data
    from PIL import Image

    (root / "nested").mkdir()
    rng = np.random.default_rng(0)
    k = 0
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = getattr(skimage.data, name)()
        for _ in range(10):
            h, w = img.shape[:2]
            s = int(rng.integers(64, min(h, w)))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            folder = root / "nested" if k % 7 == 0 else root
            ext = ".jpg" if k % 2 else ".png"
            Image.fromarray(img[y : y + s, x : x + s]).save(folder / f"img_{k:03d}{ext}")
            k += 1
    return root


@pytest.fixture(scope="session")
def class_tree(tmp_path_factory):
    """train/ and val/ ImageFolder trees, 3 classes = 3 different photos, random crops of each."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(1)
    for split, count in (("train", 8), ("val", 4)):
        for cls in ("astronaut", "coffee", "rocket"):
            (root / split / cls).mkdir(parents=True)
            img = getattr(skimage.data, cls)()
            for k in range(count):
                s = int(rng.integers(96, min(img.shape[:2])))
                y, x = (
                    int(rng.integers(0, img.shape[0] - s)),
                    int(rng.integers(0, img.shape[1] - s)),
                )
                Image.fromarray(img[y : y + s, x : x + s]).save(root / split / cls / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory):
    """A 2-step smoke pre-training of the MAE framework (plain masking, pixel targets), with the
    real CLI (its own photos: some modules define a photo_dir of their own)."""
    from .helpers import run_cli

    photo_dir = make_photo_dir(tmp_path_factory.mktemp("mae-photos"))
    out = tmp_path_factory.mktemp("mae") / "run"
    run_cli(
        "pretrain",
        "--config",
        "smoke",
        "framework=mae",
        "objective=mask",
        "teacher=pixels",
        "--data",
        str(photo_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
    )
    return out
