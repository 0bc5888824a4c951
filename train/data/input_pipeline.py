"""Datasets as in-memory uint8 arrays: tfds data sources, or the embedded generated dataset.

CIFAR-sized datasets fit in accelerator memory, so the training loop keeps them there and picks,
augments and normalises batches inside the compiled step (``train.data.augment``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os

import ml_collections
import numpy as np

from train.data.batching import pad_batch
from train.errors import UserError


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n]) if n else self

    def head(self, n: int) -> np.ndarray:
        return self.images[:n]

    def eval_batches(self, batch_size: int):
        """Every example once, in order, in batches of ``batch_size`` (the last one padded)."""
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield pad_batch(self.images[start:end], self.labels[start:end], batch_size)


@dataclasses.dataclass(frozen=True)
class OnDevice:
    """An evaluation split held on the device(s) as its padded batches: placed once, and of one
    shape whichever the split, so that one compiled evaluation step serves validation and test."""

    host: Split
    batch_size: int
    batches: tuple  # ((images, labels), ...) on the device(s)

    def __len__(self) -> int:
        return len(self.host)

    def head(self, n: int) -> np.ndarray:
        return self.host.head(n)

    def eval_batches(self, batch_size: int):
        if batch_size != self.batch_size:
            raise ValueError(f"placed in batches of {self.batch_size}, asked for {batch_size}")
        return iter(self.batches)


def on_device(split: Split, batch_size: int, put) -> OnDevice:
    """``split`` in evaluation batches placed by ``put`` (a Placement's replicate)."""
    return OnDevice(split, batch_size, tuple(put(b) for b in split.eval_batches(batch_size)))


@dataclasses.dataclass(frozen=True)
class Data:
    train: Split
    validation: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]


# --- the embedded dataset: coloured shapes on noisy backgrounds, generated here ------------

EMBEDDED_CLASSES = (
    "disk", "square", "diamond", "ring", "cross",
    "hbar", "vbar", "triangle", "x", "two_dots",
)  # fmt: skip


def _shape_mask(label: int, dx, dy, r):
    """Where the shape of class ``label`` covers the pixels at offsets (dx, dy) from its centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    dist2 = dx**2 + dy**2
    if label == 0:
        return dist2 < r**2
    if label == 1:
        return np.maximum(ax, ay) < r
    if label == 2:
        return ax + ay < r
    if label == 3:
        return (dist2 < r**2) & (dist2 > (0.55 * r) ** 2)
    if label == 4:
        return ((ax < r / 3) & (ay < r)) | ((ay < r / 3) & (ax < r))
    if label == 5:
        return (ay < r / 3) & (ax < r)
    if label == 6:
        return (ax < r / 3) & (ay < r)
    if label == 7:
        return (dy > -r) & (dy < r) & (ax < (dy + r) / 2)
    if label == 8:
        return (np.abs(ax - ay) < r / 4) & (np.maximum(ax, ay) < r)
    return ((dx - r / 2) ** 2 + dy**2 < (r / 2.5) ** 2) | (
        (dx + r / 2) ** 2 + dy**2 < (r / 2.5) ** 2
    )


def embedded_split(n: int, seed: int, size: int = 32, first: int = 0) -> Split:
    """``n`` images of ten shape classes at random positions, sizes and colours, with noise; only
    the ``first`` of them if given (0: all), the same images as the first of all ``n``: every
    image's shape and colours are drawn for all ``n`` (a few numbers each), then the pixel noise,
    image after image, for the images made."""
    k = min(first or n, n)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(EMBEDDED_CLASSES), n)[:k]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = rng.uniform(10, size - 10, (n, 1, 1))[:k]
    cy = rng.uniform(10, size - 10, (n, 1, 1))[:k]
    r = rng.uniform(5, 9, (n, 1, 1))[:k]
    mask = np.zeros((k, size, size), bool)
    for label in range(len(EMBEDDED_CLASSES)):  # each image's own shape only
        i = np.flatnonzero(labels == label)
        mask[i] = _shape_mask(label, xx - cx[i], yy - cy[i], r[i])
    # A dark shape on a light background or the reverse, in random hues, with pixel noise.
    dark = rng.uniform(0, 100, (n, 1, 1, 3))[:k]
    light = rng.uniform(155, 255, (n, 1, 1, 3))[:k]
    swap = rng.random((n, 1, 1, 1))[:k] < 0.5
    colour, background = np.where(swap, dark, light), np.where(swap, light, dark)
    images = np.empty((k, size, size, 3), np.uint8)
    for start in range(0, k, 512):  # in blocks that stay in cache; the same draws in order
        end = min(start + 512, k)
        block = np.where(mask[start:end, ..., None], colour[start:end], background[start:end])
        block += rng.normal(0, 25, block.shape)
        images[start:end] = np.clip(block, 0, 255)
    return Split(images, labels.astype(np.int32))


@functools.lru_cache(maxsize=4)
def _embedded_cached(num_train: int, num_test: int, first_train: int, first_test: int):
    splits = (
        embedded_split(num_train, 1, first=first_train),
        embedded_split(num_test, 2, first=first_test),
    )
    for split in splits:  # shared between calls: read-only
        split.images.flags.writeable = split.labels.flags.writeable = False
    return splits


def embedded(num_train: int = 10_000, num_test: int = 2_000, first_train: int = 0,
             first_test: int = 0) -> dict[str, Split]:  # fmt: skip
    """The embedded dataset, or the first images of its splits (0: all): generated once per
    process, deterministic."""
    train, test = _embedded_cached(num_train, num_test, first_train, first_test)
    return {"train": train, "test": test}


# --- tfds --------------------------------------------------------------------------------------


class _FolderWarnings(logging.Filter):
    """tfds' warnings about the version folders it looks into ('Variant folder ... has no
    dataset_info.json', also for a folder that does not exist): a dataset that is not prepared
    is this module's one-line error, which says how to prepare it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Variant folder")


def _quiet_tfds_folders() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _FolderWarnings) for f in logger.filters):
        logger.addFilter(_FolderWarnings())


def _data_dir(config: ml_collections.ConfigDict) -> str:
    import tensorflow_datasets as tfds

    return (
        config.dataset.data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
    )


def read_tfds(name: str, data_dir: str) -> tuple[dict[str, Split], tuple[str, ...]]:
    """Reads a prepared tfds dataset's 'train' and 'test' splits through ``tfds.data_source``.

    Never downloads: a dataset that is not prepared in ``data_dir`` is an error that says how
    to prepare it.
    """
    import tensorflow_datasets as tfds

    from train.data import tfds_builders  # noqa: F401  (registers local_cifar10, local_cifar100)

    _quiet_tfds_folders()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"unknown tfds dataset {name!r}") from None
    splits = {}
    for split in ("train", "test"):
        source = open_source(name, split, data_dir)
        try:
            splits[split] = _read_all(source)
        except (RuntimeError, ValueError, OSError, KeyError) as e:  # array_record, decoding
            said = " ".join(str(e).split())[:160] or type(e).__name__
            raise UserError(
                f"dataset {name!r} split {split!r} in {data_dir} is damaged ({said}); prepare "
                "it again in a new data directory"
            ) from None
    return splits, class_names(builder)


def class_names(builder) -> tuple[str, ...]:
    info = builder.info
    names = info.metadata.get("class_names", None) if info.metadata else None
    return tuple(names or info.features["label"].names)


def open_source(name: str, split: str, data_dir: str):
    """``tfds.data_source`` of a prepared split; never downloads; says how to prepare it."""
    import tensorflow_datasets as tfds

    from train.data import tfds_builders

    _quiet_tfds_folders()
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:
        if name in tfds_builders.BUILDERS:
            how = (
                f"python -m train.prepare_data --source <archive or folder> --name {name} "
                f"--data_dir {data_dir}"
            )
        elif name.startswith("imagenet"):
            how = (
                f"tfds build {name} --data_dir {data_dir} --file_format=array_record "
                "--manual_dir <folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar>"
            )
        else:
            how = (
                f"tfds build {name} --data_dir {data_dir} --file_format=array_record "
                "(on a machine that can download)"
            )
        if _tfrecord_files(data_dir, name):
            raise UserError(
                f"dataset {name!r} in {data_dir} is prepared as TFRecord files, which "
                "tfds.data_source cannot read (it needs random access); prepare it again as "
                f"array_record: {how}"
            ) from None
        where = data_dir if os.path.isdir(data_dir) else f"{data_dir} (not found)"
        raise UserError(
            f"dataset {name!r} split {split!r} is not prepared in {where}; prepare it with: {how}"
        ) from None


def _tfrecord_files(data_dir: str, name: str) -> list[str]:
    """TFRecord files of a tfds dataset (``name`` without its config or version) in data_dir."""
    base = name.split(":")[0].split("/")[0]
    return glob.glob(os.path.join(data_dir, base, "**", "*.tfrecord*"), recursive=True)


def _read_all(source, chunk: int = 5000) -> Split:
    images, labels = [], []
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        try:
            rows = source.__getitems__(keys)
        except TypeError:  # tfds.testing.mock_data's source reads one record at a time
            rows = [source[k] for k in keys]
        images.extend(np.asarray(r["image"]) for r in rows)
        labels.extend(int(r["label"]) for r in rows)
    return Split(np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))


# --- assembling train / validation / test -----------------------------------------------------


def validation_positions(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): a fixed random ``fraction`` of ``n`` training examples held out for
    early stopping."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"config.dataset.validation_fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * fraction)
    return np.sort(order[n_val:]), order[:n_val]


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Holds out ``fraction`` of train (a fixed random subset) for early stopping."""
    rest, val = validation_positions(len(train), fraction, seed)
    return Split(train.images[rest], train.labels[rest]), Split(
        train.images[val], train.labels[val]
    )


def load_stream(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> Data:
    """The imagenet pipeline: splits streamed from the tfds source (train/data/imagenet.py). The
    test split is ``config.dataset.test_split`` (ImageNet's labelled 'validation' set); the
    validation split for early stopping is carved from 'train'."""
    import tensorflow_datasets as tfds

    from train.data.imagenet import Stream

    name, data_dir, ds = config.dataset.name, _data_dir(config), config.dataset
    _quiet_tfds_folders()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"unknown tfds dataset {name!r}") from None

    def stream(split):
        source = open_source(name, split, data_dir)
        return Stream(
            source,
            np.arange(len(source)),
            size=image_shape[0],
            resize=ds.resize,
            num_classes=ds.num_classes,
            name=f"{name}/{split}",
            workers=ds.workers,
        )

    train = stream("train").take(ds.max_train_examples)
    test = stream(ds.test_split).take(ds.max_test_examples)
    if ds.validation == "test":
        validation = test
    else:
        rest, val = validation_positions(len(train), ds.validation_fraction, seed=1234)
        train, validation = train.subset(rest), train.subset(val)
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"dataset {name!r} has an empty train or test split")
    return Data(train, validation, test, ds.num_classes, class_names(builder))


def reencoded(split: Split, quality: int) -> Split:
    """The split with every image re-encoded once as JPEG at ``quality``
    (``config.dataset.jpeg_quality``)."""
    from train.data import sources

    if split.images.shape[-1] != 3:
        raise UserError(
            f"config.dataset.jpeg_quality: re-encoding needs RGB images, these have "
            f"{split.images.shape[-1]} channels"
        )
    return Split(sources.jpeg_roundtrip(split.images, quality), split.labels)


def load(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> Data:
    if config.dataset.pipeline == "imagenet":
        return load_stream(config, image_shape)
    name = config.dataset.name
    if name == "embedded":
        ds = config.dataset  # only the images a run reads are made
        splits = embedded(first_train=ds.max_train_examples, first_test=ds.max_test_examples)
        names = EMBEDDED_CLASSES
    else:
        splits, names = read_tfds(name, _data_dir(config))
    num_classes = config.dataset.num_classes
    for split_name, split in splits.items():
        if split.images.shape[1:] != tuple(image_shape):
            raise UserError(
                f"dataset {name!r} split {split_name!r} has images of shape "
                f"{split.images.shape[1:]}, the model expects {tuple(image_shape)}"
            )
        bad = (split.labels < 0) | (split.labels >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise UserError(
                f"dataset {name!r} split {split_name!r}: label {split.labels[i]} of "
                f"example {i} is outside [0, {num_classes}) (config.dataset."
                "num_classes)"
            )
    train = splits["train"].take(config.dataset.max_train_examples)
    test = splits["test"].take(config.dataset.max_test_examples)
    if quality := config.dataset.jpeg_quality:
        train, test = (reencoded(split, quality) for split in (train, test))
    if config.dataset.validation == "test":  # selects on the test split (labelled as such)
        validation = test
    else:
        train, validation = carve_validation(train, config.dataset.validation_fraction, seed=1234)
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"dataset {name!r} has an empty train or test split")
    return Data(train, validation, test, num_classes, tuple(names))
