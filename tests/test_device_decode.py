"""``decode=device``: the workers draw each sample's augmentation exactly as the CPU path does,
the device decodes and augments to nearly the same pixels (here on the CPU, through the very
code CUDA runs), and a pre-training run with it trains, resumes exactly, and skips and counts
bad files as the CPU path does."""

import io
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms as T

from tokenmorph.data.device_decode import DeviceAugment, decode_batch
from tokenmorph.data.images import decode_rgb
from tokenmorph.data.transforms import pretrain_transform

from .helpers import final_weights, last_json, run_main, smoke_args

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera")


def _jpeg(array: np.ndarray, orientation: int = 1, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(array).save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _files() -> list[bytes]:
    """Real photos as JPEG (camera is grey), a PNG (decoded by PIL in the worker) and JPEGs
    stored sideways with EXIF orientations 3, 5, 6 and 8 (the device turns them upright)."""
    photos = {n: getattr(skimage.data, n)() for n in PHOTOS}
    chelsea = photos["chelsea"]
    return (
        [_jpeg(a) for a in photos.values()]
        + [_png(photos["coffee"][::2, ::2])]
        + [_jpeg(np.ascontiguousarray(chelsea[:, :300]), o) for o in (3, 5, 6, 8)]
    )


def _recorded(monkeypatch) -> list:
    """Records what the CPU transform's ColorJitter and RandomResizedCrop draw."""
    drawn = []
    jitter, crop = T.ColorJitter.get_params, T.RandomResizedCrop.get_params

    def jitter_params(*args):
        out = jitter(*args)
        drawn.append(("jitter", tuple(int(i) for i in out[0]), out[1:4]))
        return out

    def crop_params(*args):
        out = crop(*args)
        drawn.append(("crop", tuple(int(v) for v in out)))
        return out

    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(jitter_params))
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(crop_params))
    return drawn


@pytest.mark.parametrize(
    "color_jitter, side, interpolation, mean_tol, image_tol",
    [
        (0.4, 224, "bicubic", 1.0, 4.0),
        (0.0, 224, "bicubic", 0.3, 0.5),
        (0.4, 96, "bilinear", 1.2, 5),
    ],
)
def test_the_device_path_draws_the_cpu_parameters_and_nearly_its_pixels(
    monkeypatch, color_jitter, side, interpolation, mean_tol, image_tol
):
    """For the same per-sample seeds, the device path's worker half draws the very crop box,
    flip and jitter of the CPU path (the same generator state after it too), and the decoded,
    augmented images agree within the stated tolerance, in uint8 levels: measured on these
    photos, mean |difference| 0.15 without colour jitter (decoders agree bit for bit on a CPU;
    torch's resize against PIL's), 0.5 with it at 224 px (0.65 at 96 px bilinear), the
    jitter running after the resize (clipping and rounding move); an image drawn with another
    crop or flip would be off by tens of levels."""
    files = _files()
    cpu = pretrain_transform(side, (0.08, 1.0), color_jitter, True, interpolation, uint8=True)
    device = DeviceAugment(side, (0.08, 1.0), color_jitter, True, interpolation)
    drawn = _recorded(monkeypatch)
    diffs, flips = [], set()
    for seed in range(3):
        reference, items = [], []
        for k, data in enumerate(files):
            torch.manual_seed(1000 * seed + k)
            del drawn[:]
            upright = decode_rgb(data, f"file {k}")
            reference.append(cpu(upright))
            after_cpu = torch.get_rng_state()
            torch.manual_seed(1000 * seed + k)
            item = device.from_bytes(data, f"file {k}")
            assert torch.equal(torch.get_rng_state(), after_cpu)  # the same draws, no more
            items.append(item)
            assert item.encoded == (k != len(PHOTOS))  # the PNG is decoded in the worker
            assert item.size == upright.size[::-1]  # from the header, EXIF-turned
            expected = {d[0]: d[1:] for d in drawn}
            assert item.crop == expected["crop"][0]
            if color_jitter:
                assert item.order == expected["jitter"][0]
                assert item.factors == pytest.approx(expected["jitter"][1], abs=0)
            flips.add(item.flip)
        images, kept = decode_batch(items, "cpu")
        assert all(kept) and images.shape == (len(files), 3, side, side)
        assert images.dtype == torch.float32 and torch.equal(images, (images * 255).round() / 255)
        diffs.append((images * 255 - torch.stack(reference).float()).abs())
    d = torch.cat(diffs)
    assert flips == {True, False}
    assert d.mean() <= mean_tol, float(d.mean())
    assert d.mean(dim=(1, 2, 3)).max() <= image_tol, d.mean(dim=(1, 2, 3)).tolist()


def test_on_a_cpu_decode_jpeg_decodes_as_pil_bit_for_bit():
    """What docs/cluster.md states: on a CPU the device path's decoder gives PIL's pixels (the
    orientation is applied afterwards, by both)."""
    from tokenmorph.data.device_decode import _decode_jpegs, _upright

    files = [f for f in _files() if f[:2] == b"\xff\xd8"]
    decoded = _decode_jpegs(files, torch.device("cpu"))
    for data, x in zip(files, decoded):
        item = DeviceAugment(32).from_bytes(data, "photo")
        reference = np.asarray(decode_rgb(data, "photo")).transpose(2, 0, 1)
        assert torch.equal(_upright(x, item.orientation), torch.from_numpy(reference.copy()))


def test_bad_files_on_the_device_path(tmp_path):
    """A file whose header parses but whose data is cut is found by the device decode (and
    skipped, or named with on_error=raise); one whose header does not parse, in the worker."""
    good = _jpeg(skimage.data.astronaut())
    cut = good[: len(good) // 2]
    skip = DeviceAugment(32, on_error="skip")
    items = [skip.from_bytes(good, "good.jpg"), skip.from_bytes(cut, "cut.jpg")]
    images, kept = decode_batch(items, "cpu")
    assert kept == [True, False] and images.shape == (1, 3, 32, 32)
    strict = DeviceAugment(32, on_error="raise")
    from tokenmorph.errors import DataError

    with pytest.raises(DataError, match="cannot decode image cut.jpg"):
        decode_batch(
            [strict.from_bytes(good, "good.jpg"), strict.from_bytes(cut, "cut.jpg")], "cpu"
        )
    with pytest.raises(DataError, match="cannot decode image text.jpg"):
        strict.from_bytes(b"not an image", "text.jpg")


def _bad_data(photo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    raw = (photo_dir / "img_001.jpg").read_bytes()
    (data / "truncated.jpg").write_bytes(raw[: len(raw) // 3])  # found on the device
    (data / "text.jpg").write_text("not an image")  # found in the worker
    return data


def test_a_decode_device_run_trains_resumes_exactly_and_counts_bad_files(
    photo_dir, tmp_path, capsys
):
    """Smoke pre-training on real photos (JPEG and PNG) with two bad files: decode=device
    trains, an interrupted and resumed run ends with the same weights bit for bit, and it skips
    every draw of the bad files (counted from the run's data order), no more."""
    from tokenmorph.data import ImageFiles
    from tokenmorph.runtime.sampling import StepBatchSampler

    data = _bad_data(photo_dir, tmp_path)
    extra = ("batch_size=14", "decode=device")  # 42 files: 3 steps an epoch
    runs = {}
    for name, args in {"device": (), "resumed": ("stop_after=4",)}.items():
        out = tmp_path / name
        status, stdout, err = run_main(capsys, *smoke_args(data, out, *extra, *args))
        assert status == 0, err
        if name == "resumed":
            status, stdout, err = run_main(capsys, *smoke_args(data, out, *extra))
            assert status == 0, err
        runs[name] = last_json(stdout)
    assert runs["device"]["steps"] == 8 and runs["device"]["final_loss"] > 0
    weights = {name: final_weights(tmp_path / name)["model"] for name in runs}
    for k, v in weights["device"].items():
        assert torch.equal(weights["resumed"][k], v), k
    files = ImageFiles(data).files
    bad = {k for k, f in enumerate(files) if f.name in ("truncated.jpg", "text.jpg")}
    order = StepBatchSampler(len(files), 14, 1, 0, 1, seed=0, total_steps=8)
    drawn = sum(i in bad for micro_batch in order for i, _, _ in micro_batch)
    assert drawn >= 4  # two whole epochs: each bad file at least twice
    assert runs["device"]["skipped_images"] == runs["resumed"]["skipped_images"] == drawn
    assert runs["device"]["images_seen"] == 8 * 14 - drawn
    status, _, err = run_main(
        capsys, *smoke_args(data, tmp_path / "strict", *extra, "on_bad_image=raise")
    )
    assert status == 2 and "cannot decode image" in err and "Traceback" not in err, err
    assert "truncated.jpg" in err or "text.jpg" in err


def test_decode_device_refuses_what_it_cannot_do(photo_dir, tmp_path, capsys):
    cases = {
        ("fashion-mnist", "decode=device"): "decode=device reads image files: give a folder",
        (photo_dir, "decode=device", "crop_interpolation=lanczos"): "the device resize has",
        (photo_dir, "decode=gpu"): "decode",
    }
    for i, ((data, *extra), message) in enumerate(cases.items()):
        status, _, err = run_main(capsys, *smoke_args(data, tmp_path / str(i), *extra))
        assert status == 2 and message in err and "Traceback" not in err, (extra, err)


def test_device_augment_refuses_an_unknown_on_error():

    with pytest.raises(ValueError, match="on_error='ignore': use 'skip' or 'raise'"):
        DeviceAugment(on_error="ignore")
