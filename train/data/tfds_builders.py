"""tfds builders that prepare CIFAR-10 and CIFAR-100 from local files without TensorFlow.

tfds' own cifar builders need TensorFlow to prepare. These write array_record files with uint8
Tensor features, which needs no TensorFlow, and are read back with ``tfds.data_source``. Importing
this module registers the names 'local_cifar10' and 'local_cifar100'.
"""

from __future__ import annotations

import typing

import numpy as np
import tensorflow_datasets as tfds

from train.data import sources
from train.errors import UserError


class _LocalCifar(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: typing.ClassVar[dict[str, str]] = {
        "1.0.0": "Prepared from local files by gattanet-jax."
    }
    NUM_CLASSES = 0

    def __init__(self, *, source: str | None = None, **kwargs):
        self._source = source
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"CIFAR ({self.NUM_CLASSES} classes) prepared from a local copy.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        if not self._source:
            raise UserError(
                f"{self.name} is prepared with `python -m train.prepare_data "
                f"--source PATH --name {self.name}`"
            )
        splits, classes = sources.read_source(self._source)
        if len(classes) != self.NUM_CLASSES:
            raise UserError(
                f"{self._source} has {len(classes)} classes; {self.name} needs {self.NUM_CLASSES}"
            )
        self.info.metadata["class_names"] = classes
        self.info.metadata["source"] = str(self._source)
        return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


class LocalCifar10(_LocalCifar):
    """CIFAR-10 from cifar-10-python.tar.gz or a train/test/<class>/ image tree."""

    NUM_CLASSES = 10


class LocalCifar100(_LocalCifar):
    """CIFAR-100 (fine labels) from cifar-100-python.tar.gz or a train/test/<class>/ tree."""

    NUM_CLASSES = 100


BUILDERS = {"local_cifar10": LocalCifar10, "local_cifar100": LocalCifar100}
