r"""Prepares CIFAR-10 or CIFAR-100 as a tfds dataset from local files (no TensorFlow needed).

  python -m train.prepare_data --source path/to/cifar10-jpeg.tar.xz --name local_cifar10
  python -m train.prepare_data --source cifar-100-python.tar.gz --name local_cifar100 \
      --data_dir ~/tensorflow_datasets

Sources: the Toronto python archives, or folders ``<split>/<class>/<image>`` (train and test)
and tar archives of them. Training then reads ``--config.dataset.name=local_cifar10``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything slow: a signal at any moment is one line
    from train import signals

    signals.install("tool")

import time

from absl import app, flags, logging

from train import cli, files
from train.data import tfds_builders
from train.errors import UserError

_SOURCE = flags.DEFINE_string("source", None, "Archive or folder to read.", required=True)
_NAME = flags.DEFINE_enum("name", "local_cifar10", sorted(tfds_builders.BUILDERS), "Dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir (default: tfds' own).")


def prepare(source: str, name: str, data_dir: str | None = None) -> str:
    """Writes the dataset and returns the directory it went to."""
    builder = tfds_builders.BUILDERS[name](
        source=source, data_dir=data_dir, file_format="array_record"
    )
    if builder.is_prepared():
        logging.info("%s is already prepared in %s", name, builder.data_dir)
        return str(builder.data_dir)
    try:
        builder.download_and_prepare()
    except (UserError, OSError):
        raise
    except Exception as e:  # tfds wraps a failed write (a full disk) in its own errors
        raise UserError(
            f"could not write {name} into {builder.data_dir}: {files.reason(e)}"
        ) from None
    return str(builder.data_dir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.time()
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # (bars on stderr, where errors go); one line instead
    print(f"preparing {_NAME.value} from {_SOURCE.value} (about 30 s for CIFAR-10)", flush=True)
    where = prepare(_SOURCE.value, _NAME.value, _DATA_DIR.value)
    print(f"{_NAME.value} prepared in {where} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    cli.run(main, tool="tool")
