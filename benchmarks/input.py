r"""Input throughput of the ImageNet pipeline on a generated ImageNet-shaped dataset.

  python -m benchmarks.input [--data_dir data/tfds] [--examples 4096] [--batch 128] \
      [--batches 30] [--workers 8] [--json]

The first run writes ``synthetic_imagenet`` into ``--data_dir`` as tfds prepares ImageNet:
array_record files of JPEG images (quality 90, sides 300-500 px as most ImageNet photos,
smooth content with noise, about 40-60 KB each) and labels out of 1,000. Then it times the
pipeline the training loop reads ImageNet with (``train/data/imagenet.py``: the
``tfds.data_source``, JPEG decoding, torchvision's preprocessing, the reading threads): training
batches (random-resized crop 224, flip) and evaluation batches (resize 256, centre crop 224),
images per second after one warm-up batch. No model runs: this is the host's side alone.
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
import typing

import numpy as np
from absl import app, flags

from train import cli

if __name__ == "__main__":
    _DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "Where the dataset is written.")
    _EXAMPLES = flags.DEFINE_integer("examples", 4096, "Examples in the generated dataset.")
    _BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
    _BATCHES = flags.DEFINE_integer("batches", 30, "Timed batches of each kind.")
    _WORKERS = flags.DEFINE_integer("workers", 8, "Reading threads (config.dataset.workers).")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    h, w = (int(v) for v in rng.integers(300, 501, 2))
    coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float32)
    image = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def prepare(data_dir: str, examples: int):
    """The ``synthetic_imagenet`` builder in ``data_dir``, prepared (array_record)."""
    import tensorflow_datasets as tfds

    class SyntheticImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(f"1.0.{examples}")
        RELEASE_NOTES: typing.ClassVar[dict[str, str]] = {"1.0.0": "ImageNet-shaped noise."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=1000),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(examples):
                label = int(rng.integers(1000))
                yield i, {"image": io.BytesIO(_jpeg(rng)), "label": label}

    builder = SyntheticImagenet(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def images_per_second(batches, n: int, batch: int) -> float:
    it = iter(batches)
    next(it)  # warm-up: the threads start, the first reads are cached by the OS
    start = time.perf_counter()
    for _ in range(n):
        images, _ = next(it)
        assert images.shape == (batch, 224, 224, 3)
    return n * batch / (time.perf_counter() - start)


def run(data_dir: str, examples: int, batch: int, n_batches: int, workers: int) -> dict:
    from train.data.imagenet import Stream

    if (n_batches + 1) * batch > examples:
        raise app.UsageError(
            f"--examples must hold (batches + 1) * batch = {(n_batches + 1) * batch}"
        )
    source = prepare(data_dir, examples).as_data_source(split="train")
    stream = Stream(source, np.arange(len(source)), 224, 256, 1000, "synthetic_imagenet", workers)
    train = stream.train_batches(batch, seed=0, epoch=0)
    evaluation = stream.eval_batches(batch)
    return {
        "train_images_per_s": images_per_second(train, n_batches, batch),
        "eval_images_per_s": images_per_second(evaluation, n_batches, batch),
        "config": {
            "examples": examples,
            "batch": batch,
            "batches": n_batches,
            "workers": workers,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
    }


def main(argv):
    del argv
    results = run(_DATA_DIR.value, _EXAMPLES.value, _BATCH.value, _BATCHES.value, _WORKERS.value)
    print(json.dumps(results, indent=1) if _JSON.value else results)


if __name__ == "__main__":
    cli.run(main, tool="tool")
