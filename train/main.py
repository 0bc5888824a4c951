r"""Entry point: ``python -m train.main --config configs/<x>.py[:<arg>] --workdir DIR
[--config.<field>=<value> ...] [--dry_run]``.

Thin on purpose: flags in, ``train_and_evaluate(config, workdir)`` out. Problems with the
config, the data or the checkpoints are printed as one line, without a traceback.
``--dry_run`` prints the resolved config, the parameter counts (trained and frozen), the sites
and the data splits with their sizes, and exits without writing anything.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import cli
from train.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the resolved config, counts, sites and data; write nothing."
)
flags.mark_flags_as_required(["config"])


def catalogue() -> str:
    """The configs and the arguments (variants) each takes, for --help."""
    import importlib
    from pathlib import Path

    import configs

    lines = ["", "Configs (--config configs/<name>.py[:<variant>]):"]
    for path in sorted(Path(configs.__file__).parent.glob("[a-z]*.py")):
        module = importlib.import_module(f"configs.{path.stem}")
        title = (module.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  configs/{path.name}: {title}")
        variants = getattr(module, "VARIANTS", ())
        if variants:
            lines.append(f"      variants: {', '.join(variants)}")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    # imported late: JAX starts after the flags are parsed
    from train import compilation, defaults, train
    from train.tools import summary

    try:
        if _DRY_RUN.value:
            planned = summary.dry_run(_CONFIG.value)  # every check first: an error is one line
            print(defaults.complete(_CONFIG.value))
            print(json.dumps(planned, indent=1))
            return
        if not _WORKDIR.value:
            raise UserError("--workdir is required (or --dry_run to see what a run would do)")
        compilation.enable_cache()
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk, a lost mount, a file made unwritable under the run
        where = f" {e.filename}" if e.filename else ""
        print(
            f"error: could not write{where}: {e.strerror or e}; the last complete checkpoint is "
            "kept: free space and rerun the same command to resume",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    sys.modules[__name__].__doc__ = __doc__ + catalogue()  # absl's --help prints it
    app.run(main, flags_parser=cli.parse_flags)
