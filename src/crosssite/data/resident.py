"""Device-resident batches: every slice of a run decoded once, kept on the accelerator as uint8, and augmented there.

On a GPU the CPU input pipeline (a worker per core cropping, flipping and normalising one numpy slice at a time)
can fall behind the step. `ResidentLoader` removes it: the framed uint8 slices of a `SliceDataset` are stacked
into one ``(N, S, S)`` tensor on the device (3227 slices of both real sites at 256 x 256: 211 MB), and each batch
is cut out of it there:

* training: per slice a random ``image_size`` square of the framed slice and random vertical / horizontal flips
  (`TrainTransform.crop`'s distribution), done for the whole batch as one gather, then the affine normalisation;
* evaluation (and BN recalibration): the evaluation view of every slice (`EvalTransform.crop`, computed once on
  the CPU, so it is bit-identical to the CPU loader's), normalised on the device.

A batch has the CPU loader's keys (``image`` float (B, 3, H, W) on the device, ``label``, ``site``, ``index``,
``site_runs``) and, for training, the same multi-site sampler, so batches hold the same slices in the same
order as `train_loader`'s; only the crop and flip draws differ. They come from a generator on the device seeded
by ``(seed, epoch, step)``, so a resumed run draws exactly what an uninterrupted one would.

Only square frames (``"pad"``, ``"resize"``) stack; scanner-style augmentation runs on numpy slices and stays on
the CPU loader (`resident_reason` says why a run cannot use this path).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from crosssite.data.loaders import SliceDataset, site_runs
from crosssite.data.sampler import MultiSiteBatchSampler
from crosssite.data.transforms import EvalTransform, TrainTransform

__all__ = ["ResidentLoader", "resident_reason"]


def resident_reason(frame: str, scanner: bool) -> str | None:
    """Why a run with this ``frame`` (and ``scanner``-style augmentation or not) cannot keep its slices on the
    device; None when it can."""
    if frame == "crop":
        return "frame 'crop' keeps each slice's aspect ratio, so the framed slices do not stack into one tensor"
    if scanner:
        return ("scanner-style and hospital augmentation and RandConv (augment_scanner, augment_hospital, "
                "augment_randconv > 0) run on the slices in the loader's workers, on the CPU")
    return None


class ResidentLoader:
    """Batches of ``dataset`` with the pixels on ``device`` (see the module).

    Args:
        dataset: the run's slices (its cache frames them; its transform is not used).
        device: where the slices are kept and the batches are made.
        view: ``TrainTransform`` (random crop and flips on the device) or ``EvalTransform`` (the fixed view).
        batch_sampler: the training sampler (``loader.batch_sampler.set_epoch(e)`` before each epoch, as for a
            `DataLoader`); without it, batches of ``batch_size`` in order.
        seed: seeds the crop and flip draws, with the epoch and the step.
    """

    def __init__(
        self,
        dataset: SliceDataset,
        device: torch.device,
        view: TrainTransform | EvalTransform,
        *,
        batch_sampler: MultiSiteBatchSampler | None = None,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        reason = resident_reason(view.frame, getattr(view, "scanner", None) is not None)
        if reason:
            raise ValueError(f"slices cannot stay on the device: {reason}")
        self.dataset, self.device, self.batch_sampler = dataset, device, batch_sampler
        self.batch_size, self.seed = batch_size, seed
        self.train = isinstance(view, TrainTransform)
        self.image_size = view.image_size
        self.flips = self.train and view.flips
        cache = dataset.cache
        framed = (cache[int(slot)] for slot in dataset.slot_of_item)
        pixels = [np.asarray(x) for x in framed] if self.train else [view.crop(x) for x in framed]
        side = pixels[0].shape[0] if pixels else self.image_size
        stack = np.stack(pixels) if pixels else np.zeros((0, side, side), np.uint8)
        self.pixels = torch.from_numpy(stack).to(device)  # (N, S, S) uint8
        norm = view.normalise
        self.scale = torch.tensor(norm.scale, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.bias = torch.tensor(norm.bias, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.labels = torch.from_numpy(dataset.label_of_item).to(device)
        self.sites = torch.from_numpy(dataset.site_of_item).to(device)
        self.indices = torch.from_numpy(dataset.index_of_item).to(device)
        self.generator = torch.Generator(device=device)

    @classmethod
    def from_loader(cls, loader: DataLoader, device: torch.device, seed: int = 0) -> ResidentLoader:
        """The device-resident twin of a `train_loader` / `eval_loader`: its dataset, its view (the dataset's
        transform), and its multi-site sampler or its batch size."""
        sampler = loader.batch_sampler
        if isinstance(sampler, MultiSiteBatchSampler):
            return cls(loader.dataset, device, loader.dataset.transform, batch_sampler=sampler, seed=seed)
        return cls(loader.dataset, device, loader.dataset.transform, batch_size=loader.batch_size, seed=seed)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        return -(-len(self.dataset) // self.batch_size)

    def _batches(self) -> Iterator[Sequence[int]]:
        if self.batch_sampler is not None:
            yield from self.batch_sampler
        else:
            for start in range(0, len(self.dataset), self.batch_size):
                yield range(start, min(start + self.batch_size, len(self.dataset)))

    def __iter__(self) -> Iterator[dict]:
        sampler = self.batch_sampler
        start, epoch = (sampler.start_step, sampler.epoch) if sampler is not None else (0, 0)
        for step, items in enumerate(self._batches(), start):
            items_np = np.asarray(items, dtype=np.int64)
            rows = torch.from_numpy(items_np).to(self.device)
            grey = self.crop(rows, epoch, step) if self.train else self.pixels.index_select(0, rows)
            yield {
                "image": self.normalise(grey),
                "label": self.labels.index_select(0, rows),
                "site": self.sites.index_select(0, rows),
                "index": self.indices.index_select(0, rows),
                "site_runs": site_runs(self.dataset.site_of_item[items_np].tolist()),
            }

    def crop(self, rows: Tensor, epoch: int, step: int) -> Tensor:
        """uint8 (B, s, s): for each slice a random ``s = image_size`` square, flipped at random (one gather), drawn
        from ``(seed, epoch, step)``."""
        self.generator.manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{step}".encode()))
        b, side, s = len(rows), self.pixels.shape[1], self.image_size
        offsets = torch.randint(side - s + 1, (2, b, 1), device=self.device, generator=self.generator)
        ramp = torch.arange(s, device=self.device).expand(b, s)
        if self.flips:
            flip = torch.rand((2, b, 1), device=self.device, generator=self.generator) < 0.5
            ramps = torch.where(flip, s - 1 - ramp, ramp)
        else:
            ramps = torch.stack([ramp, ramp])
        y, x = offsets + ramps  # (B, s) each: the rows and the columns each output pixel reads
        return self.pixels[rows.view(b, 1, 1), y.view(b, s, 1), x.view(b, 1, s)]

    def normalise(self, grey: Tensor) -> Tensor:
        """uint8 (B, H, W) -> float32 (B, 3, H, W), channel c mapped to ``(x / 255 - mean[c]) / std[c]``."""
        return torch.addcmul(self.bias, grey.unsqueeze(1).float(), self.scale)
