"""Batch data augmentation with torch ops, on any device (CPU DataLoader workers or the GPU).

    augment = Augmenter(cfg.augment)
    image, label = augment(image, label, generator)  # (B, C, X, Y, Z) float, (B, X, Y, Z) integer

Random parameters are drawn on the CPU from ``generator`` (``Augmenter.sample``), so a seed gives
the same augmentation on every device; they are then applied with batched torch ops on the
tensors' device (``Augmenter.apply``). Each transform is drawn per sample with its probability:

- spatial: rotation about the three axes, isotropic zoom and elastic deformation, composed into
  one sampling grid and one ``grid_sample`` per batch (image trilinear, label nearest; points
  outside the patch read 0 = background). Samples that drew none of them are not resampled.
- flips of each axis independently (image and label together).
- intensity, image only, one value per channel: Gaussian noise, Gaussian blur, multiplicative
  scale, additive shift, gamma (nnU-Net style), applied in this order.

Coordinates: voxel ``(i, j, k)`` of a patch of shape ``(X, Y, Z)`` has the centred coordinate
``p = (i, j, k) - ((X, Y, Z) - 1) / 2`` in voxels, in (X, Y, Z) order. Spatial matrices act on
these, so a rotation stays a rotation on anisotropic patch shapes.

The Gaussian noise field itself is drawn on the tensors' device from a seed taken from
``generator``: reproducible for a seed, but not bit-identical between CPU and CUDA. With
``generator=None`` the global RNG is used, which PyTorch seeds differently in each DataLoader worker.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from core.config import AugmentConfig

TRUNCATE = 3.0  # Gaussian kernels are cut at this many sigmas
_EPS = 1e-7  # guards divisions by a channel's value range or standard deviation
_STATS_CHUNK = 2**17  # elements per step of _std_mean on the CPU (half an L2 cache of float32)


# ----------------------------------------------------------------------------------------------
# Spatial transforms.
# ----------------------------------------------------------------------------------------------
def rotation_matrix(angles: Tensor) -> Tensor:
    """Rotations ``R = Rz @ Ry @ Rx`` from angles in radians about X, Y, Z: ``(B, 3)`` -> ``(B, 3, 3)``.

    Right-handed: a positive angle about Z turns +X towards +Y (about X: +Y towards +Z; about Y:
    +Z towards +X). ``R`` moves content; the matrix that samples the rotated content is ``R.mT``.
    """
    if angles.dim() != 2 or angles.shape[1] != 3:
        raise ValueError(f"angles: expected shape (B, 3), got {tuple(angles.shape)}")
    eye = torch.eye(3, dtype=angles.dtype, device=angles.device)
    result = eye.expand(angles.shape[0], 3, 3)
    for axis, (i, j) in enumerate([(1, 2), (2, 0), (0, 1)]):  # the plane each axis turns
        cos, sin = angles[:, axis].cos(), angles[:, axis].sin()
        turn = eye.repeat(angles.shape[0], 1, 1)
        turn[:, i, i], turn[:, i, j], turn[:, j, i], turn[:, j, j] = cos, -sin, sin, cos
        result = turn @ result
    return result


def sampling_grid(matrix: Tensor, shape: Sequence[int], displacement: Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The ``grid_sample`` grid (B, X, Y, Z, 3) that reads input point ``matrix @ p + displacement(p)``
    for each output voxel ``p`` (centred voxel coordinates, see the module docstring).

    matrix (B, 3, 3); displacement (B, 3, x, y, z) in voxels, components in (X, Y, Z) order, at the
    patch resolution or coarser (then upsampled trilinearly, corners aligned). ``grid_sample`` wants
    coordinates normalised to [-1, 1] (``align_corners=True``: -1 and 1 are the centres of the end
    voxels) and ordered (Z, Y, X). The affine part equals ``F.affine_grid`` with
    ``theta = P diag(1/h) matrix diag(h) P`` (h = half sides, P = axis reversal), built here as a
    sum of three broadcast terms, which is several times faster on the CPU.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape: expected 3 sides of at least 2 voxels, got {shape}")
    if matrix.dim() != 3 or matrix.shape[1:] != (3, 3):
        raise ValueError(f"matrix: expected shape (B, 3, 3), got {tuple(matrix.shape)}")
    device = matrix.device if device is None else device
    batch = matrix.shape[0]
    half = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64, device=matrix.device)
    # normalised coordinates u = p / h: input u_in = theta @ u_out, components reversed for grid_sample
    theta = (matrix.double() * half[None, None, :] / half[None, :, None]).flip(1).to(device=device, dtype=dtype)
    grid = 0
    for axis, n in enumerate(shape):
        view = [1, 1, 1, 1, 1]
        view[1 + axis] = n
        ramp = torch.linspace(-1, 1, n, dtype=dtype, device=device).view(view)
        grid = grid + ramp * theta[:, :, axis].view(batch, 1, 1, 1, 3)  # the last term is the full grid
    if displacement is not None:
        if displacement.dim() != 5 or displacement.shape[:2] != (batch, 3):
            raise ValueError(f"displacement: expected shape ({batch}, 3, x, y, z), got {tuple(displacement.shape)}")
        scale = (1 / half).flip(0).to(device=device, dtype=dtype)
        field = displacement.to(device=device, dtype=dtype).flip(1).permute(0, 2, 3, 4, 1) * scale
        grid.add_(_resize_linear(field, shape))
    return grid


def spatial_transform(image: Tensor, label: Tensor | None, matrix: Tensor,
                      displacement: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Resample every sample so output voxel ``p`` reads input point ``matrix @ p + displacement(p)``.

    image (B, C, X, Y, Z) float, trilinear; label (B, X, Y, Z) integer or None, nearest (values stay
    in the input set, plus 0 outside the patch). matrix (B, 3, 3) maps output to input coordinates:
    to rotate content by ``R`` pass ``R.mT``, to zoom it by ``s`` pass ``I / s``. displacement: see
    ``sampling_grid``. One ``grid_sample`` for the image and one for the label.
    """
    dtype = torch.float32 if image.dtype in (torch.float16, torch.bfloat16) else image.dtype  # exact grids
    grid = sampling_grid(matrix, image.shape[2:], displacement, dtype=dtype, device=image.device)
    source = image.to(dtype)
    if image.device.type == "cpu":  # the CPU kernel is ~1.6x faster reading channels-last
        source = source.contiguous(memory_format=torch.channels_last_3d)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    warped = warped.to(image.dtype).contiguous()
    if label is None:
        return warped, None
    labels = F.grid_sample(label.unsqueeze(1).to(grid.dtype), grid, mode="nearest",
                           padding_mode="zeros", align_corners=True)
    return warped, labels.squeeze(1).round().to(label.dtype)


def random_displacement(count: int, shape: Sequence[int], sigma: float, magnitude: Tensor,
                        generator: torch.Generator | None = None) -> Tensor:
    """Smooth random displacement fields in voxels, drawn on the CPU at low resolution.

    White noise on a grid spanning the patch with about two points per ``sigma`` voxels, blurred
    with a Gaussian of ``sigma`` voxels and scaled so that the longest displacement vector of field
    ``b`` is ``magnitude[b]`` voxels. Returns (count, 3, x, y, z) float64; ``sampling_grid``
    upsamples it trilinearly to the patch, which keeps that bound.
    """
    if len(shape) != 3 or min(shape) < 2 or not sigma > 0:
        raise ValueError(f"random_displacement: need 3 sides of at least 2 voxels and sigma > 0, "
                         f"got shape {tuple(shape)}, sigma {sigma}")
    coarse = [min(n, math.ceil((n - 1) / (sigma / 2)) + 1) for n in shape]
    sigmas = [sigma * (m - 1) / (n - 1) for n, m in zip(shape, coarse)]  # in coarse grid points
    radii = [math.ceil(TRUNCATE * s) for s in sigmas]
    field = torch.randn(count, 3, *[m + 2 * r for m, r in zip(coarse, radii)],
                        generator=generator, dtype=torch.float64)
    for axis, (s, m) in enumerate(zip(sigmas, coarse)):  # 'valid' separable blur as banded matrices
        kernel = gaussian_kernels(torch.tensor([s], dtype=torch.float64))[0]
        band = torch.zeros(m, m + kernel.numel() - 1, dtype=torch.float64)
        for row in range(m):
            band[row, row:row + kernel.numel()] = kernel
        field = _matmul_along(band, field, 2 + axis)
    peak = field.norm(dim=1).flatten(1).amax(dim=1).clamp_min(1e-12)
    return field * (magnitude.double() / peak).view(count, 1, 1, 1, 1)


def flip(image: Tensor, label: Tensor | None, axes: Tensor) -> tuple[Tensor, Tensor | None]:
    """Flip sample ``b`` along spatial axis ``a`` where ``axes[b, a]`` is True (CPU bool (B, 3)).

    image (B, C, X, Y, Z), label (B, X, Y, Z) or None; unflipped samples are untouched. One
    ``torch.flip`` per distinct combination of axes in the batch.
    """
    for pattern in axes.unique(dim=0):
        dims = pattern.nonzero().squeeze(1).tolist()
        if not dims:
            continue
        selected = (axes == pattern).all(dim=1)
        image = _map_samples(image, selected, lambda x, _: x.flip([d + 2 for d in dims]))
        if label is not None:
            label = _map_samples(label, selected, lambda x, _: x.flip([d + 1 for d in dims]))
    return image, label


# ----------------------------------------------------------------------------------------------
# Intensity transforms. Per-channel values have shape (B, C); images are (B, C, X, Y, Z).
# ----------------------------------------------------------------------------------------------
def gaussian_kernels(sigma: Tensor) -> Tensor:
    """Normalised 1-D Gaussians, one per sigma (voxels), cut at ``TRUNCATE`` sigmas of the largest:
    ``(N,)`` -> ``(N, 2r + 1)``. Sigma 0 gives the identity kernel."""
    radius = math.ceil(TRUNCATE * float(sigma.max())) if sigma.numel() else 0
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    kernels = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-6)[:, None]) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur(image: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of each channel with its own ``sigma`` (B, C) in voxels: one
    depthwise convolution per axis for the whole batch; borders repeat the edge voxel.
    Returns a new contiguous tensor (or ``image`` itself when every sigma is 0)."""
    kernels = gaussian_kernels(sigma.reshape(-1).double()).to(device=image.device, dtype=image.dtype)
    groups, size = kernels.shape
    if size == 1:
        return image
    if image.device.type == "cpu":
        return _blur_cpu(image, kernels)
    x = image.reshape(1, groups, *image.shape[2:])
    x = F.pad(x, [size // 2] * 6, mode="replicate")  # once: replicate padding commutes with the blur
    for axis in range(3):
        shape = [groups, 1, 1, 1, 1]
        shape[2 + axis] = size
        x = F.conv3d(x, kernels.reshape(shape), groups=groups)
    return x.reshape(image.shape)


def _blur_cpu(image: Tensor, kernels: Tensor) -> Tensor:
    """``gaussian_blur`` on the CPU with ``kernels`` (G = B * C, size). oneDNN's depthwise
    convolution is fast there only channels-last, and a conv3d with its kernel along X falls back
    to PyTorch's slow reference kernel (~10x slower than along Y or Z). So the volume is copied
    once into a replicate-padded channels-last buffer (X, Y, Z, G), and every pass is a conv2d on
    a channels-last view of it: X on (1, G, X, Y * Z), then Y and Z on (X, G, Y, Z)."""
    groups, size = kernels.shape
    x = _pad_channels_last(image.reshape(groups, *image.shape[2:]), size // 2)
    sides = x.shape[:3]
    along_rows, along_columns = kernels.reshape(groups, 1, size, 1), kernels.reshape(groups, 1, 1, size)
    x = F.conv2d(x.reshape(1, sides[0], sides[1] * sides[2], groups).permute(0, 3, 1, 2), along_rows,
                 groups=groups)  # X; the result's memory is (X, Y, Z, G) again
    x = x.permute(0, 2, 3, 1).reshape(-1, sides[1], sides[2], groups).permute(0, 3, 1, 2)  # (X, G, Y, Z)
    x = F.conv2d(F.conv2d(x, along_rows, groups=groups), along_columns, groups=groups)  # Y, then Z
    return x.permute(1, 0, 2, 3).reshape(image.shape).contiguous()


def _pad_channels_last(volumes: Tensor, radius: int) -> Tensor:
    """(G, X, Y, Z) -> (X + 2r, Y + 2r, Z + 2r, G), the borders repeating the edge voxels: one
    copy of the volumes, then the six border slabs filled from the edges."""
    sides = volumes.shape[1:]
    out = volumes.new_empty([n + 2 * radius for n in sides] + [volumes.shape[0]])
    inner = [slice(radius, radius + n) for n in sides]
    out[tuple(inner)] = volumes.permute(1, 2, 3, 0)
    for axis, n in enumerate(sides):  # axes before `axis` are already padded: fill them in full
        def part(index: slice) -> tuple:
            return (slice(None),) * axis + (index,) + tuple(inner[axis + 1:])
        out[part(slice(0, radius))] = out[part(slice(radius, radius + 1))]
        out[part(slice(radius + n, None))] = out[part(slice(radius + n - 1, radius + n))]
    return out


def add_gaussian_noise(image: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``image + std * N(0, 1)`` with ``std`` (B, C); the noise is drawn on the image's device."""
    noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
    return noise.mul_(_per_channel(std, image)).add_(image)


def gamma_transform(image: Tensor, gamma: Tensor, retain_stats: bool = True) -> Tensor:
    """nnU-Net gamma: each channel rescaled to [0, 1] by its min/max, raised to ``gamma`` (B, C)
    and mapped back to its range or, with ``retain_stats``, standardised back to its original mean
    and std. Constant channels are returned unchanged."""
    low, high = image.flatten(2).aminmax(dim=2)
    span = high - low
    inverse = 1 / span.clamp_min(_EPS)
    unit = torch.addcmul(_column(-low * inverse), image, _column(inverse)).clamp_(0, 1)
    powered = unit.pow_(_per_channel(gamma, image))
    factor, offset = span, low  # back to [low, high]
    if retain_stats:
        std, mean = _std_mean(image.flatten(2))
        new_std, new_mean = _std_mean(powered.flatten(2))
        varied = new_std > 0  # False only for constant channels, which keep [low, high] = low
        factor = torch.where(varied, std / new_std.clamp_min(_EPS), span)
        offset = torch.where(varied, mean - new_mean * factor, low)
    return powered.mul_(_column(factor)).add_(_column(offset))


# ----------------------------------------------------------------------------------------------
# The augmenter: parameters drawn on the CPU, applied batched on the tensors' device.
# ----------------------------------------------------------------------------------------------
@dataclass
class AugmentParams:
    """Random parameters of one batch, CPU tensors. Masks are (B,) bool: which samples get the
    transform; value tensors hold a draw for every sample, used only where the mask is True."""

    flips: Tensor  # (B, 3) bool: flip axis a of sample b
    spatial: Tensor  # (B,) bool: sample is resampled (rotation, zoom or elastic drawn)
    matrix: Tensor  # (B, 3, 3) float64 sampling matrix (output -> input coordinates), identity if not spatial
    displacement: Tensor | None  # (B, 3, x, y, z) coarse elastic field, voxels (zero if not elastic); None: none is
    noise: Tensor  # (B,) bool
    noise_std: Tensor  # (B, C)
    noise_seed: int  # seeds the device generator of the noise field
    blur: Tensor  # (B,) bool
    blur_sigma: Tensor  # (B, C) voxels
    scale: Tensor  # (B,) bool
    scale_factor: Tensor  # (B, C), 1 if not scale
    shift: Tensor  # (B,) bool
    shift_value: Tensor  # (B, C), 0 if not shift
    gamma: Tensor  # (B,) bool
    gamma_value: Tensor  # (B, C)


class Augmenter:
    """Random spatial, flip and intensity augmentation of a batch; see the module docstring.

    ``augment(image, label, generator)``: image (B, C, X, Y, Z) float, label (B, X, Y, Z) integer
    -> the same shapes, dtypes and device. The inputs are never modified; when a batch draws no
    transform at all they are returned as they are.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg  # its ranges were validated with the config (core.config.validate)

    def __call__(self, image: Tensor, label: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        _check_batch(image, label)
        params = self.sample(image.shape[0], image.shape[1], image.shape[2:], generator)
        return self.apply(image, label, params)

    def sample(self, batch: int, channels: int, shape: Sequence[int],
               generator: torch.Generator | None = None) -> AugmentParams:
        """Draw the parameters of a batch of ``channels`` x ``shape`` patches on the CPU from
        ``generator`` (None = global RNG)."""
        cfg = self.cfg

        def draw(prob: float) -> Tensor:
            return torch.rand(batch, generator=generator, dtype=torch.float64) < prob

        def uniform(low: float, high: float, *size: int) -> Tensor:
            return low + (high - low) * torch.rand(batch, *size, generator=generator, dtype=torch.float64)

        flips = torch.rand(batch, 3, generator=generator, dtype=torch.float64) < cfg.flip_prob
        rotate, scale, elastic = draw(cfg.rotate_prob), draw(cfg.scale_prob), draw(cfg.elastic_prob)
        limit = math.radians(cfg.rotate_range)
        angles = uniform(-limit, limit, 3) * rotate[:, None]
        zoom = torch.where(scale, uniform(*cfg.scale_range), 1.0)
        matrix = rotation_matrix(angles).mT / zoom.view(batch, 1, 1)
        magnitude = uniform(0.0, cfg.elastic_magnitude)  # peak displacement, voxels
        displacement = None
        if elastic.any():
            fields = random_displacement(int(elastic.sum()), shape, cfg.elastic_sigma, magnitude[elastic], generator)
            displacement = fields.new_zeros(batch, *fields.shape[1:])
            displacement[elastic] = fields

        noise, blur = draw(cfg.noise_prob), draw(cfg.blur_prob)
        scaled, shifted, gamma = draw(cfg.intensity_scale_prob), draw(cfg.intensity_shift_prob), draw(cfg.gamma_prob)
        noise_std = uniform(0.0, cfg.noise_std, channels)
        blur_sigma = uniform(*cfg.blur_sigma, channels)
        scale_factor = torch.where(scaled[:, None], uniform(*cfg.intensity_scale_range, channels), 1.0)
        shift_value = uniform(-cfg.intensity_shift_range, cfg.intensity_shift_range, channels) * shifted[:, None]
        gamma_value = uniform(*cfg.gamma_range, channels)
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return AugmentParams(flips=flips, spatial=rotate | scale | elastic, matrix=matrix,
                             displacement=displacement, noise=noise, noise_std=noise_std,
                             noise_seed=noise_seed, blur=blur, blur_sigma=blur_sigma, scale=scaled,
                             scale_factor=scale_factor, shift=shifted, shift_value=shift_value,
                             gamma=gamma, gamma_value=gamma_value)

    def apply(self, image: Tensor, label: Tensor, params: AugmentParams) -> tuple[Tensor, Tensor]:
        """Apply drawn ``params`` to image (B, C, X, Y, Z) and label (B, X, Y, Z) on their device."""
        image, label = self._spatial(image, label, params)
        image, label = flip(image, label, params.flips)
        if params.noise.any():
            noise_generator = torch.Generator(device=image.device).manual_seed(params.noise_seed)
            image = _map_samples(image, params.noise,
                                 lambda x, i: add_gaussian_noise(x, params.noise_std[i], noise_generator))
        image = _map_samples(image, params.blur, lambda x, i: gaussian_blur(x, params.blur_sigma[i]))
        image = _map_samples(image, params.scale | params.shift, lambda x, i: torch.addcmul(
            _per_channel(params.shift_value[i], x), x, _per_channel(params.scale_factor[i], x)))
        image = _map_samples(image, params.gamma, lambda x, i: gamma_transform(
            x, params.gamma_value[i], self.cfg.gamma_retain_stats))
        return image, label

    def _spatial(self, image: Tensor, label: Tensor, params: AugmentParams) -> tuple[Tensor, Tensor]:
        selected = params.spatial
        if not selected.any():
            return image, label
        index = selected.nonzero().squeeze(1)
        displacement = None if params.displacement is None else params.displacement[index]
        if bool(selected.all()):
            return spatial_transform(image, label, params.matrix, displacement)
        device_index = index.to(image.device)
        warped_image, warped_label = spatial_transform(
            image[device_index], label[device_index], params.matrix[index], displacement)
        return image.index_copy(0, device_index, warped_image), label.index_copy(0, device_index, warped_label)


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------
def _resize_linear(field: Tensor, shape: Sequence[int]) -> Tensor:
    """Trilinear resize of (B, x, y, z, K) to (B, X, Y, Z, K) with corners aligned (like
    ``F.interpolate(..., align_corners=True)`` on the channel-first layout), one matmul per axis
    whose output is already contiguous in the channel-last layout ``grid_sample`` wants."""
    for axis in (2, 1, 0):
        size, new_size = field.shape[1 + axis], int(shape[axis])
        if size != new_size:
            field = _matmul_along(_linear_weights(size, new_size, field), field, 1 + axis)
    return field


def _matmul_along(weights: Tensor, field: Tensor, dim: int) -> Tensor:
    """Apply the (new, old) matrix ``weights`` along dimension ``dim`` of ``field``; contiguous result."""
    if dim == field.dim() - 1:
        return field @ weights.mT
    lead, trail = field.shape[:dim], field.shape[dim + 1:]
    result = weights @ field.reshape(-1, field.shape[dim], math.prod(trail))
    return result.reshape(*lead, weights.shape[0], *trail)


def _linear_weights(size: int, new_size: int, like: Tensor) -> Tensor:
    """(new_size, size) matrix of linear interpolation weights, end points aligned."""
    position = torch.linspace(0, size - 1, new_size, dtype=torch.float64)
    left = position.floor().clamp(max=max(size - 2, 0)).long()
    right = (left + 1).clamp(max=size - 1)
    fraction = position - left
    weights = torch.zeros(new_size, size, dtype=torch.float64)
    rows = torch.arange(new_size)
    weights.index_put_((rows, left), 1 - fraction, accumulate=True)
    weights.index_put_((rows, right), fraction, accumulate=True)
    return weights.to(dtype=like.dtype, device=like.device)


def _map_samples(x: Tensor, selected: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``x`` (B, ...) with ``fn(x[index], index)`` in place of the samples where ``selected`` (CPU
    bool (B,)) is True; ``fn`` must not modify its input. No work when none is selected."""
    if not selected.any():
        return x
    index = selected.nonzero().squeeze(1)
    if bool(selected.all()):
        return fn(x, index)
    device_index = index.to(x.device)
    return x.index_copy(0, device_index, fn(x[device_index], index))


def _std_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.std_mean(x, dim=2)`` (sample std) of x (B, C, N), ~6x faster on the CPU, where that
    kernel is slow. Two passes: a first mean ``m``, then the deviations ``d = x - m`` summed and
    squared ``_STATS_CHUNK`` elements at a time (the temporaries stay in cache) into float64 sums;
    the sum of ``d`` corrects the rounding of ``m`` (corrected two-pass algorithm)."""
    if x.device.type != "cpu":
        return torch.std_mean(x, dim=2)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # float16 sums in float32
    mean = x.mean(dim=2, keepdim=True, dtype=work)
    sums = torch.zeros(x.shape[:2], dtype=torch.float64)
    squares = torch.zeros(x.shape[:2], dtype=torch.float64)
    step = max(1, _STATS_CHUNK // max(1, x.shape[0] * x.shape[1]))
    for start in range(0, x.shape[2], step):
        deviation = x[..., start:start + step].to(work) - mean
        sums += deviation.sum(dim=2)
        squares += deviation.mul_(deviation).sum(dim=2)
    count = x.shape[2]
    variance = (squares - sums * sums / count) / (count - 1)
    return variance.clamp_min(0).sqrt().to(x.dtype), (mean[..., 0] + sums / count).to(x.dtype)


def _per_channel(values: Tensor, image: Tensor) -> Tensor:
    """(B, C) CPU values -> (B, C, 1, 1, 1) on the image's device and dtype."""
    return values.to(device=image.device, dtype=image.dtype)[..., None, None, None]


def _column(values: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, 1, 1), to broadcast over the voxels."""
    return values[..., None, None, None]


def _check_batch(image: Tensor, label: Tensor) -> None:
    if image.dim() != 5 or not image.is_floating_point():
        raise ValueError(f"image: expected a float tensor (B, C, X, Y, Z), got {image.dtype} {tuple(image.shape)}")
    if label.dim() != 4 or label.is_floating_point() or label.dtype == torch.bool:
        raise ValueError(f"label: expected an integer tensor (B, X, Y, Z), got {label.dtype} {tuple(label.shape)}")
    if label.shape != (image.shape[0], *image.shape[2:]) or label.device != image.device:
        raise ValueError(f"label: shape {tuple(label.shape)} on {label.device} does not match "
                         f"image {tuple(image.shape)} on {image.device}")
