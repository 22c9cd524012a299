"""Data sets and transforms on real data: Fashion-MNIST from the Debian package, real photos from
scikit-image saved in every mode a photo folder meets, next to the broken files a real folder
holds."""

import gzip
import logging
import os
import pickle
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokenmorph import data
from tokenmorph.data import (
    DATASET_STATS,
    DataError,
    FashionMNIST,
    ImageFiles,
    build_dataset,
    collate_skip,
    dataset_stats,
    eval_transform,
    find_fashion_mnist,
    pretrain_transform,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist",
)


# ------------------------------------------------------------------------------------------
# helpers
def read_idx_independently(path: Path) -> np.ndarray:
    """The idx format by hand (magic 2051 images / 2049 labels, big-endian sizes), no tokenmorph
    code."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw[16:], np.uint8).reshape(n, rows, cols)
    assert magic == 2049
    return np.frombuffer(raw[8:], np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    payload = (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_tiny_fashion_mnist(
    folder: Path, n_train: int = 5, n_test: int = 3, gz: bool = False
) -> dict:
    """Four small idx files with known content; returns them as arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


def photo(name: str, size=(96, 64)) -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.BICUBIC))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels but holds none (what a decompression bomb looks
    like before its data is inflated)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


VALID = [
    "astronaut.jpg",
    "chelsea.png",
    "coffee.JPG",
    "camera_grey.png",
    "rgba.png",
    "palette.gif",
    "palette.png",
    "cmyk.jpg",
    "grey16.png",
    "gradient16.png",
    "tiny.png",
    "sub/deeper/nested.jpg",
]
BROKEN = ["truncated.jpg", "empty.jpg", "text.png"]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """A flat-ish folder of real photos in many modes, broken files, and files that must be
    ignored."""
    root = tmp_path_factory.mktemp("photos")
    astronaut, chelsea, coffee = photo("astronaut"), photo("chelsea"), photo("coffee")
    Image.fromarray(astronaut).save(root / "astronaut.jpg", quality=90)
    Image.fromarray(chelsea).save(root / "chelsea.png")
    Image.fromarray(coffee).save(root / "coffee.JPG")  # upper-case extension counts
    Image.fromarray(photo("camera")).save(root / "camera_grey.png")  # mode L
    alpha = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1))[..., None]
    Image.fromarray(np.concatenate([chelsea, alpha], axis=2)).save(root / "rgba.png")
    palette = Image.fromarray(coffee).convert("P", palette=Image.ADAPTIVE, colors=64)
    palette.save(root / "palette.gif", transparency=0)
    palette.save(
        root / "palette.png", transparency=bytes([0, 128] + [255] * 62)
    )  # per-entry alpha (tRNS)
    Image.fromarray(astronaut).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(
        root / "grey16.png"
    )  # mode I;16, mid-grey
    Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))).save(
        root / "gradient16.png"
    )
    Image.fromarray(np.array([[[200, 10, 30]]], np.uint8)).save(root / "tiny.png")  # 1x1
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(chelsea).save(root / "sub" / "deeper" / "nested.jpg")
    jpeg = (root / "astronaut.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image, whatever the name says\n")
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    (root / ".hidden.jpg").write_bytes(b"macOS resource fork junk")  # hidden: ignored
    os.symlink("..", root / "sub" / "loop")  # a symlink loop must not hang or duplicate files
    return root


@pytest.fixture(scope="module")
def fashion_train():
    return FashionMNIST(train=True)


# ------------------------------------------------------------------------------------
# Fashion-MNIST
@needs_fashion_mnist
def test_fashion_mnist_matches_the_idx_files(fashion_train):
    test = FashionMNIST(train=False)
    assert (len(fashion_train), len(test)) == (60000, 10000)
    assert len(fashion_train.classes) == 10 and fashion_train.classes[9] == "Ankle boot"
    for ds, split in ((fashion_train, "train"), (test, "t10k")):
        images = read_idx_independently(DEBIAN_DIR / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx_independently(DEBIAN_DIR / f"{split}-labels-idx1-ubyte.gz")
        assert ds.targets.dtype == torch.int64
        assert torch.equal(ds.targets, torch.from_numpy(labels.astype(np.int64)))
        assert torch.bincount(ds.targets).tolist() == [len(ds) // 10] * 10  # balanced classes 0..9
        for i in (0, 1, len(ds) - 1):
            image, label = ds[i]
            assert image.mode == "L" and image.size == (28, 28)
            assert np.array_equal(np.asarray(image), images[i]) and label == labels[i]
    assert (
        fashion_train[0][1] == 9 and np.asarray(fashion_train[0][0]).max() == 255
    )  # the famous first boot


@needs_fashion_mnist
def test_fashion_mnist_stats_are_the_train_split_stats(fashion_train):
    counts = np.bincount(fashion_train.data.numpy().ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    (means, stds) = DATASET_STATS["fashion-mnist"]
    assert means == (means[0],) * 3 and stds == (stds[0],) * 3
    assert abs(means[0] - mean) < 1e-6 and abs(stds[0] - std) < 1e-6
    assert dataset_stats("fashion-mnist") == DATASET_STATS["fashion-mnist"]


@needs_fashion_mnist
def test_fashion_mnist_batches_through_the_pretrain_transform(fashion_train):
    fashion_train.transform = pretrain_transform(32)
    try:
        torch.manual_seed(0)
        images, labels, skipped = next(
            iter(DataLoader(fashion_train, batch_size=8, collate_fn=collate_skip))
        )
    finally:
        fashion_train.transform = None
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and skipped == 0
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    assert torch.allclose(images[:, 0], images[:, 1]) and torch.allclose(
        images[:, 0], images[:, 2]
    )  # still grey
    assert torch.equal(labels, fashion_train.targets[:8])


@needs_fashion_mnist
def test_find_fashion_mnist_in_every_supported_place(monkeypatch):
    assert find_fashion_mnist() == DEBIAN_DIR
    assert find_fashion_mnist(DEBIAN_DIR) == DEBIAN_DIR
    assert find_fashion_mnist(DEBIAN_DIR.parent) == DEBIAN_DIR  # a folder holding fashion-mnist/
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_DIRS", ())
    monkeypatch.setenv("TOKENMORPH_DATA", str(DEBIAN_DIR.parent))
    assert find_fashion_mnist() == DEBIAN_DIR
    test = build_dataset("fashion-mnist", train=False)
    assert isinstance(test, FashionMNIST) and len(test) == 10000
    assert (
        len(build_dataset(str(DEBIAN_DIR), train=False)) == 10000
    )  # a path to the idx files works too
    assert dataset_stats(str(DEBIAN_DIR)) == DATASET_STATS["fashion-mnist"]


def test_missing_fashion_mnist_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("TOKENMORPH_DATA", raising=False)
    with pytest.raises(DataError) as err:
        FashionMNIST()
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert (
        "apt-get install dataset-fashion-mnist" in message
        and "--data" in message
        and "download" in message
    )
    with pytest.raises(DataError, match="apt-get install"):
        build_dataset(f"fashion-mnist:{tmp_path}")


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reads_plain_and_gzipped_idx_files(tmp_path, gz):
    arrays = write_tiny_fashion_mnist(
        tmp_path / "FashionMNIST" / "raw", gz=gz
    )  # torchvision's layout
    train, test = FashionMNIST(tmp_path), build_dataset(f"fashion-mnist:{tmp_path}", train=False)
    assert (len(train), len(test)) == (5, 3)
    assert np.array_equal(np.asarray(test[2][0]), arrays["t10k-images-idx3-ubyte"][2])
    assert train.targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert train[1][0].mode == "L"


def test_corrupt_idx_file_is_named(tmp_path):
    write_tiny_fashion_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated or corrupt"):
        FashionMNIST(tmp_path)
    bad.write_bytes(b"\x00\x00\x0d\x03junk")  # float idx, not bytes
    with pytest.raises(DataError, match="not an idx file of unsigned bytes"):
        FashionMNIST(tmp_path)
    assert len(FashionMNIST(tmp_path, train=False)) == 3  # the other split is fine


def test_download_falls_back_to_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeTorchvisionFashionMNIST:  # stands in for the network: writes what torchvision would
        def __init__(self, root, train, download):
            calls.append((root, download))
            write_tiny_fashion_mnist(Path(root) / "FashionMNIST" / "raw", gz=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeTorchvisionFashionMNIST)
    with pytest.raises(DataError, match="download"):
        FashionMNIST(tmp_path / "dl")
    ds = FashionMNIST(tmp_path / "dl", train=False, download=True)
    assert len(ds) == 3 and calls == [(str(tmp_path / "dl"), True)]
    assert (
        len(FashionMNIST(tmp_path / "dl", download=True)) == 5 and len(calls) == 1
    )  # found: no second download

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(
        DataError, match=r"downloading Fashion-MNIST into .*off failed \(RuntimeError"
    ):
        FashionMNIST(tmp_path / "off", download=True)


# -------------------------------------------------------------------------------------- image
# files
def test_image_files_lists_images_recursively_and_ignores_the_rest(photo_dir):
    ds = ImageFiles(photo_dir)
    names = [f.relative_to(photo_dir).as_posix() for f in ds.files]
    assert sorted(names) == sorted(
        VALID + BROKEN
    )  # no .txt, no hidden file, nothing twice through the loop
    assert names[-1] == "sub/deeper/nested.jpg" and names[:-1] == sorted(names[:-1])
    assert (
        len(ds) == 15 and ds.classes == [] and ds.targets == [-1] * 15
    )  # images in root: no labels


def test_every_mode_becomes_8bit_rgb(photo_dir):
    ds = ImageFiles(photo_dir, on_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning must not appear
        loaded = {
            f.relative_to(photo_dir).as_posix(): ds[i]
            for i, f in enumerate(ds.files)
            if f.name not in BROKEN
        }
    assert set(loaded) == set(VALID)
    arrays = {}
    for name, (image, label) in loaded.items():
        assert image.mode == "RGB" and label == -1, name
        arrays[name] = np.asarray(image)
    assert arrays["tiny.png"].tolist() == [[[200, 10, 30]]]
    assert np.all(arrays["grey16.png"] == 128)  # 32768 / 257 = 127.5 -> 128, not clipped to white
    assert arrays["gradient16.png"][0, :, 0].tolist() == list(
        range(256)
    )  # 0..65535 -> 0..255 exactly
    camera = arrays["camera_grey.png"]
    assert np.array_equal(camera[..., 0], photo("camera")) and np.array_equal(
        camera[..., 0], camera[..., 2]
    )
    assert np.array_equal(arrays["rgba.png"], photo("chelsea"))  # alpha dropped, colours kept
    cmyk_error = np.abs(arrays["cmyk.jpg"].astype(int) - photo("astronaut")).mean()
    assert cmyk_error < 6, cmyk_error  # CMYK JPEG decodes to the photo's colours, not inverted ones
    for name in ("palette.gif", "palette.png"):
        assert np.abs(arrays[name].astype(int) - photo("coffee")).mean() < 12, name


def test_broken_files_are_skipped_and_counted(photo_dir, caplog):
    ds = ImageFiles(photo_dir, transform=pretrain_transform(32))
    with caplog.at_level(logging.WARNING, logger="tokenmorph.data"):
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_skip))
    assert sum(skipped for _, _, skipped in batches) == len(BROKEN)
    images = torch.cat([b[0] for b in batches if b[0].numel()])
    assert images.shape == (len(VALID), 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert all(torch.equal(labels, torch.full_like(labels, -1)) for _, labels, _ in batches)
    logged = caplog.text
    assert all(name in logged for name in BROKEN) and "astronaut.jpg" not in logged
    assert "skipping cannot decode image" in logged and "on_bad_image" not in logged  # no fix
    clone = pickle.loads(
        pickle.dumps(ds)
    )  # what data loader workers under spawn/forkserver receive
    torch.manual_seed(0)
    first = clone[0][0]
    torch.manual_seed(0)
    assert torch.equal(first, ds[0][0])


@pytest.mark.parametrize(
    "name, cause",
    [
        ("truncated.jpg", "image file is truncated"),
        ("empty.jpg", "cannot identify image file"),
        ("text.png", "cannot identify image file"),
    ],
)
def test_on_error_raise_names_the_file(photo_dir, name, cause):
    ds = ImageFiles(photo_dir, on_error="raise")
    with pytest.raises(DataError) as err:
        ds[[f.name for f in ds.files].index(name)]
    message = str(err.value)
    assert str(photo_dir / name) in message and cause in message and "on_bad_image=skip" in message
    assert "\n" not in message


def test_decompression_bombs_are_rejected(tmp_path, monkeypatch):
    assert Image.MAX_IMAGE_PIXELS == data.MAX_IMAGE_PIXELS >= 16000 * 16000  # big photos still load
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert ImageFiles(tmp_path)[0] is None
    with pytest.raises(DataError, match="bomb.png: DecompressionBombError"):
        ImageFiles(tmp_path, on_error="raise")[0]
    # Our own bound is exact (PIL alone only warns up to twice its bound).
    Image.fromarray(photo("astronaut")).save(tmp_path / "bomb.png")
    monkeypatch.setattr(data.images, "MAX_IMAGE_PIXELS", 96 * 64 - 1)
    with pytest.raises(DataError, match="6144 pixels is over the limit of 6143"):
        ImageFiles(tmp_path, on_error="raise")[0]


def test_32bit_and_float_modes_keep_their_meaning(tmp_path):
    (tmp_path / "p16.pgm").write_bytes(
        b"P5 4 4 65535\n" + np.full(16, 32768, ">u2").tobytes()
    )  # opens as "I"
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")  # mode "F" in [0, 1]
    Image.fromarray(np.full((4, 4), 100, np.int32)).save(
        tmp_path / "i8.tif"
    )  # mode "I" in 8-bit range
    ds = ImageFiles(tmp_path, on_error="raise")
    values = {f.name: np.asarray(ds[i][0]) for i, f in enumerate(ds.files)}
    assert (
        Image.open(tmp_path / "p16.pgm").mode == "I" and Image.open(tmp_path / "f.tif").mode == "F"
    )
    assert (
        np.all(values["p16.pgm"] == 128)
        and np.all(values["f.tif"] == 128)
        and np.all(values["i8.tif"] == 100)
    )


def test_empty_missing_and_non_image_folders_fail_before_any_work(tmp_path):
    with pytest.raises(
        DataError, match=f"no images found under {tmp_path} .*looked recursively for .jpg, .jpeg"
    ):
        ImageFiles(tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "empty_sub").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_dataset(str(tmp_path))
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'missing'} does not exist"):
        ImageFiles(tmp_path / "missing")
    with pytest.raises(DataError, match="is a file, not a folder"):
        ImageFiles(tmp_path / "readme.txt")
    with pytest.raises(DataError, match="neither 'fashion-mnist\\[:DIR\\]' nor an existing folder"):
        build_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="on_error='ignore': use 'skip' or 'raise'"):
        ImageFiles(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="labels='classes'"):
        ImageFiles(tmp_path, labels="classes")


def test_class_folders_follow_image_folder_semantics(tmp_path):
    from torchvision.datasets import ImageFolder

    chelsea, coffee, astronaut = photo("chelsea"), photo("coffee"), photo("astronaut")
    for rel, array in [
        ("cat/b.jpg", chelsea),
        ("cat/a.png", chelsea),
        ("cat/zzz/nested.png", chelsea),
        ("cat b/x.png", astronaut),
        ("cup/only.jpg", coffee),
        ("Apple/up.png", astronaut),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / rel)
    ds = ImageFiles(tmp_path)  # auto: only sub-folders at the top -> folders
    reference = ImageFolder(str(tmp_path))
    assert ds.classes == reference.classes == ["Apple", "cat", "cat b", "cup"]
    assert [str(f) for f in ds.files] == [path for path, _ in reference.samples]
    assert ds.targets == reference.targets == [0, 1, 1, 1, 2, 3]
    image, label = ds[4]
    assert image.mode == "RGB" and label == 2

    (tmp_path / "logs").mkdir()  # a sub-folder without images is no class
    (tmp_path / "logs" / "run.txt").write_text("x")
    assert ImageFiles(tmp_path).classes == ["Apple", "cat", "cat b", "cup"]
    assert ImageFiles(tmp_path, labels="none").targets == [-1] * 6

    Image.fromarray(coffee).save(tmp_path / "stray.png")  # an image at the top: auto -> no labels
    assert ImageFiles(tmp_path).classes == [] and len(ImageFiles(tmp_path)) == 7
    with pytest.raises(DataError, match="holds 1 directly .*stray.png.*labels='none'"):
        ImageFiles(tmp_path, labels="folders")


# ---------------------------------------------------------------------------------------
# transforms
def test_pretrain_transform_is_the_release_recipe_and_seeded_by_torch():
    """DTM's order (ColorJitter on the whole image, flip, RandomResizedCrop); this test used to
    expect the crop first. Without jitter, MAE's order (crop, flip)."""
    from torchvision import transforms as T

    t = pretrain_transform()
    jitter, flip, crop = t.transforms[1:4]
    assert (
        isinstance(crop, T.RandomResizedCrop)
        and crop.size == (224, 224)
        and crop.scale == (0.08, 1.0)
    )
    assert crop.interpolation == T.InterpolationMode.BICUBIC and isinstance(
        flip, T.RandomHorizontalFlip
    )
    assert (
        jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
        and jitter.hue is None
    )
    assert isinstance(t.transforms[-1], T.ToTensor)
    assert [
        type(s).__name__ for s in pretrain_transform(color_jitter=0, hflip=False).transforms
    ] == ["ToRGB", "RandomResizedCrop", "ToTensor"]
    assert [type(s).__name__ for s in pretrain_transform(color_jitter=0).transforms] == [
        "ToRGB",
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToTensor",
    ]


def test_pretrain_transform_jitters_the_whole_image_before_flip_and_crop():
    """The same torch stream through the release's steps composed here in its order gives the
    same tensor; cropping first (the former order) does not, since the contrast jitter blends
    towards the mean grey of what it is given."""
    from torchvision import transforms as T

    image = Image.fromarray(photo("astronaut", (128, 128)))
    release = T.Compose(
        [
            T.ColorJitter(0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(0.5),
            T.RandomResizedCrop(48, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
        ]
    )
    crop_first = T.Compose(
        [
            T.RandomResizedCrop(48, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            T.ColorJitter(0.4, 0.4, 0.4),
            T.ToTensor(),
        ]
    )
    ours = pretrain_transform(48)
    for seed in range(8):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        assert torch.equal(a, release(image)), seed
        torch.manual_seed(seed)
        assert not torch.equal(a, crop_first(image)), seed


def test_pretrain_transform_is_seeded_by_torch():
    image, small = Image.fromarray(photo("astronaut", (128, 128))), pretrain_transform(64)
    torch.manual_seed(0)
    a = small(image)
    random.seed(123)  # Python's and numpy's generators must play no part
    np.random.seed(123)
    torch.manual_seed(0)
    b = small(image)
    c = small(image)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    grey = small(Image.fromarray(photo("camera", (40, 30))))
    assert grey.shape == (3, 64, 64)
    assert small(Image.new("RGB", (1, 1), (255, 0, 0))).shape == (
        3,
        64,
        64,
    )  # a 1x1 image still works


def test_eval_transform_resizes_then_centre_crops():
    image = Image.fromarray(photo("astronaut", (300, 200)))
    out = eval_transform(64)(image)  # short side 200 -> int(64 / 0.875) = 73, then the centre 64x64
    assert out.shape == (3, 64, 64) and 0 <= out.min() and out.max() <= 1
    resized = image.resize((109, 73), Image.BICUBIC)  # 300 x 200 scaled to short side 73
    left, top = round((109 - 64) / 2), round((73 - 64) / 2)
    expected = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 255
    assert torch.allclose(out, torch.from_numpy(expected).permute(2, 0, 1))
    assert torch.equal(out, eval_transform(64)(image))

    digit = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    same = eval_transform(28, crop_pct=1.0)(digit)  # Fashion-MNIST size: the pixels themselves
    assert same.shape == (3, 28, 28)
    assert torch.equal(same[0], torch.from_numpy(np.array(digit)).float() / 255)
    assert eval_transform(32, crop_pct=1.0)(digit).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop_pct=0"):
        eval_transform(32, crop_pct=0)


def test_collate_skip():
    items = [(torch.full((3, 4, 4), float(i)), i) for i in range(3)]
    images, labels, skipped = collate_skip([items[0], None, items[1], None, items[2]])
    assert (
        images.shape == (3, 3, 4, 4)
        and labels.tolist() == [0, 1, 2]
        and labels.dtype == torch.int64
    )
    assert skipped == 2 and images[2, 0, 0, 0] == 2
    images, labels, skipped = collate_skip([None, None])
    assert (
        images.shape == (0,)
        and labels.shape == (0,)
        and labels.dtype == torch.int64
        and skipped == 2
    )


def test_stats_by_source():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert DATASET_STATS["imagenet"] == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert (
        dataset_stats("fashion-mnist:/anywhere")
        == dataset_stats("Fashion-MNIST")
        == DATASET_STATS["fashion-mnist"]
    )
    assert dataset_stats("/some/photos") == DATASET_STATS["imagenet"]


def test_default_crop_pct_rule():
    from tokenmorph.data import TINY_IMAGE_SIDE, default_crop_pct

    assert (
        default_crop_pct(28) == 1.0
        and default_crop_pct(TINY_IMAGE_SIDE) == 1.0
        and default_crop_pct(224) == 0.875
    )
