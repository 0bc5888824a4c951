"""ImageNet-style input: examples streamed from a tfds data source, preprocessed on the host.

ImageNet does not fit in accelerator memory the way CIFAR does, and its images differ in size,
so its splits are ``Stream``s: random access into ``tfds.data_source`` (array_record files
prepared elsewhere, e.g. ``tfds build imagenet2012 --file_format=array_record`` with the manual
download), read through grain (``grain.MapDataset``: each example decoded and preprocessed on a
pool of threads, in order, two batches ahead of the training step).

Preprocessing, as torchvision's reference recipe (what pretrained torchvision weights expect):
  train  random-resized crop to ``size`` (scale 0.08-1, aspect ratio 3/4-4/3, 10 tries, then a
         centre crop), horizontal flip with probability 1/2;
  eval   resize the shorter side to ``resize`` (256 for 224), centre crop ``size``.
Resizing is PIL's bilinear filter with antialiasing. Images leave here as uint8; the step scales
them to [0, 1] and the ResNet normalises them with ImageNet's mean and std.

Every random choice is a function of (seed, epoch, step, position in the batch), so a resumed
run reads exactly the batches the interrupted one would have read: the checkpoint's step is the
whole input state (grain's own iterator checkpoints are not needed), and each process of a
multi-host run reads its slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image

from train.data.batching import pad_batch
from train.errors import UserError

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((width, height), Image.BILINEAR, reducing_gap=None))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """torchvision's RandomResizedCrop(size) (default scale and ratio) on an (H, W, 3) image."""
    h, w = image.shape[:2]
    area = h * w
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return _resize(image[top : top + ch, left : left + cw], size, size)
    ratio = w / h  # fallback: the largest centre crop within the allowed ratios
    if ratio < RATIO[0]:
        cw, ch = w, round(w / RATIO[0])
    elif ratio > RATIO[1]:
        ch, cw = h, round(h * RATIO[1])
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(image[top : top + ch, left : left + cw], size, size)


def resize_center_crop(image: np.ndarray, size: int, resize: int) -> np.ndarray:
    """torchvision's Resize(resize) (shorter side) then CenterCrop(size)."""
    h, w = image.shape[:2]
    if h <= w:
        nh, nw = resize, int(resize * w / h)
    else:
        nh, nw = int(resize * h / w), resize
    image = _resize(image, nh, nw)
    top = round((nh - size) / 2.0)
    left = round((nw - size) / 2.0)
    if top < 0 or left < 0:
        raise ValueError(f"resize {resize} is smaller than the crop {size}")
    return image[top : top + size, left : left + size]


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
    """One split of a tfds data source, read on demand.

    Attributes:
      source: a tfds data source (random access: ``len``, ``[i]``).
      indices: the examples of ``source`` that form this split (a validation split carved from
        the training set is a subset of its indices).
      size: the crop size (224); resize: the eval resize of the shorter side (256).
      num_classes: labels must lie in [0, num_classes).
      name: 'dataset/split' for error messages; workers: reading threads.
    """

    source: object
    indices: np.ndarray
    size: int
    resize: int
    num_classes: int
    name: str
    workers: int = 8

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, n: int) -> Stream:
        return dataclasses.replace(self, indices=self.indices[:n]) if n else self

    def subset(self, positions: np.ndarray) -> Stream:
        return dataclasses.replace(self, indices=self.indices[positions])

    def _example(self, index: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.int32]:
        """Example ``index`` of the source, preprocessed: training crop and flip drawn from
        ``rng``, or the eval resize and centre crop when ``rng`` is None."""
        record = self.source[index]
        image, label = np.asarray(record["image"]), int(record["label"])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise UserError(f"{self.name} example {index}: image of shape {image.shape}, not RGB")
        if not 0 <= label < self.num_classes:
            raise UserError(
                f"{self.name} example {index}: label {label} is outside "
                f"[0, {self.num_classes}) (config.dataset.num_classes)"
            )
        if rng is None:
            image = resize_center_crop(image, self.size, self.resize)
        else:
            image = random_resized_crop(image, rng, self.size)
            if rng.random() < 0.5:
                image = image[:, ::-1]
        return np.ascontiguousarray(image), np.int32(label)

    def _batches(self, count: int, read, batch: int, drop_remainder: bool):
        """grain: ``read(e)`` for e in range(count), stacked into (images, labels) batches of
        ``batch``; each batch is read by one of ``workers`` threads, in order, at most
        2 x ``workers`` batches ahead."""
        import grain

        def read_batch(b):
            rows = [read(e) for e in range(b * batch, min((b + 1) * batch, count))]
            return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

        batches = count // batch if drop_remainder else -(-count // batch)
        options = grain.ReadOptions(num_threads=self.workers, prefetch_buffer_size=2 * self.workers)
        return grain.MapDataset.range(batches).map(read_batch).to_iter_dataset(options)

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        epoch: int,
        augment: bool = True,
        shard=(0, 1),
        start: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The epoch's full batches in a random order that depends on (seed, epoch) only.
        ``augment=False`` gives the eval preprocessing. ``shard=(k, n)``: only the k-th of n
        equal slices of every batch (process k of n reads its part; the crops are those of
        the whole batch: the j-th image of step i draws from (seed, epoch, i, j)). ``start``:
        resume at that step of the epoch."""
        k, n = shard
        local = batch_size // n
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        steps = np.arange(start, len(self) // batch_size)
        columns = k * local + np.arange(local)  # this process's places in every global batch
        positions = order[steps[:, None] * batch_size + columns[None, :]].ravel()

        def read(e):
            step, column = steps[e // local], columns[e % local]
            rng = np.random.default_rng([seed, epoch, step, column]) if augment else None
            return self._example(int(self.indices[positions[e]]), rng)

        return iter(self._batches(len(positions), read, local, drop_remainder=True))

    def eval_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every example once, in order; the last batch is padded to ``batch_size`` with copies
        of its last image labelled -1 (counted for nothing by the eval step)."""

        def pad(batch):
            return pad_batch(*batch, batch_size)

        def read(e):
            return self._example(int(self.indices[e]), None)

        return iter(self._batches(len(self), read, batch_size, drop_remainder=False).map(pad))

    def head(self, n: int) -> np.ndarray:
        """The first ``n`` images, eval-preprocessed."""
        return np.stack([self._example(int(i), None)[0] for i in self.indices[:n]])
