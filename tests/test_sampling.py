"""datasets/sampling.py: patch positions (random, forced foreground, class-aware) and extraction."""
import numpy as np
import pytest

from datasets.sampling import choose_patch_start, extract_patch, start_range


def contains(start, patch, voxel) -> bool:
    return all(s <= v < s + p for s, p, v in zip(start, patch, voxel))


@pytest.mark.parametrize("size,patch,expected", [(10, 4, (0, 6)), (4, 10, (-6, 0)), (5, 5, (0, 0))])
def test_start_range(size, patch, expected):
    assert start_range(size, patch) == expected


def test_random_patches_stay_inside_and_cover_the_range():
    rng = np.random.default_rng(0)
    starts = np.array([choose_patch_start((20, 30, 12), (8, 8, 8), rng, None, False) for _ in range(600)])
    assert starts.min(0).tolist() == [0, 0, 0]
    assert starts.max(0).tolist() == [12, 22, 4]


def test_patch_larger_than_volume_is_padded():
    rng = np.random.default_rng(1)
    volume = np.arange(1, 6 * 20 * 4 + 1, dtype=np.int32).reshape(6, 20, 4)
    for _ in range(50):
        start = choose_patch_start(volume.shape, (8, 8, 8), rng, None, False)
        assert -2 <= start[0] <= 0 and 0 <= start[1] <= 12 and -4 <= start[2] <= 0
        patch = extract_patch(volume, start, (8, 8, 8))
        assert patch.shape == (8, 8, 8)
        assert (patch > 0).sum() == 6 * 8 * 4  # the whole x and z extent, padded with zeros
        x0, z0 = -start[0], -start[2]
        np.testing.assert_array_equal(patch[x0:x0 + 6, :, z0:z0 + 4], volume[:, start[1]:start[1] + 8, :])


def test_extract_patch_hand_computed():
    array = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    out = extract_patch(array, (-2, 3, 4), (4, 4, 4), pad_value=-1)
    assert out.shape == (2, 4, 4, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 2:4, 0:3, 0:3], array[:, 0:2, 3:6, 4:7])
    inside = np.zeros((4, 4, 4), bool)
    inside[2:4, 0:3, 0:3] = True
    assert (out[:, ~inside] == -1).all()
    assert (extract_patch(array, (10, 0, 0), (3, 3, 3)) == 0).all()  # no overlap at all


class RecordingArray:
    """Array stand-in that records which region is read."""

    def __init__(self, array):
        self.array, self.keys = array, []
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype

    def __getitem__(self, key):
        self.keys.append(key)
        return self.array[key]


def test_extract_reads_only_the_patch(tmp_path):
    volume = np.random.default_rng(0).random((3, 40, 50, 30)).astype(np.float32)
    np.save(tmp_path / "v.npy", volume)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    recorder = RecordingArray(mapped)
    out = extract_patch(recorder, (5, 10, 20), (8, 8, 16))
    np.testing.assert_array_equal(out[:, :, :, :10], volume[:, 5:13, 10:18, 20:30])
    assert recorder.keys == [(slice(None), slice(5, 13), slice(10, 18), slice(20, 30))]
    assert not isinstance(out, np.memmap)


def _cube_locations(shape, lo, hi):
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    return grid.reshape(-1, 3).astype(np.int32)


def test_foreground_fraction():
    """2000 draws forcing foreground with probability 0.33: a 2^3 tumour at the centre of a 64^3
    volume is also hit by (17/49)^3 of the random 16^3 patches, so the expected share of patches
    containing tumour is 0.33 + 0.67 * (17/49)^3 = 0.358."""
    rng = np.random.default_rng(123)
    shape, patch = (64, 64, 64), (16, 16, 16)
    locations = {1: _cube_locations(shape, (31, 31, 31), (33, 33, 33)), 2: np.zeros((0, 3), np.int32)}
    hits = 0
    for _ in range(2000):
        start = choose_patch_start(shape, patch, rng, locations, bool(rng.random() < 0.33))
        hits += any(contains(start, patch, v) for v in locations[1])
    expected = 0.33 + 0.67 * (17 / 49) ** 3
    assert abs(hits / 2000 - expected) < 0.035


def test_forced_patch_contains_tumour_and_stays_inside():
    rng = np.random.default_rng(5)
    shape, patch = (40, 30, 20), (16, 16, 16)
    # tumour voxels at the volume's corners: the clip must keep them inside the patch
    locations = {1: np.array([[0, 0, 0]]), 2: np.array([[39, 29, 19]]), 3: np.array([[20, 0, 19]])}
    for _ in range(300):
        start = choose_patch_start(shape, patch, rng, locations, True)
        assert all(0 <= s <= n - p for s, n, p in zip(start, shape, patch))
        assert any(contains(start, patch, v[0]) for v in locations.values())


def test_forced_patch_in_small_volume_contains_the_voxel():
    rng = np.random.default_rng(6)
    locations = {3: np.array([[1, 2, 0]])}
    for _ in range(100):
        start = choose_patch_start((5, 6, 3), (8, 8, 8), rng, locations, True)
        assert contains(start, (8, 8, 8), (1, 2, 0))
        assert start[0] in range(-3, 1) and start[2] in range(-5, 1)


def test_class_aware_sampling_finds_small_et():
    """One ET voxel against thousands of NCR/ED voxels far away: a class is drawn first, so about a
    third of forced patches contain the ET voxel (voxel-proportional sampling would give ~0)."""
    rng = np.random.default_rng(7)
    shape, patch = (96, 96, 96), (8, 8, 8)
    locations = {1: _cube_locations(shape, (0, 0, 0), (10, 10, 10)),
                 2: _cube_locations(shape, (0, 0, 10), (20, 20, 30)),
                 3: np.array([[90, 90, 90]], np.int32)}
    with_et = sum(contains(choose_patch_start(shape, patch, rng, locations, True), patch, (90, 90, 90))
                  for _ in range(1500))
    assert abs(with_et / 1500 - 1 / 3) < 0.05


def test_absent_classes_are_not_chosen():
    rng = np.random.default_rng(8)
    locations = {1: np.zeros((0, 3), np.int32), 2: np.zeros((0, 3), np.int32), 3: np.array([[30, 30, 30]])}
    for _ in range(100):
        assert contains(choose_patch_start((64, 64, 64), (8, 8, 8), rng, locations, True), (8, 8, 8), (30, 30, 30))


def test_forced_without_any_tumour_falls_back_to_random():
    rng = np.random.default_rng(9)
    empty = {c: np.zeros((0, 3), np.int32) for c in (1, 2, 3)}
    starts = [choose_patch_start((20, 20, 20), (8, 8, 8), rng, empty, True) for _ in range(200)]
    assert all(0 <= s <= 12 for start in starts for s in start)
    assert len(set(starts)) > 150


# ---------------------------------------------------------------------------------------------
# extract_patch: the output dtype (cast while copying) and the padding.
# ---------------------------------------------------------------------------------------------
def reference_patch(array, start, patch, pad_value, dtype):
    """Voxel by voxel: the array's value where the patch voxel is inside it, else ``pad_value``."""
    out = np.zeros(array.shape[:-3] + tuple(patch), dtype=dtype)
    for i, j, k in np.ndindex(*patch):
        x, y, z = start[0] + i, start[1] + j, start[2] + k
        inside = all(0 <= v < n for v, n in zip((x, y, z), array.shape[-3:]))
        out[..., i, j, k] = array[..., x, y, z] if inside else pad_value
    return out


POSITIONS = {
    "inside": (1, 0, 2),
    "partly outside, low side": (-2, 1, -1),
    "partly outside, high side": (3, 2, 4),
    "larger than the array": (-1, -1, -1),
    "fully outside": (1, 9, 0),
    "fully outside, negative": (-4, 0, 0),
}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("source,target", [
    (np.float16, np.float32), (np.float32, np.float16), (np.float32, np.float32), (np.float16, None),
    (np.uint8, np.uint8), (np.uint8, np.int64), (np.float32, np.float64), (">f2", np.float32),
])
def test_extract_patch_dtype_and_padding(position, source, target):
    array = np.arange(2 * 5 * 4 * 6).reshape(2, 5, 4, 6) % 97
    if np.dtype(source).kind == "f":
        array = array / 8 - 3  # fractions exact in float16
    array = array.astype(source)
    assert array.dtype == np.dtype(source)
    patch = (4, 3, 5) if position != "larger than the array" else (8, 7, 9)
    start = POSITIONS[position]
    out = extract_patch(array, start, patch, pad_value=7, dtype=target)
    expected = reference_patch(array, start, patch, 7, target or source)
    assert out.dtype == np.dtype(target or source) and out.shape == (2, *patch)
    np.testing.assert_array_equal(out, expected)


def test_extract_patch_hand_computed_cast():
    """A 1 x 2 x 2 x 2 float16 volume, patch (2, 2, 3) starting at (1, -1, 0) as float32: the
    x = 1 slab, shifted by one along y, z = 2 outside; padding -1."""
    volume = np.array([[[[0.5, 1.5], [2.5, 3.5]], [[4.5, 5.5], [6.5, 7.5]]]], dtype=np.float16)
    out = extract_patch(volume, (1, -1, 0), (2, 2, 3), pad_value=-1, dtype=np.float32)
    expected = np.array([[[[-1, -1, -1], [4.5, 5.5, -1]],
                          [[-1, -1, -1], [-1, -1, -1]]]], dtype=np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("source,target", [(np.float16, np.float32), (np.float32, np.float16)])
def test_extract_patch_float_casts_match_numpy(source, target):
    """Float casts go through torch: same values as numpy's cast, special values included
    (float16 subnormals, rounding to nearest even, overflow to inf, nan)."""
    with np.errstate(over="ignore"):  # the overflows to inf are wanted
        values = np.array([0.1, -2.5e-7, 6e-8, 1 / 3, 65519.0, 65520.0, 7e4, -np.inf, np.nan, 0.0,
                           -0.0, 2049.0, 2051.0, 1e-3, -1e5, 3.14159], dtype=np.float32).astype(source)
        array = np.resize(values, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4)
        expected = array[:, :, :3, 1:].astype(target)
    out = extract_patch(array, (0, -1, 1), (4, 4, 4), dtype=target)
    np.testing.assert_array_equal(out[:, :, 1:, :3], expected)
    assert np.array_equal(np.signbit(out[:, :, 1:, :3]), np.signbit(expected))
    assert (out[:, :, 0] == 0).all() and (out[..., 3] == 0).all()


def test_extract_patch_with_a_cast_reads_only_the_patch():
    volume = np.random.default_rng(1).random((2, 20, 20, 20)).astype(np.float16)
    recorder = RecordingArray(volume)
    out = extract_patch(recorder, (15, -3, 4), (8, 8, 8), dtype=np.float32)
    assert recorder.keys == [(slice(None), slice(15, 20), slice(0, 5), slice(4, 12))]
    np.testing.assert_array_equal(out[:, :5, 3:], volume[:, 15:, :5, 4:12].astype(np.float32))
    assert (out[:, 5:] == 0).all() and (out[:, :, :3] == 0).all()
