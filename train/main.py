r"""Entry point: ``python -m train.main --config configs/<x>.py --workdir DIR [--config.f=v]``.

Thin on purpose: flags in, ``train_and_evaluate(config, workdir)`` out. Problems with the
config, the data or the checkpoints are printed as one line, without a traceback.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import cli
from train.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from train import train  # imported late: JAX starts after the flags are parsed

    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
