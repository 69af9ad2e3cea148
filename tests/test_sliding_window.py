"""Sliding window: window placement, Gaussian map, seamless stitching, padding, TTA, batching."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from inference.sliding_window import (
    FLIP_DIMS,
    compute_steps,
    gaussian_importance_map,
    sliding_window_predict,
    window_starts,
)


class Identity(nn.Module):
    def forward(self, x):
        return x.clone()


class CountingModel(nn.Module):
    """Records the batch size of every forward pass; returns a fixed linear map of its input."""

    def __init__(self, channels_in=2, channels_out=3):
        super().__init__()
        self.conv = nn.Conv3d(channels_in, channels_out, 3, padding=1)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.conv(x)


def symmetric_conv(channels_in=2, channels_out=4, seed=0):
    """A 3x3x3 conv whose kernels are symmetric under every axis flip: flip-equivariant."""
    torch.manual_seed(seed)
    conv = nn.Conv3d(channels_in, channels_out, 3, padding=1)
    with torch.no_grad():
        w = conv.weight
        conv.weight.copy_(sum(w.flip(dims) if dims else w for dims in FLIP_DIMS) / 8)
    return conv.eval()


@pytest.mark.parametrize("size, window, overlap, expected", [
    (10, 4, 0.5, [0, 2, 4, 6]),          # step exactly window/2
    (11, 4, 0.5, [0, 2, 4, 5, 7]),       # 7 / 4 = 1.75 -> rounded, last flush with the end
    (4, 4, 0.5, [0]),                    # one window
    (8, 4, 0.0, [0, 4]),                 # no overlap: tiles
    (9, 4, 0.0, [0, 2, 5]),              # no overlap, uneven: 3 windows spread evenly
    (240, 128, 0.5, [0, 56, 112]),
    (155, 128, 0.5, [0, 27]),
    (5, 4, 0.9, [0, 1]),                 # step floor(0.4) -> at least 1
])
def test_compute_steps(size, window, overlap, expected):
    assert compute_steps(size, window, overlap) == expected


@pytest.mark.parametrize("size, window, overlap", [(37, 8, 0.5), (100, 16, 0.25), (33, 32, 0.5), (17, 5, 0.7)])
def test_steps_cover_with_bounded_step(size, window, overlap):
    steps = compute_steps(size, window, overlap)
    assert steps[0] == 0 and steps[-1] == size - window
    assert all(0 < b - a <= max(1, int(window * (1 - overlap))) for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("size, window, overlap", [(3, 4, 0.5), (10, 0, 0.5), (10, 4, 1.0), (10, 4, -0.1)])
def test_compute_steps_rejects_bad_arguments(size, window, overlap):
    with pytest.raises(ValueError):
        compute_steps(size, window, overlap)


def test_window_starts_is_the_product_of_axes():
    starts = window_starts((10, 4, 8), (4, 4, 4), 0.5)
    assert len(starts) == 4 * 1 * 3
    assert starts[0] == (0, 0, 0) and starts[-1] == (6, 0, 4)


def test_gaussian_importance_map_properties():
    g = gaussian_importance_map((9, 8, 5), 0.125)
    assert g.shape == (9, 8, 5) and g.dtype == torch.float32
    assert g.max().item() == pytest.approx(1.0)
    assert g.min().item() > 0
    # symmetric under every flip (centre at (w - 1) / 2), peak at the centre
    for axis in range(3):
        assert torch.equal(g, g.flip(axis))
    assert g[4, 3, 2] == g.max()
    # separable Gaussian with sigma = 0.125 * window: ratio between neighbours along x
    sigma = 0.125 * 9
    expected = np.exp(-0.5 * (4 / sigma) ** 2) / 1.0
    assert g[0, 3, 2].item() / g[4, 3, 2].item() == pytest.approx(expected, rel=1e-5)


def test_gaussian_importance_map_has_no_zeros_and_is_cached():
    g = gaussian_importance_map((32, 32, 32), 0.01)  # far corners underflow to 0 in float32
    assert g.min().item() > 0
    assert (g == g.min()).sum() > 1  # the zeros were raised to the smallest nonzero value
    assert gaussian_importance_map((32, 32, 32), 0.01) is g


@pytest.mark.parametrize("bad", [dict(window=(4, 4)), dict(window=(4, 0, 4)), dict(sigma_scale=0.0)])
def test_gaussian_importance_map_rejects_bad_arguments(bad):
    args = dict(window=(4, 4, 4), sigma_scale=0.125) | bad
    with pytest.raises(ValueError):
        gaussian_importance_map(args["window"], args["sigma_scale"])


@pytest.mark.parametrize("shape, window, overlap", [
    ((2, 20, 20, 20), (8, 8, 8), 0.5),
    ((1, 13, 7, 21), (8, 8, 8), 0.5),     # odd sizes, one axis smaller than the window
    ((3, 5, 6, 3), (8, 8, 8), 0.5),       # smaller than the window everywhere
    ((1, 17, 19, 11), (6, 5, 4), 0.25),   # anisotropic window
    ((1, 16, 16, 16), (8, 8, 8), 0.0),
])
def test_identity_model_is_reproduced_without_seams(shape, window, overlap):
    torch.manual_seed(0)
    image = torch.randn(shape)
    out = sliding_window_predict(Identity(), image, window, overlap=overlap, mode=None, sw_batch_size=3)
    assert out.shape == image.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, image, atol=1e-6, rtol=1e-5)


def test_numpy_input_and_tta_with_identity():
    image = np.random.default_rng(0).normal(size=(2, 11, 9, 10)).astype(np.float32)
    out = sliding_window_predict(Identity(), image, (8, 8, 8), mode=None, tta=True)
    torch.testing.assert_close(out, torch.from_numpy(image), atol=1e-6, rtol=1e-5)


def test_activation_modes():
    image = torch.randn(3, 8, 8, 8)
    labels = sliding_window_predict(Identity(), image, (8, 8, 8), mode="labels")
    torch.testing.assert_close(labels, torch.softmax(image, dim=0))
    torch.testing.assert_close(labels.sum(0), torch.ones(8, 8, 8))
    regions = sliding_window_predict(Identity(), image, (8, 8, 8), mode="regions")
    torch.testing.assert_close(regions, torch.sigmoid(image))


def test_weighted_blend_matches_hand_computation():
    """Two windows along x with different constant outputs blend by their Gaussian weights."""
    window = (4, 2, 2)
    image = torch.zeros(1, 6, 2, 2)
    calls = iter([torch.tensor([1.0, 3.0])])  # window at x=0 outputs 1, window at x=2 outputs 3

    def model(x):
        values = next(calls)
        return values.view(-1, 1, 1, 1, 1).expand(-1, 1, *window).clone()

    out = sliding_window_predict(model, image, window, overlap=0.5, mode=None, sw_batch_size=2)
    g = gaussian_importance_map(window, 0.125)[:, 0, 0]  # weights along x
    expected = torch.tensor([1.0, 1.0,
                             (g[2] * 1 + g[0] * 3) / (g[2] + g[0]),
                             (g[3] * 1 + g[1] * 3) / (g[3] + g[1]),
                             3.0, 3.0])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_tta_of_flip_equivariant_model_equals_no_tta():
    model = symmetric_conv()
    image = torch.randn(2, 19, 14, 11)
    plain = sliding_window_predict(model, image, (8, 8, 8), mode="labels", tta=False)
    mirrored = sliding_window_predict(model, image, (8, 8, 8), mode="labels", tta=True)
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=1e-5)


def test_tta_averages_the_unflipped_outputs():
    torch.manual_seed(1)
    model = nn.Conv3d(2, 3, 3, padding=1).eval()  # not flip-equivariant
    image = torch.randn(2, 6, 6, 6)
    out = sliding_window_predict(model, image, (6, 6, 6), mode="regions", tta=True)
    expected = torch.zeros(3, 6, 6, 6)
    with torch.no_grad():
        for dims in FLIP_DIMS:
            x = image[None].flip(dims) if dims else image[None]
            y = torch.sigmoid(model(x))
            expected += (y.flip(dims) if dims else y)[0] / 8
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, sliding_window_predict(model, image, (6, 6, 6), mode="regions"))


@pytest.mark.parametrize("sw_batch_size, tta", [(1, False), (3, False), (100, False), (2, True)])
def test_batching_groups_windows_and_flips(sw_batch_size, tta):
    torch.manual_seed(0)
    model = CountingModel().eval()
    image = torch.randn(2, 12, 12, 8)
    n_windows = len(window_starts((12, 12, 8), (8, 8, 8), 0.5))  # 2 x 2 x 1
    out = sliding_window_predict(model, image, (8, 8, 8), sw_batch_size=sw_batch_size, tta=tta)
    flips = 8 if tta else 1
    # on CPU each of the 8 flips of a window group is its own pass (faster there); on GPU one pass
    groups = [min(sw_batch_size, n_windows - i) for i in range(0, n_windows, sw_batch_size)]
    expected = [g for g in groups for _ in range(flips)]
    assert model.batches == expected
    reference = sliding_window_predict(model, image, (8, 8, 8), sw_batch_size=1, tta=tta)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)


def test_accumulate_device_and_inference_mode():
    model = CountingModel()
    image = torch.randn(2, 9, 9, 9, requires_grad=False)
    out = sliding_window_predict(model, image, (8, 8, 8), device="cpu", accumulate_device="cpu")
    assert out.device.type == "cpu" and not out.requires_grad
    torch.testing.assert_close(out.sum(0), torch.ones(9, 9, 9))


@pytest.mark.parametrize("kwargs", [
    dict(window=(8, 8)), dict(overlap=1.0), dict(sw_batch_size=0), dict(mode="softmax"), dict(precision="int8"),
])
def test_rejects_bad_arguments(kwargs):
    args = dict(window=(8, 8, 8)) | kwargs
    window = args.pop("window")
    with pytest.raises(ValueError):
        sliding_window_predict(Identity(), torch.zeros(1, 8, 8, 8), window, **args)


def test_rejects_bad_image_and_model_outputs():
    with pytest.raises(ValueError, match="image"):
        sliding_window_predict(Identity(), torch.zeros(8, 8, 8), (8, 8, 8))
    with pytest.raises(TypeError, match="eval"):
        sliding_window_predict(lambda x: [x, x], torch.zeros(1, 8, 8, 8), (8, 8, 8))
    with pytest.raises(ValueError, match="spatial"):
        sliding_window_predict(lambda x: x[..., :4], torch.zeros(1, 8, 8, 8), (8, 8, 8))


def test_every_flip_combination_once():
    assert len(FLIP_DIMS) == 8 and len(set(FLIP_DIMS)) == 8
    assert set(FLIP_DIMS) == {d for n in range(4) for d in itertools.combinations((2, 3, 4), n)}


class OutOfMemoryAbove(nn.Module):
    """Doubles its input; raises the CUDA out-of-memory error for batches larger than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.batches = limit, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return 2 * x


def test_out_of_memory_retries_one_group_at_a_time(caplog):
    from inference.sliding_window import _forward_or_split
    model, inputs = OutOfMemoryAbove(limit=2), torch.arange(16.0).reshape(8, 2)
    out = _forward_or_split(model, inputs, group=2)
    assert torch.equal(out, 2 * inputs)
    assert model.batches == [8, 2, 2, 2, 2]
    assert "out of GPU memory with 8 windows in one pass: running 2 at a time" in caplog.text


def test_out_of_memory_of_a_single_group_is_raised():
    from inference.sliding_window import _forward_or_split
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _forward_or_split(OutOfMemoryAbove(limit=1), torch.zeros(2, 3), group=2)
