"""Batch augmentation: conventions of the spatial pieces, alignment of image and label,
intensity transforms against hand values / scipy, determinism, probabilities, config checks."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import datasets.augment as augment_module
from core.config import AugmentConfig, ConfigError, from_dict
from datasets.augment import (
    Augmenter,
    add_gaussian_noise,
    flip,
    gamma_transform,
    gaussian_blur,
    random_displacement,
    rotation_matrix,
    sampling_grid,
    spatial_transform,
)

ALL_OFF = dict(flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, elastic_prob=0.0, intensity_scale_prob=0.0,
               intensity_shift_prob=0.0, gamma_prob=0.0, noise_prob=0.0, blur_prob=0.0)
SPATIAL = dict(ALL_OFF, flip_prob=0.5, rotate_prob=1.0, scale_prob=1.0, elastic_prob=1.0,
               scale_range=[0.8, 1.25], elastic_sigma=6.0, elastic_magnitude=3.0)
ALL_ON = dict(SPATIAL, intensity_scale_prob=1.0, intensity_shift_prob=1.0, gamma_prob=1.0, noise_prob=1.0,
              blur_prob=1.0)


def augmenter(**keys) -> Augmenter:
    return Augmenter(AugmentConfig(**keys))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def phantom(shape=(32, 30, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    """Label (X, Y, Z) uint8 with a sphere of 1, a box of 2 and a sphere of 3; image = 10 * label."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))

    def ball(center, radius):
        return ((grid - torch.tensor(center, dtype=torch.float64).view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2

    label = torch.zeros(shape, dtype=torch.uint8)
    label[ball((10, 10, 10), 6.5)] = 1
    label[18:27, 5:14, 15:24] = 2
    label[ball((21, 21, 9), 5.5)] = 3
    return 10.0 * label.float(), label


def smooth_image(shape, batch=1, channels=1) -> torch.Tensor:
    """Low-frequency test image (B, C, X, Y, Z) with values in about [-3, 3]."""
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    image = torch.cos(2.1 * x + 0.3) + torch.sin(1.7 * y - 0.5) + torch.cos(1.3 * z + 2.0 * x)
    return image.float().expand(batch, channels, *shape).clone()


# ---------------------------------------------------------------------------------------------
# Spatial conventions.
# ---------------------------------------------------------------------------------------------
def test_rotation_matrix_is_a_right_handed_rotation():
    angles = torch.tensor([[0.3, -0.7, 1.1], [0.0, 0.0, math.pi / 2]], dtype=torch.float64)
    rot = rotation_matrix(angles)
    assert torch.allclose(rot @ rot.mT, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(2, dtype=torch.float64))
    # +90 degrees about Z turns +X into +Y
    assert torch.allclose(rot[1] @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                          torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12)
    # composition order R = Rz @ Ry @ Rx
    single = [rotation_matrix(torch.tensor([[a if i == j else 0.0 for j in range(3)]], dtype=torch.float64))[0]
              for i, a in enumerate(angles[0].tolist())]
    assert torch.allclose(rot[0], single[2] @ single[1] @ single[0], atol=1e-12)
    with pytest.raises(ValueError, match="angles"):
        rotation_matrix(torch.zeros(2, 2))


def test_quarter_turn_moves_a_voxel_by_hand():
    image = torch.zeros(1, 1, 9, 9, 5)
    image[0, 0, 7, 4, 2] = 1.0  # 3 voxels along +X from the centre (4, 4, 2)
    turn = rotation_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=torch.float64))
    out, _ = spatial_transform(image, None, turn.mT)
    assert (out[0, 0] > 0.5).nonzero().tolist() == [[4, 7, 2]]  # now 3 voxels along +Y


@pytest.mark.parametrize("axis, shape, plane", [
    (0, (9, 14, 14), (1, 2)),   # about X: +Y -> +Z
    (1, (14, 9, 14), (2, 0)),   # about Y: +Z -> +X
    (2, (14, 14, 9), (0, 1)),   # about Z: +X -> +Y
])
def test_quarter_turn_equals_rot90(axis, shape, plane):
    generator = seeded(axis)
    image = torch.randn(2, 3, *shape, generator=generator)
    label = torch.randint(0, 4, (2, *shape), generator=generator, dtype=torch.uint8)
    angles = torch.zeros(2, 3, dtype=torch.float64)
    angles[:, axis] = math.pi / 2
    out_image, out_label = spatial_transform(image, label, rotation_matrix(angles).mT)
    expected_image = torch.rot90(image, 1, dims=(plane[0] + 2, plane[1] + 2))
    assert torch.allclose(out_image, expected_image, atol=1e-5)
    assert torch.equal(out_label, torch.rot90(label, 1, dims=(plane[0] + 1, plane[1] + 1)))


def test_sampling_grid_equals_affine_grid():
    shape = (20, 24, 17)
    matrix = rotation_matrix(torch.tensor([[0.4, -0.2, 0.9], [-1.0, 0.5, 0.1]], dtype=torch.float64)).mT * 0.8
    half = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    theta = (matrix * half[None, None, :] / half[None, :, None]).flip(1, 2)
    theta = torch.cat([theta, torch.zeros(2, 3, 1, dtype=torch.float64)], dim=2)
    expected = F.affine_grid(theta.float(), [2, 1, *shape], align_corners=True)
    assert torch.allclose(sampling_grid(matrix, shape), expected, atol=1e-6)


def test_sampling_grid_upsamples_a_coarse_displacement_like_interpolate():
    shape = (20, 24, 17)
    coarse = torch.randn(2, 3, 5, 7, 4, dtype=torch.float64, generator=seeded(1))
    identity = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    delta = (sampling_grid(identity, shape, coarse, dtype=torch.float64)
             - sampling_grid(identity, shape, dtype=torch.float64))
    fine = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    half = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    expected = (fine / half.view(1, 3, 1, 1, 1)).flip(1).permute(0, 2, 3, 4, 1)
    assert torch.allclose(delta, expected, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_constant_displacement_shifts_along_its_axis(axis):
    shape = (12, 10, 8)
    image = torch.randn(1, 2, *shape, generator=seeded(axis))
    label = torch.randint(0, 3, (1, *shape), generator=seeded(axis + 10))
    displacement = torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64)  # coarse: upsampled to the patch
    displacement[0, axis] = 1.0  # output voxel i reads input voxel i + 1 along axis
    out_image, out_label = spatial_transform(image, label, torch.eye(3).unsqueeze(0), displacement)
    n = shape[axis]
    assert torch.allclose(out_image.narrow(axis + 2, 0, n - 1), image.narrow(axis + 2, 1, n - 1), atol=1e-5)
    assert torch.equal(out_label.narrow(axis + 1, 0, n - 1), label.narrow(axis + 1, 1, n - 1))
    assert out_image.narrow(axis + 2, n - 1, 1).abs().max() < 1e-5  # read outside the patch: zero padding
    assert out_label.narrow(axis + 1, n - 1, 1).max() == 0


def distance_to_centre(shape) -> torch.Tensor:
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(3, 1, 1, 1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    return ((grid - centre) ** 2).sum(0).sqrt()


def test_rotation_keeps_a_centred_sphere_on_an_anisotropic_patch():
    shape = (32, 24, 20)
    distance = distance_to_centre(shape)
    label = (distance <= 8.0).to(torch.uint8).unsqueeze(0)
    matrix = rotation_matrix(torch.tensor([[0.5, -0.8, 0.6]], dtype=torch.float64)).mT
    _, rotated = spatial_transform(torch.zeros(1, 1, *shape), label, matrix)
    # nearest sampling moves a read by at most half a voxel diagonal: only the surface may differ
    # (rotating normalised coordinates of an anisotropic patch would make an ellipsoid)
    changed = rotated[0] != label[0]
    assert changed.any() and ((distance[changed] - 8.0).abs() <= math.sqrt(3) / 2 + 1e-6).all()


def test_zoom_by_two_magnifies_a_sphere():
    shape = (31, 27, 25)
    distance = distance_to_centre(shape)
    label = (distance <= 5.0).to(torch.uint8).unsqueeze(0)
    _, zoomed = spatial_transform(torch.zeros(1, 1, *shape), label, torch.eye(3).unsqueeze(0) / 2)
    changed = zoomed[0] != (distance <= 10.0)  # radius 5 -> 10; reads are off by <= half a diagonal
    assert changed.any() and ((distance[changed] / 2 - 5.0).abs() <= math.sqrt(3) / 2 + 1e-6).all()


def test_rotation_then_inverse_recovers_the_interior():
    shape = (32, 28, 24)
    image = smooth_image(shape)
    matrix = rotation_matrix(torch.tensor([[0.3, -0.25, 0.4]], dtype=torch.float64)).mT
    there, _ = spatial_transform(image, None, matrix)
    back, _ = spatial_transform(there, None, matrix.mT)
    # theta then -theta about a single axis is the same inverse
    about_z = rotation_matrix(torch.tensor([[0.0, 0.0, 0.5]], dtype=torch.float64))
    assert torch.allclose(about_z.mT, rotation_matrix(torch.tensor([[0.0, 0.0, -0.5]], dtype=torch.float64)))
    interior = distance_to_centre(shape) <= 9.0
    error = (back - image)[0, 0][interior].abs().max()
    assert error < 0.02 * (image.max() - image.min())
    assert (there - image)[0, 0][interior].abs().max() > 0.2  # the rotation did move the image


def test_spatial_transform_rejects_bad_shapes():
    with pytest.raises(ValueError, match="matrix"):
        spatial_transform(torch.zeros(1, 1, 4, 4, 4), None, torch.eye(3))
    with pytest.raises(ValueError, match="shape"):
        spatial_transform(torch.zeros(1, 1, 4, 4, 1), None, torch.eye(3).unsqueeze(0))
    with pytest.raises(ValueError, match="displacement"):
        spatial_transform(torch.zeros(1, 1, 4, 4, 4), None, torch.eye(3).unsqueeze(0), torch.zeros(1, 2, 4, 4, 4))


def test_random_displacement_is_bounded_and_smooth():
    magnitude = torch.tensor([4.0, 1.5, 0.0], dtype=torch.float64)
    field = random_displacement(3, (32, 24, 20), 6.0, magnitude, seeded(0))
    assert field.shape[:2] == (3, 3) and field.shape[2] < 32  # coarse grid
    peak = field.norm(dim=1).flatten(1).amax(dim=1)
    assert torch.allclose(peak, magnitude)
    fine = F.interpolate(field, size=(32, 24, 20), mode="trilinear", align_corners=True)
    assert fine.norm(dim=1).max() <= 4.0 + 1e-9
    assert fine[0].diff(dim=1).abs().max() < 1.0  # smooth: under a voxel between neighbours


# ---------------------------------------------------------------------------------------------
# The augmenter.
# ---------------------------------------------------------------------------------------------
def test_identity_config_returns_inputs_unchanged():
    image = torch.randn(2, 3, 16, 12, 10, generator=seeded(0))
    label = torch.randint(0, 4, (2, 16, 12, 10), generator=seeded(1), dtype=torch.uint8)
    out_image, out_label = augmenter(**ALL_OFF)(image, label, seeded(2))
    assert torch.equal(out_image, image) and torch.equal(out_label, label)


def test_samples_without_a_transform_are_bit_exact_in_a_mixed_batch():
    augment = augmenter(**dict(ALL_OFF, rotate_prob=0.5))
    image = torch.randn(8, 2, 12, 10, 9, generator=seeded(0))
    label = torch.randint(0, 4, (8, 12, 10, 9), generator=seeded(1))
    params = augment.sample(8, 2, (12, 10, 9), seeded(5))
    assert 0 < int(params.spatial.sum()) < 8
    out_image, out_label = augment.apply(image, label, params)
    for b in range(8):
        if params.spatial[b]:
            single = spatial_transform(image[b:b + 1], label[b:b + 1], params.matrix[b:b + 1])
            assert torch.equal(out_image[b:b + 1], single[0]) and torch.equal(out_label[b:b + 1], single[1])
        else:
            assert torch.equal(out_image[b], image[b]) and torch.equal(out_label[b], label[b])


@pytest.mark.parametrize("image_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_shapes_dtypes_preserved_and_inputs_untouched(image_dtype, label_dtype):
    image = torch.randn(2, 2, 20, 16, 12, generator=seeded(0)).to(image_dtype)
    label = torch.randint(0, 4, (2, 20, 16, 12), generator=seeded(1)).to(label_dtype)
    image_copy, label_copy = image.clone(), label.clone()
    out_image, out_label = augmenter(**ALL_ON)(image, label, seeded(3))
    assert out_image.shape == image.shape and out_image.dtype == image_dtype
    assert out_label.shape == label.shape and out_label.dtype == label_dtype
    assert out_image.device == image.device and out_label.device == label.device
    assert torch.isfinite(out_image).all()
    assert torch.equal(image, image_copy) and torch.equal(label, label_copy)


def test_labels_stay_in_the_input_label_set():
    image, label = phantom()
    label = torch.tensor([0, 2, 4, 8], dtype=torch.uint8)[label.long()]
    values = set(label.unique().tolist())
    assert values == {0, 2, 4, 8}  # gaps an interpolating resampler would fill
    batch_label = label.expand(4, *label.shape).clone()
    _, out_label = augmenter(**SPATIAL)(image.expand(4, 1, *image.shape).clone(), batch_label, seeded(0))
    assert set(out_label.unique().tolist()) <= values
    assert not torch.equal(out_label, batch_label)


def test_labels_stay_aligned_with_their_intensities():
    image, label = phantom()
    batch_image, batch_label = image.expand(4, 2, *image.shape).clone(), label.expand(4, *label.shape).clone()
    out_image, out_label = augmenter(**SPATIAL)(batch_image, batch_label, seeded(7))
    assert not torch.equal(out_label, batch_label)
    hits = total = 0
    for k in (1, 2, 3):
        for b in range(4):
            inside = torch.from_numpy(ndimage.binary_erosion(out_label[b].numpy() == k))  # off boundaries
            assert inside.sum() > 30
            hits += int(((out_image[b, :, inside] - 10.0 * k).abs() < 0.5).sum())
            total += 2 * int(inside.sum())
    # about 0.98-0.99 here; the same check on labels misplaced by one voxel gives about 0.92
    assert hits / total > 0.97


def test_flips_are_involutions_and_move_image_and_label_together():
    image, label = phantom((12, 10, 8))
    image, label = image.expand(3, 1, 12, 10, 8).clone(), label.expand(3, 12, 10, 8).clone()
    axes = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    flipped_image, flipped_label = flip(image, label, axes)
    assert torch.equal(flipped_image[0], image[0].flip(1, 3)) and torch.equal(flipped_label[2], label[2].flip(0, 1, 2))
    assert torch.equal(flipped_image[1], image[1])
    assert torch.equal(flipped_image[:, 0], 10.0 * flipped_label.float())
    back_image, back_label = flip(flipped_image, flipped_label, axes)
    assert torch.equal(back_image, image) and torch.equal(back_label, label)


def test_same_seed_same_result_other_seed_differs():
    augment = augmenter(**ALL_ON)
    image = torch.randn(2, 2, 16, 14, 12, generator=seeded(0))
    label = torch.randint(0, 4, (2, 16, 14, 12), generator=seeded(1), dtype=torch.uint8)
    first = augment(image, label, seeded(42))
    again = augment(image, label, seeded(42))
    other = augment(image, label, seeded(43))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_flip_probability_is_respected_per_axis():
    batch = 1000
    image = torch.arange(8, dtype=torch.float32).view(1, 1, 2, 2, 2).expand(batch, 1, 2, 2, 2).clone()
    label = torch.zeros(batch, 2, 2, 2, dtype=torch.uint8)
    out, _ = augmenter(**dict(ALL_OFF, flip_prob=0.5))(image, label, seeded(0))
    corner = out[:, 0, 0, 0, 0].long()  # = 4 * flip_x + 2 * flip_y + flip_z
    for bit in (4, 2, 1):
        fraction = ((corner // bit) % 2).float().mean()
        assert 0.45 < fraction < 0.55
    assert 0.08 < (corner == 7).float().mean() < 0.17  # the axes are drawn independently (1/8)


@pytest.mark.parametrize("key, mask", [
    ("rotate_prob", "spatial"), ("elastic_prob", "spatial"), ("noise_prob", "noise"), ("blur_prob", "blur"),
    ("intensity_scale_prob", "scale"), ("intensity_shift_prob", "shift"), ("gamma_prob", "gamma"),
])
def test_transform_probabilities_are_respected(key, mask):
    params = augmenter(**dict(ALL_OFF, **{key: 0.3})).sample(4000, 1, (4, 4, 4), seeded(1))
    assert 0.27 < getattr(params, mask).double().mean() < 0.33


@pytest.mark.parametrize("key, value", [
    ("flip_prob", 1.5), ("gamma_prob", -0.1), ("noise_prob", float("nan")), ("rotate_range", -5.0),
    ("rotate_range", 270.0), ("scale_range", [1.4, 0.7]), ("scale_range", [0.0, 1.2]), ("gamma_range", [1.5]),
    ("intensity_scale_range", [1.25, 0.75]), ("blur_sigma", [1.0, 0.5]), ("elastic_sigma", 0.0),
    ("elastic_magnitude", -1.0), ("noise_std", -0.1), ("intensity_shift_range", float("inf")),
])
def test_invalid_config_raises_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"augment.{key}: {value!r}".replace("[", r"\[").replace("]", r"\]")):
        from_dict({"augment": {key: value}})  # validated when the config is loaded, on every entry point


def test_call_rejects_mismatched_inputs():
    augment = augmenter()
    with pytest.raises(ValueError, match="label"):
        augment(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4))  # float label
    with pytest.raises(ValueError, match="label"):
        augment(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image"):
        augment(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# Intensity transforms.
# ---------------------------------------------------------------------------------------------
def test_gamma_by_hand_and_on_constant_channels():
    image = torch.tensor([10.0, 10.25, 10.5, 11.0]).view(1, 1, 4, 1, 1).repeat(1, 2, 1, 1, 1)
    image[0, 1] = 3.0  # constant channel
    out = gamma_transform(image, torch.tensor([[2.0, 0.5]]), retain_stats=False)
    assert torch.allclose(out[0, 0].flatten(), torch.tensor([10.0, 10.0625, 10.25, 11.0]))
    assert torch.equal(out[0, 1], image[0, 1])
    kept = gamma_transform(image, torch.tensor([[2.0, 0.5]]), retain_stats=True)
    assert torch.allclose(kept.mean(dim=(2, 3, 4)), image.mean(dim=(2, 3, 4)), atol=1e-5)
    assert torch.allclose(kept[0, 0].std(), image[0, 0].std(), atol=1e-5)
    assert torch.equal(kept[0, 1], image[0, 1])


@pytest.mark.parametrize("retain_stats", [False, True])
def test_gamma_matches_the_nnunet_recipe(retain_stats):
    image = torch.randn(2, 3, 6, 5, 4, generator=seeded(0), dtype=torch.float64)
    gamma = torch.tensor([[0.7, 1.0, 1.5], [1.2, 0.8, 1.4]], dtype=torch.float64)
    out = gamma_transform(image, gamma, retain_stats)
    for b in range(2):
        for c in range(3):
            x = image[b, c].numpy()
            low, span = x.min(), x.max() - x.min()
            expected = ((x - low) / span) ** float(gamma[b, c]) * span + low
            if retain_stats:
                expected = (expected - expected.mean()) / expected.std(ddof=1) * x.std(ddof=1) + x.mean()
            assert np.allclose(out[b, c].numpy(), expected, atol=1e-10)


def test_blur_matches_scipy_per_channel():
    image = torch.randn(2, 2, 14, 12, 10, generator=seeded(0), dtype=torch.float64)
    sigma = torch.tensor([[0.5, 1.0], [0.8, 0.0]], dtype=torch.float64)
    out = gaussian_blur(image, sigma)
    for b in range(2):
        for c in range(2):
            # one kernel width for the batch: 3 sigma of the largest sigma
            expected = ndimage.gaussian_filter(image[b, c].numpy(), float(sigma[b, c]), mode="nearest", radius=3)
            assert np.allclose(out[b, c].numpy(), expected, atol=1e-10)


def kernel_1d(sigma: float, radius: int) -> np.ndarray:
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return weights / weights.sum()


@pytest.mark.parametrize("shape", [(2, 4, 18, 13, 9), (1, 1, 12, 12, 12), (3, 2, 2, 7, 5)])
def test_blur_float32_matches_scipy(shape):
    """The CPU path (channels-last, a 2-D convolution per axis) against scipy in float64."""
    image = torch.randn(*shape, generator=seeded(1)) * 2 + 1
    sigma = 0.3 + 1.2 * torch.rand(shape[:2], generator=seeded(2), dtype=torch.float64)
    radius = math.ceil(3 * float(sigma.max()))
    before = image.clone()
    out = gaussian_blur(image, sigma)
    assert out.shape == image.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(image, before)
    for b in range(shape[0]):
        for c in range(shape[1]):
            expected = image[b, c].double().numpy()
            for axis in range(3):
                expected = ndimage.convolve1d(expected, kernel_1d(float(sigma[b, c]), radius), axis=axis,
                                              mode="nearest")
            np.testing.assert_allclose(out[b, c].numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_blur_of_a_step_along_one_axis_by_hand(axis):
    """A step 0 -> 1 between voxels 2 and 3 along ``axis``: the blurred profile along that axis is
    the 1-D kernel's cumulative sum (edges repeated), and nothing changes along the other axes."""
    shape = [6, 7, 8]
    profile = (np.arange(shape[axis]) >= 3).astype(np.float32)
    view = [1, 1, 1]
    view[axis] = shape[axis]
    image = torch.from_numpy(np.broadcast_to(profile.reshape(view), shape).copy())[None, None]
    out = gaussian_blur(image.expand(1, 2, *shape).clone(), torch.tensor([[1.0, 0.5]], dtype=torch.float64))
    for channel, sigma in enumerate((1.0, 0.5)):
        weights = kernel_1d(sigma, 3)  # radius 3 = 3 x the largest sigma, for both channels
        padded = np.concatenate([np.zeros(3), profile, np.ones(3)])
        expected = np.array([weights @ padded[i:i + 7] for i in range(shape[axis])])
        result = out[0, channel].numpy()
        np.testing.assert_allclose(np.moveaxis(result, axis, 0),
                                   np.broadcast_to(expected[:, None, None], [shape[axis]] + shape[:axis]
                                                   + shape[axis + 1:]), atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_blur_on_the_cpu_avoids_the_slow_convolution_kernels():
    """A conv3d with its kernel along X ran PyTorch's reference kernel (aten::slow_conv3d), ~10x
    slower than oneDNN; every pass must now run through oneDNN."""
    image = torch.randn(2, 4, 12, 12, 12, generator=seeded(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        gaussian_blur(image, torch.full((2, 4), 0.8, dtype=torch.float64))
    names = [event.key for event in profiler.key_averages()]
    assert not [name for name in names if "slow_conv" in name]
    assert sum(event.count for event in profiler.key_averages() if event.key == "aten::mkldnn_convolution") == 3


def exact_std_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample std and mean over the last axis with correctly rounded sums (math.fsum), float64."""
    rows = x.double().reshape(-1, x.shape[-1]).tolist()
    means = [math.fsum(row) / len(row) for row in rows]
    stds = [math.sqrt(math.fsum((v - m) ** 2 for v in row) / (len(row) - 1)) for row, m in zip(rows, means)]
    return (torch.tensor(stds, dtype=torch.float64).view(x.shape[:-1]),
            torch.tensor(means, dtype=torch.float64).view(x.shape[:-1]))


@pytest.mark.parametrize("dtype,offset,chunk", [
    (torch.float32, 0.0, 2**17), (torch.float32, 0.3, 50), (torch.float32, 1000.0, 64),
    (torch.float64, 5.0, 33), (torch.float16, 2.0, 40),
])
def test_std_mean_equals_torch_std_mean(monkeypatch, dtype, offset, chunk):
    """The chunked two-pass statistics of gamma_transform equal exact ones to the dtype's
    precision (the std at least as closely as ``torch.std_mean``), whatever the chunk size (also one
    not dividing the voxel count), also for a channel whose mean is 10^6 times its std."""
    monkeypatch.setattr(augment_module, "_STATS_CHUNK", chunk)
    spread = torch.tensor([0.5, 2.0, 1e-3], dtype=torch.float64).view(1, 3, 1)
    x = (torch.randn(2, 3, 1001, generator=seeded(4), dtype=torch.float64) * spread + offset).to(dtype)
    std, mean = augment_module._std_mean(x)
    exact_std, exact_mean = exact_std_mean(x)
    assert std.dtype == mean.dtype == dtype and std.shape == mean.shape == (2, 3)
    eps = torch.finfo(dtype).eps
    assert torch.allclose(mean.double(), exact_mean, rtol=0, atol=eps * float(x.abs().max()))
    assert torch.allclose(std.double(), exact_std, rtol=4 * eps, atol=0)
    old_std, _ = torch.std_mean(x, dim=2)  # the std is no less accurate than torch's
    assert ((std.double() - exact_std).abs() <= (old_std.double() - exact_std).abs() + eps * exact_std).all()


@pytest.mark.parametrize("gamma_range", [(0.7, 1.5), (0.3, 3.0)])
def test_gamma_equals_the_std_mean_formula(gamma_range):
    """gamma_transform with retain_stats against the same formula written with torch.std_mean (the
    previous implementation), in float32."""
    image = torch.randn(3, 2, 24, 20, 16, generator=seeded(6)) * 1.5 + 0.3
    image[1, 1] = 4.0  # a constant channel stays as it is
    low, high = gamma_range
    gamma = low + (high - low) * torch.rand(3, 2, generator=seeded(7), dtype=torch.float64)
    flat = image.flatten(2)
    mins, maxs = flat.amin(2), flat.amax(2)
    span = (maxs - mins)[..., None, None, None]
    unit = ((image - mins[..., None, None, None]) / span.clamp_min(1e-7)).clamp(0, 1)
    powered = unit.pow(gamma.float()[..., None, None, None])
    std, mean = torch.std_mean(flat, dim=2)
    new_std, new_mean = torch.std_mean(powered.flatten(2), dim=2)
    factor = (std / new_std)[..., None, None, None]
    expected = (powered - new_mean[..., None, None, None]) * factor + mean[..., None, None, None]
    expected[1, 1] = image[1, 1]
    out = gamma_transform(image, gamma, retain_stats=True)
    ulp = torch.finfo(torch.float32).eps * float(image.abs().max())
    assert torch.allclose(out, expected, rtol=0, atol=8 * ulp)  # a few float32 roundings apart
    assert torch.equal(out[1, 1], image[1, 1])


def test_noise_has_the_drawn_standard_deviation():
    image = torch.zeros(2, 2, 32, 32, 32)
    std = torch.tensor([[0.1, 0.0], [0.05, 0.2]])
    out = add_gaussian_noise(image, std, seeded(0))
    assert torch.allclose(out.std(dim=(2, 3, 4)), std, rtol=0.02)


def test_intensity_scale_and_shift_use_the_drawn_values():
    augment = augmenter(**dict(ALL_OFF, intensity_scale_prob=1.0, intensity_shift_prob=0.5))
    image = torch.randn(6, 2, 8, 8, 8, generator=seeded(0))
    label = torch.zeros(6, 8, 8, 8, dtype=torch.uint8)
    params = augment.sample(6, 2, (8, 8, 8), seeded(3))
    assert params.shift.any() and not params.shift.all()
    assert ((params.scale_factor >= 0.75) & (params.scale_factor <= 1.25)).all()
    assert (params.shift_value[~params.shift] == 0).all() and (params.shift_value.abs() <= 0.1).all()
    out, _ = augment.apply(image, label, params)
    factor, shift = params.scale_factor.float(), params.shift_value.float()
    expected = image * factor[..., None, None, None] + shift[..., None, None, None]
    assert torch.allclose(out, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA.
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_seed():
    image, label = phantom()
    image, label = image.expand(2, 2, *image.shape).clone(), label.expand(2, *label.shape).clone()
    keys = dict(ALL_ON, noise_prob=0.0)
    cpu_image, cpu_label = augmenter(**keys)(image, label, seeded(5))
    gpu_image, gpu_label = augmenter(**keys)(image.cuda(), label.cuda(), seeded(5))
    assert gpu_image.is_cuda and gpu_label.is_cuda and gpu_label.dtype == label.dtype
    assert (gpu_image.cpu() - cpu_image).abs().max() < 1e-2
    assert (gpu_label.cpu() == cpu_label).float().mean() > 0.999
    noisy_image, noisy_label = augmenter(**ALL_ON)(image.cuda(), label.cuda(), seeded(5))
    assert noisy_image.is_cuda and noisy_image.shape == image.shape and torch.isfinite(noisy_image).all()
