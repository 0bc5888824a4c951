r"""Entry point: ``python -m train.main --config configs/<x>.py[:<arg>] --workdir DIR
[--config.<field>=<value> ...] [--dry_run]``.

Thin on purpose: flags in, ``train_and_evaluate(config, workdir)`` out. Problems with the
config, the data or the checkpoints are printed as one line, without a traceback.
``--dry_run`` prints the resolved config, the parameter counts (trained and frozen), the sites
and the data splits with their sizes, and exits without writing anything.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything slow: a signal at any moment is one line
    from train import signals

    signals.install()
    signals.phase("imports")

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from train import cli, signals
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
    signals.phase("imports")  # JAX starts after the flags are parsed
    from train import compilation, defaults, train, validate
    from train.tools import summary

    signals.phase("config")
    config = _CONFIG.value
    validate.check_overrides(config, cli.overridden_fields(config, sys.argv))
    if _DRY_RUN.value:
        planned = summary.dry_run(config)  # every check first: an error is one line
        print(defaults.complete(config))
        print(json.dumps(planned, indent=1))
        return
    if not _WORKDIR.value:
        raise UserError("--workdir is required (or --dry_run to see what a run would do)")
    compilation.enable_cache()
    train.train_and_evaluate(config, _WORKDIR.value)
    signals.phase("end")


if __name__ == "__main__":
    sys.modules[__name__].__doc__ = __doc__ + catalogue()  # absl's --help prints it
    cli.run(main, tool="train", config_flag="config")
