"""datasets/loader.py: batch shapes, determinism across workers/ranks/epochs, augmentation in the
loader, lazy per-process memory maps."""
import pickle

import numpy as np
import pytest
import torch

import datasets.loader as loader_module
from core.config import load_config
from core.errors import UserError
from datasets.cache import prepare_cache
from datasets.loader import EpochSampler, PatchDataset, build_train_loader, init_worker
from datasets.synthetic import generate_dataset

NO_AUGMENT = ["augment.device=train"]
FLIPS_ONLY = ["augment.flip_prob=1.0", "augment.rotate_prob=0", "augment.scale_prob=0",
              "augment.intensity_scale_prob=0", "augment.intensity_shift_prob=0", "augment.gamma_prob=0",
              "augment.noise_prob=0", "augment.blur_prob=0", "augment.elastic_prob=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    generate_dataset(root / "data", 3, seed=5, shape=(32, 32, 24))
    cfg = make_cfg(root)
    return prepare_cache(cfg.data, show_progress=False)


def make_cfg(root_or_cache, *overrides):
    folder = root_or_cache if not hasattr(root_or_cache, "folder") else root_or_cache.folder.parents[1]
    return load_config(None, [f"data.root={folder / 'data'}", f"data.cache_dir={folder / 'cache'}",
                              "data.cache_workers=1", "data.patch_size=[16,16,16]", "data.batch_size=2",
                              "data.num_workers=0", "train.iters_per_epoch=3", "train.epochs=4",
                              "train.seed=11", *overrides])


def epochs(loader, which):
    out = []
    for epoch in which:
        loader.sampler.set_epoch(epoch)
        out.append([(b["image"].clone(), b["label"].clone()) for b in loader])
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for (ia, la), (ib, lb) in zip(epoch_a, epoch_b):
            assert torch.equal(ia, ib) and torch.equal(la, lb)


@pytest.fixture(scope="module")
def half_cache(cache):
    """The same cases cached as float16 (a sibling cache folder)."""
    return prepare_cache(make_cfg(cache, "data.cache_dtype=float16").data, show_progress=False)


@pytest.mark.parametrize("cache_dtype,augment,image_dtype", [
    ("float32", "train", torch.float32), ("float32", "loader", torch.float32),
    ("float16", "train", torch.float16), ("float16", "loader", torch.float32),
])
def test_batch_shapes_and_dtypes(cache, half_cache, cache_dtype, augment, image_dtype):
    """Labels leave as uint8; images keep the cache's dtype unless augmented in the loader."""
    source = half_cache if cache_dtype == "float16" else cache
    cfg = make_cfg(source, f"data.cache_dtype={cache_dtype}", f"augment.device={augment}")
    loader = build_train_loader(source, source.case_ids, cfg)
    batches = list(loader)
    assert len(batches) == 3 and len(loader) == 3
    for batch in batches:
        assert batch["image"].shape == (2, 4, 16, 16, 16) and batch["image"].dtype == image_dtype
        assert batch["label"].shape == (2, 16, 16, 16) and batch["label"].dtype == torch.uint8
        assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}


def test_float16_patches_are_the_cached_values(cache, half_cache):
    """float16 cache: the patch (train) is the cache's values, and the same patch cast to float32
    when augmented in the loader (flips only, probability 1); labels equal the float32 cache's."""
    plain = PatchDataset(half_cache, half_cache.case_ids, make_cfg(half_cache, "data.cache_dtype=float16",
                                                                   *NO_AUGMENT))
    flipped = PatchDataset(half_cache, half_cache.case_ids, make_cfg(half_cache, "data.cache_dtype=float16",
                                                                     "augment.device=loader", *FLIPS_ONLY))
    full = PatchDataset(cache, cache.case_ids, make_cfg(cache, *NO_AUGMENT))
    for index in range(4):
        p, f, reference = plain[index], flipped[index], full[index]
        assert p["image"].dtype == torch.float16 and f["image"].dtype == torch.float32
        assert torch.equal(f["image"], p["image"].float().flip(1, 2, 3))
        assert torch.equal(p["image"], reference["image"].half())  # same patch as from the float32 cache
        assert torch.equal(p["label"], reference["label"]) and torch.equal(f["label"], p["label"].flip(0, 1, 2))


@pytest.mark.parametrize("augment,cache_dtype", [("train", "float32"), ("loader", "float32"), ("train", "float16")])
def test_same_batches_for_any_number_of_workers(cache, half_cache, augment, cache_dtype):
    source = half_cache if cache_dtype == "float16" else cache
    runs = []
    for workers in (0, 2):
        cfg = make_cfg(source, f"augment.device={augment}", f"data.num_workers={workers}",
                       f"data.cache_dtype={cache_dtype}")
        runs.append(epochs(build_train_loader(source, source.case_ids, cfg), [0, 1]))
    assert_same(*runs)


def test_epochs_ranks_and_resume(cache):
    cfg = make_cfg(cache, *NO_AUGMENT)
    first = epochs(build_train_loader(cache, cache.case_ids, cfg), [0, 1, 2])
    resumed = epochs(build_train_loader(cache, cache.case_ids, cfg), [1, 2])
    assert_same(first[1:], resumed)
    assert not torch.equal(first[0][0][0], first[1][0][0])  # another epoch, other patches
    other_rank = epochs(build_train_loader(cache, cache.case_ids, cfg, rank=1, world_size=2), [0])
    assert not torch.equal(first[0][0][0], other_rank[0][0][0])
    other_seed = epochs(build_train_loader(cache, cache.case_ids, make_cfg(cache, *NO_AUGMENT, "train.seed=12")), [0])
    assert not torch.equal(first[0][0][0], other_seed[0][0][0])


def test_epoch_sampler():
    sampler = EpochSampler(6)
    assert list(sampler) == [0, 1, 2, 3, 4, 5] and len(sampler) == 6
    sampler.set_epoch(2)
    assert list(sampler) == list(range(12, 18))
    sampler.set_epoch(2, start=4)  # resume after two batches of 2
    assert list(sampler) == [16, 17] and len(sampler) == 2
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(0, start=6)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        EpochSampler(0)


def test_foreground_is_forced(cache):
    def tumour_share(fraction):
        cfg = make_cfg(cache, *NO_AUGMENT, "data.patch_size=[6,6,6]", f"data.foreground_fraction={fraction}")
        dataset = PatchDataset(cache, cache.case_ids, cfg)
        return np.mean([bool((dataset[i]["label"] > 0).any()) for i in range(300)])

    always, never = tumour_share(1.0), tumour_share(0.0)
    assert always == 1.0
    assert never < 0.6
    assert never < tumour_share(0.33) < always


def test_sample_depends_only_on_seed_rank_index(cache):
    cfg = make_cfg(cache, "augment.device=loader")
    a, b = PatchDataset(cache, cache.case_ids, cfg), PatchDataset(cache, cache.case_ids, cfg)
    for index in (5, 0, 5, 123456):
        assert torch.equal(a[index]["image"], b[index]["image"])
        assert torch.equal(a[index]["label"], b[index]["label"])
    assert not torch.equal(a[1]["image"], a[2]["image"])


def test_loader_augmentation_is_applied(cache):
    """With only flips (probability 1), the augmented sample is the plain sample flipped on all axes."""
    plain = PatchDataset(cache, cache.case_ids, make_cfg(cache, *NO_AUGMENT))
    flipped = PatchDataset(cache, cache.case_ids, make_cfg(cache, "augment.device=loader", *FLIPS_ONLY))
    for index in range(4):
        p, f = plain[index], flipped[index]
        assert torch.equal(f["image"], p["image"].flip(1, 2, 3))
        assert torch.equal(f["label"], p["label"].flip(0, 1, 2))
        assert f["image"].is_contiguous() and f["label"].is_contiguous() and f["label"].dtype == torch.uint8


def test_patch_larger_than_case_is_padded(cache):
    cfg = make_cfg(cache, *NO_AUGMENT, "data.patch_size=[40,40,40]")
    sample = PatchDataset(cache, cache.case_ids, cfg)[0]
    assert sample["image"].shape == (4, 40, 40, 40)
    case = cache.load(cache.case_ids[0])
    assert (sample["image"] != 0).sum() <= case.images[0].size * 4
    assert (sample["image"][:, 0] == 0).all() or (sample["image"][:, -1] == 0).all()


def test_cases_are_opened_lazily_and_not_pickled(cache, monkeypatch):
    dataset = PatchDataset(cache, cache.case_ids, make_cfg(cache, *NO_AUGMENT))
    assert len(dataset._open) == 0
    expected = dataset[3]
    assert len(dataset._open) == 1
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(copy._open) == 0
    assert torch.equal(copy[3]["image"], expected["image"])
    monkeypatch.setattr(loader_module, "OPEN_CASES", 1)
    for index in range(20):
        dataset[index]
        assert len(dataset._open) <= 1


def test_loader_settings(cache):
    cfg = make_cfg(cache, *NO_AUGMENT, "data.num_workers=2")
    loader = build_train_loader(cache, cache.case_ids, cfg, device_type="cuda")
    assert loader.pin_memory and loader.persistent_workers and loader.num_workers == 2
    assert isinstance(loader.sampler, EpochSampler) and loader.batch_size == 2
    assert not build_train_loader(cache, cache.case_ids, make_cfg(cache, *NO_AUGMENT)).pin_memory


def test_init_worker_uses_one_thread():
    threads = torch.get_num_threads()
    try:
        init_worker(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("overrides,kwargs,error,match", [
    ([], {"rank": 2, "world_size": 2}, ValueError, "rank"),
    (["data.patch_size=[16,16]"], {}, UserError, "data.patch_size"),
    (["data.foreground_fraction=1.5"], {}, UserError, "data.foreground_fraction"),
    (["data.batch_size=0"], {}, UserError, "data.batch_size"),
    (["data.num_workers=-1"], {}, UserError, "data.num_workers"),
])
def test_bad_settings(cache, overrides, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_train_loader(cache, cache.case_ids, make_cfg(cache, *NO_AUGMENT, *overrides), **kwargs)


def test_unknown_case_id(cache):
    with pytest.raises(ValueError, match="not in the cache"):
        PatchDataset(cache, ["BraTS2021_99999"], make_cfg(cache, *NO_AUGMENT))
