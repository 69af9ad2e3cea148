"""Training patches from the preprocessing cache, as a PyTorch ``DataLoader``.

    loader = build_train_loader(cache, split["train"], cfg, rank=rank, world_size=world_size,
                                device_type=device.type)
    for epoch in range(start_epoch, cfg.train.epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:  # {"image": (B, C, X, Y, Z) float, "label": (B, X, Y, Z) uint8}
            image = batch["image"].to(device, non_blocking=True).float()
            label = batch["label"].to(device, non_blocking=True).long()

Sample ``index`` of rank ``rank`` is a pure function of ``(train.seed, rank, index)``: its case,
whether tumour is forced into it, its position and (with ``augment.device = loader``) its
augmentation all come from ``np.random.default_rng([seed, rank, index])``. The batches are
therefore bit-identical for any ``num_workers`` (loader augmentation always runs on one torch
thread), different on every DDP rank, and a run resumed at epoch ``e`` (or mid-epoch with
``set_epoch(e, start)``) continues with exactly the samples it would have seen. Cases are
memory-mapped lazily inside each worker, so only the patches are read from disk.

Dtypes are kept small on the way to the device: labels are uint8 (the consumer converts them to
int64 where the loss needs it), and with ``augment.device = train`` the images keep the cache's
dtype (``data.cache_dtype``: float16 halves the bytes through the worker queues and to the GPU;
the consumer converts them to float32 on the device). With ``augment.device = loader`` the images
are augmented, and returned, as float32.
"""
from __future__ import annotations

import random
import signal
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from core.config import Config
from datasets.cache import CachedCase, CacheIndex
from datasets.sampling import choose_patch_start, extract_patch

OPEN_CASES = 64  # memory-mapped cases kept open per worker (each holds two file handles)
PREFETCH_FACTOR = 4  # batches prepared ahead by each worker


class PatchDataset(Dataset):
    """Random training patches; ``dataset[index]`` is ``{"image": (C, X, Y, Z), "label": uint8
    (X, Y, Z)}`` determined by ``(cfg.train.seed, rank, index)``. The image is float32 with
    ``cfg.augment.device == "loader"``, else of the cache's dtype (see the module docstring).

    A case is drawn uniformly from ``case_ids``; with probability ``cfg.data.foreground_fraction``
    the patch is forced to contain a tumour voxel (class-aware, see ``choose_patch_start``).
    With ``cfg.augment.device == "loader"`` the sample is augmented here, on the CPU.
    """

    def __init__(self, cache: CacheIndex, case_ids: list[str], cfg: Config, rank: int = 0):
        unknown = sorted(set(case_ids) - set(cache.case_ids))
        if not case_ids:
            raise ValueError("case_ids must not be empty")
        if unknown:
            raise ValueError(f"case_ids: {unknown[0]!r} is not in the cache {cache.folder}")
        patch = list(cfg.data.patch_size)  # data.* ranges: validated when the config was loaded
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.cache = cache
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch)
        self.foreground_fraction = float(cfg.data.foreground_fraction)
        self.seed = int(cfg.train.seed)
        self.rank = int(rank)
        self.length = cfg.train.epochs * samples_per_epoch(cfg)
        self.augmenter = None
        self.image_dtype = None  # the cache's: converted on the training device
        if cfg.augment.device == "loader":
            from datasets.augment import Augmenter
            self.augmenter = Augmenter(cfg.augment)
            self.image_dtype = np.float32
        self._open: OrderedDict[str, CachedCase] = OrderedDict()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        case = self._case(self.case_ids[int(rng.integers(len(self.case_ids)))])
        force_foreground = bool(rng.random() < self.foreground_fraction)
        start = choose_patch_start(case.classes.shape, self.patch_size, rng, case.class_locations,
                                   force_foreground)
        image = torch.from_numpy(extract_patch(case.images, start, self.patch_size, dtype=self.image_dtype))
        label = torch.from_numpy(extract_patch(case.classes, start, self.patch_size, dtype=np.uint8))
        if self.augmenter is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
            with one_torch_thread():  # as in the workers: same floats for any num_workers
                image, label = self.augmenter(image[None], label[None], generator)
            image, label = image[0].contiguous(), label[0].contiguous()
        return {"image": image, "label": label}

    def _case(self, case_id: str) -> CachedCase:
        """The memory-mapped case, opened on first use in this process (LRU of ``OPEN_CASES``)."""
        case = self._open.get(case_id)
        if case is None:
            case = self.cache.load(case_id, mmap=True)
            self._open[case_id] = case
            if len(self._open) > OPEN_CASES:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(case_id)
        return case

    def __getstate__(self) -> dict:
        # workers open their own memory maps; never send open ones to another process
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def samples_per_epoch(cfg: Config) -> int:
    """Samples one rank draws per epoch: ``train.iters_per_epoch * data.batch_size``."""
    return cfg.train.iters_per_epoch * cfg.data.batch_size


class EpochSampler(Sampler[int]):
    """Indices ``epoch * samples_per_epoch + i`` for ``i`` in ``[start, samples_per_epoch)``.

    Lives in the main process (works with persistent workers): call ``set_epoch`` before each
    epoch; ``start`` > 0 skips the samples of batches already used when resuming mid-epoch.
    """

    def __init__(self, samples_per_epoch: int, epoch: int = 0):
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.samples_per_epoch = int(samples_per_epoch)
        self.epoch = 0
        self.start = 0
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start < self.samples_per_epoch:
            raise ValueError(f"start must be in [0, {self.samples_per_epoch}), got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        first = self.epoch * self.samples_per_epoch
        return iter(range(first + self.start, first + self.samples_per_epoch))

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


def build_train_loader(cache: CacheIndex, case_ids: list[str], cfg: Config, rank: int = 0,
                       world_size: int = 1, device_type: str = "cpu") -> DataLoader:
    """DataLoader of ``PatchDataset`` batches for one (DDP) rank; its ``sampler`` is an
    ``EpochSampler`` (call ``loader.sampler.set_epoch(epoch)``).

    ``cfg.data.num_workers`` persistent workers, each single-threaded and seeded from
    ``(train.seed, rank)``; memory pinned when ``device_type == "cuda"``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    dataset = PatchDataset(cache, case_ids, cfg, rank)
    workers = cfg.data.num_workers
    extra = {"persistent_workers": True, "prefetch_factor": PREFETCH_FACTOR,
             "worker_init_fn": init_worker} if workers > 0 else {}
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=EpochSampler(samples_per_epoch(cfg)),
                      num_workers=workers, pin_memory=device_type == "cuda",
                      generator=torch.Generator().manual_seed(int(np.random.SeedSequence(
                          [cfg.train.seed, rank]).generate_state(1)[0])),
                      **extra)


@contextmanager
def one_torch_thread():
    """Run the block with one intra-op torch thread (DataLoader workers always do): float
    reductions then do not depend on the thread count."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def init_worker(worker_id: int) -> None:
    """DataLoader worker setup: one torch thread (the workers are the parallelism), the global
    numpy/random generators seeded from the worker's seed (base seed + worker id), and Ctrl-C
    ignored (the training process decides how to stop, and the workers must outlive that step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
