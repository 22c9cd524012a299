"""Beyond Masking degradations (docs/method.md 2): the geometry of every objective on real
   photos,
checked against direct computations written here with numpy / PIL / scipy (never the function
under test)."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from tokenmorph.data import sample_photo
from tokenmorph.losses import zoom_in_mask_loss
from tokenmorph.models.teachers import PixelTeacher
from tokenmorph.ops.degrade import (
    build_degradation,
    decolorize,
    output_to_view,
    radial_distort,
    random_blur,
    view_regions,
    zoom_in,
    zoom_out,
)
from tokenmorph.recipes.config import PretrainConfig
from tokenmorph.recipes.objectives import (
    PretrainObjective,
    build_objective_degradation,
    num_random_masked,
)
from tokenmorph.runtime.sampling import collate_keyed


# ------------------------------------------------------------------------------ independent
# helpers
@functools.cache
def _photo(name: str, size: int) -> torch.Tensor:
    return sample_photo(name, size)


def photo(name: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) real photo in [0, 1] (a fresh copy)."""
    return _photo(name, size)[None].clone()


def pil_resize(img: np.ndarray, size: int, box=None) -> np.ndarray:
    """(C, H, W) float -> (C, size, size): PIL's bicubic (antialiased when shrinking) per
       channel,
    clipped."""
    out = [
        np.asarray(
            Image.fromarray(c.astype(np.float32), mode="F").resize(
                (size, size), Image.BICUBIC, box=box
            )
        )
        for c in img
    ]
    return np.stack(out).clip(0, 1)


def my_patchify(img: np.ndarray, p: int) -> np.ndarray:
    """(B, C, H, W) -> (B, N, p*p*C), row-major tokens, (y, x, c) inside a token: written out
       with
    loops."""
    B, C, H, W = img.shape
    toks = []
    for i in range(H // p):
        for j in range(W // p):
            block = img[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # (B, C, p, p)
            toks.append(np.transpose(block, (0, 2, 3, 1)).reshape(B, -1))
    return np.stack(toks, axis=1)


def my_unpatchify(tok: np.ndarray, p: int, g: int, C: int = 3) -> np.ndarray:
    """(B, g*g, p*p*C) -> (B, C, g*p, g*p), the inverse of my_patchify, with loops."""
    B = tok.shape[0]
    img = np.zeros((B, C, g * p, g * p), dtype=tok.dtype)
    for i in range(g):
        for j in range(g):
            img[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = (
                tok[:, i * g + j].reshape(B, p, p, C).transpose(0, 3, 1, 2)
            )
    return img


def norm_per_channel(tok: np.ndarray, C: int = 3) -> np.ndarray:
    """Beyond Masking targets: per token and per channel (x - mean) / (std + 1e-6), unbiased std."""
    x = tok.reshape(*tok.shape[:-1], -1, C).astype(np.float64)
    x = (x - x.mean(axis=-2, keepdims=True)) / (x.std(axis=-2, ddof=1, keepdims=True) + 1e-6)
    return x.reshape(tok.shape)


def area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Area ("adaptive average") resampling as a matrix: output i averages inputs floor(i n_in /
    n_out) .. ceil((i + 1) n_in / n_out) - 1."""
    A = np.zeros((n_out, n_in))
    for i in range(n_out):
        s, e = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        A[i, s:e] = 1.0 / (e - s)
    return A


def ref_radial(img: np.ndarray, centre, m: float) -> np.ndarray:
    """(C, H, W) -> (C, H, W): output pixel centre g (normalised, align_corners=False) samples
       the
    input at g + (c - g)|c - g| m, bilinearly (scipy map_coordinates, order 1, edge extension)."""
    C, H, W = img.shape
    gy = (2 * np.arange(H) + 1) / H - 1
    gx = (2 * np.arange(W) + 1) / W - 1
    GX, GY = np.meshgrid(gx, gy)  # (H, W)
    dx, dy = centre[0] - GX, centre[1] - GY
    r = np.sqrt(dx**2 + dy**2)
    sx, sy = GX + dx * r * m, GY + dy * r * m
    assert np.all(np.abs(sx) <= 1) and np.all(
        np.abs(sy) <= 1
    )  # never leaves the image (docs/method.md 2)
    px, py = ((sx + 1) * W - 1) / 2, ((sy + 1) * H - 1) / 2  # back to pixel indices
    return np.stack(
        [
            ndimage.map_coordinates(c.astype(np.float64), [py, px], order=1, mode="nearest")
            for c in img
        ]
    )


def ref_blur(img: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """(B, C, H, W), (B, C, C, k, k) -> out[b, o] = sum_i correlate(img[b, i], kernels[b, o, i])
       /
    C, mirror borders (scipy 'mirror' = reflection without repeating the edge = torch 'reflect')."""
    B, C = img.shape[:2]
    out = np.zeros(img.shape, dtype=np.float64)
    for b in range(B):
        for o in range(C):
            for i in range(C):
                out[b, o] += ndimage.correlate(
                    img[b, i].astype(np.float64), kernels[b, o, i].astype(np.float64), mode="mirror"
                )
    return out / C


def ref_zoom_in_mask_loss(pred, view_target, mask, p, g, r, ring_weight=0.2):
    """The best practice's loss written out: output frame -> pixels -> area upsample to the view
    (matrix) -> view tokens -> per-token MSE; 2-D slicing of the (G, G) error map for the centre
    and the four strips."""
    pred, view_target = np.asarray(pred, np.float64), np.asarray(view_target, np.float64)
    B = pred.shape[0]
    G = g + 2 * r
    A = area_matrix(G * p, g * p)
    img = my_unpatchify(pred, p, g)
    view_img = A @ img @ A.T
    err = ((my_patchify(view_img, p) - view_target) ** 2).mean(-1).reshape(B, G, G)
    centre = err[:, r : r + g, r : r + g].reshape(B, g * g)
    m = np.asarray(mask, np.float64)
    masked = (centre * m).sum() / m.sum()
    strips = [err[:, :r, :], err[:, r + g :, :], err[:, r : r + g, :r], err[:, r : r + g, r + g :]]
    ring = sum(s.mean() for s in strips)
    return (1 - ring_weight) * masked + ring_weight * ring, masked, ring


def make_objective(objective, img_size=64, patch=8, framework="mae", **kw):
    cfg = PretrainConfig(
        teacher="pixels",
        framework=framework,
        objective=objective,
        img_size=img_size,
        patch_size=patch,
        seed=kw.pop("seed", 0),
        **kw,
    )
    g = img_size // patch
    return PretrainObjective(PixelTeacher(patch), (g, g), cfg), cfg


def make_batch(obj, images, seeds):
    """What the data loader delivers: per-sample extras from seeded generators, collated."""
    items = [(img, 0, obj.sample(np.random.default_rng(s))) for img, s in zip(images, seeds)]
    return collate_keyed(items)


class RecordingModel:
    """A stand-in student: records what it sees, returns a fixed (seeded) prediction."""

    def __init__(self, num_tokens, dim, seed=0):
        self.pred = torch.randn(1, num_tokens, dim, generator=torch.Generator().manual_seed(seed))
        self.calls = []

    def __call__(self, inputs, mask):
        self.calls.append((inputs.clone(), None if mask is None else mask.clone()))
        return self.pred.expand(inputs.shape[0], -1, -1).clone()


# ------------------------------------------------------------------------------------------
# zoom-in
def test_zoom_in_paper_sizes_input_is_centre_crop_target_is_resized_view():
    view = torch.cat([photo("astronaut", 288), photo("chelsea", 288)])
    inputs, target = zoom_in(view, 32)
    assert inputs.shape == target.shape == (2, 3, 224, 224)
    v = view.numpy()
    assert np.array_equal(inputs.numpy(), v[:, :, 32:256, 32:256])  # pixel for pixel
    for b in range(2):
        ref = pil_resize(v[b], 224)
        assert np.abs(target[b].numpy() - ref).max() < 1e-4
    # the target is not the input (the frames differ): far from it on a real photo
    assert (target - inputs).abs().mean() > 0.05


def test_zoom_in_output_token_covers_nine_sevenths_of_an_input_token():
    """At 288 -> 224, output token (i, j) is the view region [i 288/14, (i+1) 288/14)^2 (20.57
       px,
    9/7 of the 16 px input token) resized to 16 px; the input token at the same grid position is
    not."""
    view = photo("coffee", 288)
    inputs, target = zoom_in(view, 32)
    v = view[0].numpy()
    side = 288 / 14
    assert side / 16 == pytest.approx(9 / 7)
    for i in range(14):
        for j in range(14):
            ref = pil_resize(v, 16, box=(j * side, i * side, (j + 1) * side, (i + 1) * side))
            out = target[0, :, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16].numpy()
            unzoomed = inputs[0, :, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16].numpy()
            err, err_unzoomed = np.abs(out - ref).mean(), np.abs(unzoomed - ref).mean()
            assert err < 1e-4, (i, j, err)
            assert err < 0.1 * err_unzoomed, (i, j, err, err_unzoomed)


def test_zoom_in_small_geometry_and_rejects_bad_ring():
    view = photo(
        "chelsea", 80
    )  # S = 64, ring 8 (one 8 px patch): output token = 10 x 10 view pixels
    inputs, target = zoom_in(view, 8)
    v = view[0].numpy()
    assert np.array_equal(inputs[0].numpy(), v[:, 8:72, 8:72])
    for i, j in [(0, 0), (0, 7), (3, 4), (7, 7)]:
        ref = pil_resize(v, 8, box=(10 * j, 10 * i, 10 * j + 10, 10 * i + 10))
        assert np.abs(target[0, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].numpy() - ref).max() < 1e-4
    for ring in (0, -8, 40):
        with pytest.raises(ValueError, match="ring"):
            zoom_in(view, ring)


def test_zoom_in_objective_view_side_and_apply():
    d = build_degradation("zoom_in_mask", 224, 16, ring_patches=2)
    assert d.view_side == 288 and not d.aligned and d.masked
    view = photo("astronaut", 288)
    out = d.apply(view, {})
    assert np.array_equal(out.inputs.numpy(), view.numpy()[:, :, 32:256, 32:256])
    assert out.view is view
    assert np.abs(out.target[0].numpy() - pil_resize(view[0].numpy(), 224)).max() < 1e-4
    assert not build_degradation("zoom_in", 224, 16).masked


# ---------------------------------------------------------------------------- zoom-in-mask
# geometry
@pytest.mark.parametrize("grid,ring", [(14, 2), (8, 1), (3, 2), (1, 1)])
def test_view_regions_centre_and_strips_partition_the_view_grid(grid, ring):
    centre, strips = view_regions(grid, ring)
    G = grid + 2 * ring
    expected_centre = [
        r * G + c for r in range(ring, ring + grid) for c in range(ring, ring + grid)
    ]
    assert centre.tolist() == expected_centre  # row-major: the input frame's token order
    sets = [set(s.tolist()) for s in strips]
    assert [len(s) for s in strips] == [len(s) for s in sets]  # no duplicates
    for a in range(4):
        for b in range(a + 1, 4):
            assert not sets[a] & sets[b]
        assert not sets[a] & set(expected_centre)
    assert set().union(*sets) == set(range(G * G)) - set(expected_centre)
    assert len(strips[0]) + len(strips[1]) == 2 * ring * (grid + 2 * ring)
    assert len(strips[2]) + len(strips[3]) == 2 * ring * grid
    # top / bottom / left / right by position
    rows, cols = (
        [np.array(s.tolist()) // G for s in strips],
        [np.array(s.tolist()) % G for s in strips],
    )
    assert np.all(rows[0] < ring) and np.all(rows[1] >= ring + grid)
    assert np.all(cols[2] < ring) and np.all(cols[3] >= ring + grid)


def test_view_regions_centre_tokens_are_the_input_frame_tokens():
    view = photo("coffee", 288)
    inputs, _ = zoom_in(view, 32)
    centre, _ = view_regions(14, 2)
    view_tokens = my_patchify(view.numpy(), 16)
    input_tokens = my_patchify(inputs.numpy(), 16)
    assert np.array_equal(view_tokens[:, centre.numpy()], input_tokens)
    # and the same through the pixel teacher (what the step uses)
    t = PixelTeacher(16)
    assert torch.allclose(t(view, (18, 18))[:, centre], t(inputs, (14, 14)), atol=1e-5)


def test_output_to_view_recovers_the_view_from_the_output_frame():
    """Output-frame pixels (the view resized to 224) mapped back to 288 by area interpolation:
       the
    centre 224 crop approximates the input image and the ring holds the view's border."""
    view = photo("astronaut", 288)
    inputs, target = zoom_in(view, 32)
    pred = torch.from_numpy(my_patchify(target.numpy(), 16))
    back = output_to_view(pred, 16, (14, 14), 288)
    assert back.shape == (1, 3, 288, 288)
    b, v = back[0].numpy(), view[0].numpy()
    # exact: area upsampling of the output frame, written as a matrix
    A = area_matrix(288, 224)
    assert np.abs(b - A @ target[0].numpy().astype(np.float64) @ A.T).max() < 1e-5
    centre_err = np.abs(b[:, 32:256, 32:256] - inputs[0].numpy()).mean()
    assert centre_err < 0.03
    # the misaligned alternative (the output frame taken as the input frame) is much worse
    assert centre_err < 0.3 * np.abs(target[0].numpy() - inputs[0].numpy()).mean()
    strips = [
        (slice(0, 32), slice(None)),
        (slice(256, 288), slice(None)),
        (slice(32, 256), slice(0, 32)),
        (slice(32, 256), slice(256, 288)),
    ]
    for rs, cs in strips:
        assert np.abs(b[:, rs, cs] - v[:, rs, cs]).mean() < 0.03


def test_zoom_in_mask_loss_oracle_prediction_beats_misaligned_one():
    """(a) On a real photo: the output-frame targets as prediction give a much lower loss than
           the
    input-frame targets (the prediction one would make if the output frame were the input frame)."""
    views = torch.cat([photo("astronaut", 288), photo("chelsea", 288)])
    inputs, target = zoom_in(views, 32)
    g, r, p = 14, 2, 16
    mask = torch.zeros(2, g * g, dtype=torch.bool)
    mask[:, torch.randperm(g * g, generator=torch.Generator().manual_seed(0))[:147]] = True
    # raw pixels: the oracle is nearly exact
    raw = PixelTeacher(p, norm="none")
    vt = raw(views, (g + 2 * r,) * 2)
    oracle, parts_o = zoom_in_mask_loss(raw(target, (g, g)), vt, mask, p, g, r)
    aligned, parts_a = zoom_in_mask_loss(raw(inputs, (g, g)), vt, mask, p, g, r)
    assert float(oracle) < 0.005 and float(oracle) < 0.05 * float(aligned)
    assert parts_o["masked"] < 0.05 * parts_a["masked"] and parts_o["ring"] < 0.05 * parts_a["ring"]
    # per-patch, per-channel normalised targets (the default)
    t = PixelTeacher(p)
    vt = t(views, (g + 2 * r,) * 2)
    oracle, _ = zoom_in_mask_loss(t(target, (g, g)), vt, mask, p, g, r)
    aligned, _ = zoom_in_mask_loss(t(inputs, (g, g)), vt, mask, p, g, r)
    zero, _ = zoom_in_mask_loss(torch.zeros(2, g * g, p * p * 3), vt, mask, p, g, r)
    assert float(oracle) < 0.5 * float(aligned) and float(oracle) < float(zero)


def test_zoom_in_mask_loss_floor_with_normalised_targets_is_low():
    """The normalised view targets are reachable from the output frame: the least-squares best
    output-frame image (pseudo-inverse of the area upsampling, computed here) gives a loss far
    below predicting zeros."""
    view = photo("coffee", 288)
    g, r, p = 14, 2, 16
    vt = PixelTeacher(p)(view, (g + 2 * r,) * 2)
    Y = my_unpatchify(vt.numpy().astype(np.float64), p, g + 2 * r)[0]
    P = np.linalg.pinv(area_matrix(288, 224))
    best = (P @ Y @ P.T)[None]
    pred = torch.from_numpy(my_patchify(best, p)).float()
    mask = torch.ones(1, g * g, dtype=torch.bool)
    loss, _ = zoom_in_mask_loss(pred, vt, mask, p, g, r)
    zero, _ = zoom_in_mask_loss(torch.zeros_like(pred), vt, mask, p, g, r)
    assert float(loss) < 0.1 * float(zero)


@pytest.mark.parametrize("p,g,r,weight", [(4, 4, 1, 0.2), (16, 14, 2, 0.2), (2, 3, 2, 0.5)])
def test_zoom_in_mask_loss_equals_direct_computation(p, g, r, weight):
    """(d) On random tensors: area upsampling (matrix), per-strip MSE summed, masked MSE, weights
    1
    - w / w."""
    gen = torch.Generator().manual_seed(p * 100 + g)
    B, G = 2, g + 2 * r
    pred = torch.randn(B, g * g, p * p * 3, generator=gen)
    view_target = torch.randn(B, G * G, p * p * 3, generator=gen)
    mask = torch.rand(B, g * g, generator=gen) < 0.6
    mask[:, 0] = True
    loss, parts = zoom_in_mask_loss(pred, view_target, mask, p, g, r, weight)
    ref, ref_masked, ref_ring = ref_zoom_in_mask_loss(
        pred.numpy(), view_target.numpy(), mask.numpy(), p, g, r, weight
    )
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert parts["masked"] == pytest.approx(ref_masked, rel=1e-5)
    assert parts["ring"] == pytest.approx(ref_ring, rel=1e-5)
    # the masked term ignores the targets of the unmasked centre tokens, the ring term ignores
    # the centre
    centre, _ = view_regions(g, r)
    visible = torch.nonzero(~mask[0]).flatten()
    if len(visible):
        vt2 = view_target.clone()
        vt2[0, centre[visible]] += 5.0
        _, parts2 = zoom_in_mask_loss(pred, vt2, mask, p, g, r, weight)
        assert parts2["masked"] == pytest.approx(parts["masked"], rel=1e-6)
        assert parts2["ring"] == pytest.approx(parts["ring"], rel=1e-6)


# -----------------------------------------------------------------------------------------
# zoom-out
@pytest.mark.parametrize(
    "S,content,offsets",
    [
        (64, 46, [(0, 0), (18, 18), (5, 13), (17, 0)]),
        (224, 160, [(0, 0), (64, 64), (63, 7), (0, 40)]),
    ],
)
def test_zoom_out_content_and_mirror_padding(S, content, offsets):
    img = photo("chelsea", S)
    small = pil_resize(img[0].numpy(), content)
    for x, y in offsets:
        canvas = zoom_out(img, content, (x, y))[0].numpy()
        assert canvas.shape == (3, S, S)
        region = canvas[:, y : y + content, x : x + content]  # offset = (x, y): x is the column
        assert np.abs(region - small).max() < 1e-4
        padded = np.pad(
            region, ((0, 0), (y, S - content - y), (x, S - content - x)), mode="reflect"
        )
        assert np.array_equal(canvas, padded)
    with pytest.raises(ValueError):
        zoom_out(img, content, (S - content + 1, 0))
    with pytest.raises(ValueError):
        zoom_out(img, S // 2 - 1, (0, 0))  # too small to mirror-pad once


def test_zoom_out_objective_offsets_and_default_content():
    d = build_degradation("zoom_out", 224, 16)
    assert d.content == 160 and d.view_side == 224 and d.aligned and not d.masked
    rng = np.random.default_rng(0)
    offs = np.array([d.step_params(rng)["offset"] for _ in range(3000)])
    assert offs.min() == 0 and offs.max() == 63  # 0 .. 63 px (docs/method.md 2)
    assert len(np.unique(offs[:, 0])) == 64 and len(np.unique(offs[:, 1])) == 64
    assert not np.array_equal(offs[:, 0], offs[:, 1])  # x and y drawn independently
    img = photo("coffee", 224)
    out = d.apply(img, {"offset": (63, 0)})
    assert out.target is img
    assert np.array_equal(
        out.inputs[0].numpy()[:, 0:160, 63:223],
        zoom_out(img, 160, (63, 0))[0].numpy()[:, 0:160, 63:223],
    )


# ------------------------------------------------------------------------------------------
# distort
def test_radial_distort_matches_direct_bilinear_sampling():
    img = photo("coffee", 64)[:, :, 8:56, :]  # non-square: 48 x 64 (catches x / y swaps)
    centres = torch.tensor([[0.3, -0.6], [-1.0, 1.0], [0.9, 0.1]])
    strengths = torch.tensor([0.25, 0.15, 0.2])
    batch = img.expand(3, -1, -1, -1)
    out = radial_distort(batch, centres, strengths).numpy()
    for b in range(3):
        ref = ref_radial(img[0].numpy(), centres[b].numpy().astype(np.float64), float(strengths[b]))
        assert np.abs(out[b] - ref).max() < 1e-4, b
        assert np.abs(out[b] - img[0].numpy()).mean() > 0.01  # a real warp


def test_radial_distort_paper_size_identity_and_fixed_centre():
    img = torch.cat([photo("astronaut", 224), photo("chelsea", 224)])
    x = img.numpy()
    # strength 0: identity
    same = radial_distort(img, torch.zeros(2, 2), torch.zeros(2))
    assert np.abs(same.numpy() - x).max() < 1e-4
    # the pixel at the centre c stays put (c at a pixel centre)
    (py0, px0), (py1, px1) = (150, 40), (17, 200)
    c = torch.tensor(
        [
            [(2 * px0 + 1) / 224 - 1, (2 * py0 + 1) / 224 - 1],
            [(2 * px1 + 1) / 224 - 1, (2 * py1 + 1) / 224 - 1],
        ]
    )
    m = torch.tensor([0.25, 0.2])
    out = radial_distort(img, c, m).numpy()
    assert np.abs(out[0, :, py0, px0] - x[0, :, py0, px0]).max() < 1e-4
    assert np.abs(out[1, :, py1, px1] - x[1, :, py1, px1]).max() < 1e-4
    for b in range(2):
        ref = ref_radial(x[b], c[b].numpy().astype(np.float64), float(m[b]))
        assert np.abs(out[b] - ref).max() < 1e-4
    # far from the centre the image moves
    assert np.abs(out[0, :, :20, -20:] - x[0, :, :20, -20:]).mean() > 0.02


# ---------------------------------------------------------------------------------------------
# blur
def test_random_blur_matches_per_image_correlation_and_delta_is_identity():
    img = torch.cat([photo("astronaut", 48), photo("coffee", 48)])
    rng = np.random.default_rng(3)
    kernels = rng.normal(1 / 49, 0.02, size=(2, 3, 3, 7, 7)).astype(np.float32)
    out = random_blur(img, torch.from_numpy(kernels)).numpy()
    ref = ref_blur(img.numpy(), kernels)
    assert np.abs(out - ref).max() < 1e-5
    # each image uses its own kernel: swapping kernels changes the result
    swapped = random_blur(img, torch.from_numpy(kernels[::-1].copy())).numpy()
    assert np.abs(swapped - out).mean() > 1e-3
    # delta kernel (times C, for the division by C): identity
    delta = np.zeros((2, 3, 3, 5, 5), np.float32)
    for o in range(3):
        delta[:, o, o, 2, 2] = 3.0
    assert np.abs(random_blur(img, torch.from_numpy(delta)).numpy() - img.numpy()).max() < 1e-6
    with pytest.raises(ValueError):
        random_blur(img, torch.zeros(2, 3, 3, 6, 6))


def test_random_blur_paper_size_mean_kernel_is_a_box_blur_of_the_grey_mean():
    img = photo("chelsea", 224)
    kernels = np.full((1, 3, 3, 7, 7), 1 / 49, np.float32)
    out = random_blur(img, torch.from_numpy(kernels)).numpy()[0]
    grey = img[0].numpy().mean(0).astype(np.float64)
    box = ndimage.uniform_filter(grey, size=7, mode="mirror")
    for c in range(3):
        assert np.abs(out[c] - box).max() < 1e-5


# ---------------------------------------------------------------------------------------
# decolorize
def test_decolorize_weighted_sum_and_objective_grey_input():
    img = torch.cat([photo("coffee", 64), photo("astronaut", 64)])
    w = np.array([0.1, 0.6, 0.3], np.float32)
    grey = decolorize(img, torch.from_numpy(w)).numpy()
    x = img.numpy()
    ref = w[0] * x[:, 0] + w[1] * x[:, 1] + w[2] * x[:, 2]
    assert grey.shape == (2, 1, 64, 64)
    assert np.abs(grey[:, 0] - ref).max() < 1e-6
    d = build_degradation("decolorize", 64, 8)
    out = d.apply(img, {"weights": w})
    assert out.inputs.shape == (2, 3, 64, 64) and out.target is img
    for c in range(3):
        assert np.abs(out.inputs[:, c].numpy() - ref).max() < 1e-6


# ------------------------------------------------------------------------------ objective
# parameters
def test_objective_sample_is_deterministic_and_mae_masks_are_exact():
    obj, _ = make_objective("zoom_in_mask", 224, 16)
    a = obj.sample(np.random.default_rng(7))
    b = obj.sample(np.random.default_rng(7))
    c = obj.sample(np.random.default_rng(8))
    assert np.array_equal(a["mask"], b["mask"]) and not np.array_equal(a["mask"], c["mask"])
    assert num_random_masked(196, 0.75) == 147 and num_random_masked(64, 0.75) == 48
    for s in range(20):
        m = obj.sample(np.random.default_rng(s))["mask"]
        assert m.shape == (196,) and m.dtype == bool and m.sum() == 147
    small, _ = make_objective("mask", 64, 8)
    assert small.sample(np.random.default_rng(0))["mask"].sum() == 48
    # the other degradations leave the input unmasked
    for name in ("zoom_in", "zoom_out", "distort", "blur", "decolorize"):
        o, _ = make_objective(name, 64, 8)
        assert "mask" not in o.sample(np.random.default_rng(0))


def test_objective_degradation_parameter_distributions():
    dist, _ = make_objective("distort", 64, 8)
    draws = [dist.sample(np.random.default_rng(s)) for s in range(2000)]
    assert all(set(d) == {"centre", "strength"} for d in draws)
    m = np.array([d["strength"] for d in draws])
    cen = np.stack([d["centre"] for d in draws])
    assert m.min() >= 0.15 and m.max() <= 0.25 and m.min() < 0.152 and m.max() > 0.248
    assert cen.min() >= -1 and cen.max() <= 1 and cen.min() < -0.99 and cen.max() > 0.99
    assert abs(np.corrcoef(cen[:, 0], cen[:, 1])[0, 1]) < 0.1
    a, b = dist.sample(np.random.default_rng(5)), dist.sample(np.random.default_rng(5))
    assert np.array_equal(a["centre"], b["centre"]) and a["strength"] == b["strength"]

    blur, _ = make_objective("blur", 64, 8)
    ks = np.stack([blur.sample(np.random.default_rng(s))["kernel"] for s in range(300)])
    assert ks.shape == (300, 3, 3, 7, 7)
    assert ks.mean() == pytest.approx(1 / 49, abs=5e-4)
    assert ks.std() == pytest.approx(0.02, rel=0.02)

    deco = build_degradation("decolorize", 64, 8)
    w = np.stack([deco.step_params(np.random.default_rng(s))["weights"] for s in range(2000)])
    assert (
        w.shape == (2000, 3)
        and w.min() >= 0
        and w.max() <= 0.667
        and w.max() > 0.66
        and w.min() < 0.005
    )


def test_paper_size_objective_geometry_from_config():
    cfg = PretrainConfig(teacher="pixels", framework="mae", objective="zoom_in_mask")
    assert build_objective_degradation(cfg).view_side == 288
    cfg = PretrainConfig(teacher="pixels", framework="mae", objective="zoom_out")
    assert build_objective_degradation(cfg).content == 160
    cfg = PretrainConfig(
        teacher="pixels", framework="mae", objective="zoom_in", img_size=64, patch_size=8
    )
    assert (
        build_objective_degradation(cfg).view_side == 80
    )  # 64 / 7 rounded to one 8 px patch per side


# ------------------------------------------------------------------------------------- whole
# steps
def test_step_zoom_in_mask_inputs_mask_and_loss():
    obj, _ = make_objective("zoom_in_mask", 64, 8)
    views = torch.cat([photo("astronaut", 80), photo("chelsea", 80)])
    batch = make_batch(obj, views, seeds=[11, 12])
    model = RecordingModel(64, 8 * 8 * 3)
    loss, logs = obj(model, batch, step=3)
    ((inputs, mask),) = model.calls
    assert np.array_equal(inputs.numpy(), views.numpy()[:, :, 8:72, 8:72])
    assert mask.shape == (2, 64) and mask.sum(1).tolist() == [48, 48]
    assert torch.equal(mask, batch["extra"]["mask"].bool())
    vt = norm_per_channel(
        my_patchify(views.numpy(), 8)
    )  # targets of the view on its own 10 x 10 grid
    ref, ref_masked, ref_ring = ref_zoom_in_mask_loss(
        model.pred.expand(2, -1, -1).numpy(), vt, mask.numpy(), 8, 8, 1
    )
    assert float(loss) == pytest.approx(ref, rel=1e-4)
    assert logs["masked"] == pytest.approx(ref_masked, rel=1e-4) and logs["ring"] == pytest.approx(
        ref_ring, rel=1e-4
    )


def test_step_per_sample_distort_and_blur_and_per_step_zoom_out():
    imgs = torch.cat([photo("coffee", 64), photo("astronaut", 64)])
    # distortion: each sample its own centre and strength
    obj, _ = make_objective("distort", 64, 8)
    batch = make_batch(obj, imgs, seeds=[1, 2])
    model = RecordingModel(64, 192)
    obj(model, batch, step=0)
    seen = model.calls[0][0].numpy()
    for b, s in enumerate([1, 2]):
        p = obj.sample(np.random.default_rng(s))
        ref = ref_radial(imgs[b].numpy(), p["centre"].astype(np.float64), float(p["strength"]))
        assert np.abs(seen[b] - ref).max() < 1e-4
    # blur: each sample its own kernel
    obj, _ = make_objective("blur", 64, 8)
    batch = make_batch(obj, imgs, seeds=[3, 4])
    model = RecordingModel(64, 192)
    loss, _ = obj(model, batch, step=0)
    k = np.stack([obj.sample(np.random.default_rng(s))["kernel"] for s in (3, 4)])
    assert np.abs(model.calls[0][0].numpy() - ref_blur(imgs.numpy(), k)).max() < 1e-5
    # the loss is on every token against the clean image's normalised patches
    tgt = norm_per_channel(my_patchify(imgs.numpy(), 8))
    assert float(loss) == pytest.approx(((model.pred.numpy() - tgt) ** 2).mean(), rel=1e-4)
    # zoom-out: one offset per step for the whole batch, the same on a repeat of the step
    obj, _ = make_objective("zoom_out", 64, 8)
    batch = make_batch(obj, imgs, seeds=[0, 1])
    content, slack = 46, 64 - 46
    small = np.stack([pil_resize(imgs[b].numpy(), content) for b in range(2)])

    def find_offset(canvas):
        hits = [
            (x, y)
            for x in range(slack + 1)
            for y in range(slack + 1)
            if np.abs(canvas[:, :, y : y + content, x : x + content] - small).max() < 1e-4
        ]
        assert len(hits) == 1
        x, y = hits[0]
        pad = np.pad(
            canvas[:, :, y : y + content, x : x + content],
            ((0, 0), (0, 0), (y, slack - y), (x, slack - x)),
            mode="reflect",
        )
        assert np.array_equal(canvas, pad)
        return hits[0]

    model = RecordingModel(64, 192)
    offsets = []
    for step in (0, 0, 1, 2, 3):
        obj(model, batch, step=step)
        offsets.append(find_offset(model.calls[-1][0].numpy()))
    assert offsets[0] == offsets[1]
    assert len(set(offsets[1:])) > 1
    assert all(0 <= v < slack for o in offsets for v in o)


def test_step_decolorize_weights_per_step_recovered_by_least_squares():
    imgs = torch.cat([photo("chelsea", 64), photo("coffee", 64)])
    obj, _ = make_objective("decolorize", 64, 8)
    batch = make_batch(obj, imgs, seeds=[0, 1])
    model = RecordingModel(64, 192)
    ws = []
    for step in (5, 5, 6):
        obj(model, batch, step=step)
        seen = model.calls[-1][0].numpy()
        assert np.array_equal(seen[:, 0], seen[:, 1]) and np.array_equal(seen[:, 0], seen[:, 2])
        X = imgs.numpy().transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
        w, res, *_ = np.linalg.lstsq(X, seen[:, 0].reshape(-1).astype(np.float64), rcond=None)
        assert (
            np.abs(X @ w - seen[:, 0].reshape(-1)).max() < 1e-5
        )  # one weighting for the whole batch
        assert np.all(w >= -1e-5) and np.all(w <= 0.667 + 1e-5)
        ws.append(w)
    assert np.allclose(ws[0], ws[1], atol=1e-6) and not np.allclose(ws[0], ws[2], atol=1e-3)
