r"""The paper's analyses of a trained GAttANet, one command each.

  python -m train.analyze noise  --workdir DIR [--sigmas 0,0.01,0.1]
  python -m train.analyze lesion --workdir DIR [--lesions cccdd,.ccdd,c.cdd]
  python -m train.analyze umap   --workdir DIR
  python -m train.analyze maps   --workdir DIR [--images 0,1,2]
  python -m train.analyze cues   --workdir DIR [--cue_weights 0,0.25,0.5,0.75,1]
  python -m train.analyze shifted --workdir DIR
  python -m train.analyze table  --workdir OUT --runs DIR1,DIR2,...
  python -m train.analyze seeds  --workdir OUT --runs DIR1,DIR2,... [--sigmas ...] [--lesions ...]
  python -m train.analyze paired --workdir OUT --runs DIR1,DIR2,...
  python -m train.analyze pooled --workdir OUT --runs PAIRED1,PAIRED2,...
  python -m train.analyze selection --workdir OUT --runs DIR1,DIR2,...

DIR is an attention-stage workdir (what ``--config.stage=attention`` wrote, or <dir>/attention of
``stage=both``): its config.json, best/ checkpoint and the frozen backbone it names are loaded,
and the test split is evaluated. Figures (PNG) and numbers (JSON, markdown for the table) go to
DIR/analysis/. ``--max_examples N`` evaluates the first N test images only (default: the test
split the workdir was evaluated on). ``seeds`` runs ``noise`` and ``lesion`` on each of several
attention workdirs (one per seed or backbone) and draws their mean and standard deviation into
OUT (noise.png, lesion.png, seeds.json, seeds.md). ``paired`` compares runs on the same test
images, example by example: each against its frozen backbone and each pair with each other
(McNemar's exact test on the examples one gets right and the other wrong; OUT/paired.json and
paired.md; a run may also be a GALA, SE or GSA add-on of ``train.compare``). ``pooled`` reads
several ``paired`` outputs (one per seed, the same models on each) and pools each difference over
them (OUT/pooled.json and pooled.md). ``selection`` replays early-stopping rules (what they
watch, which weights they keep, the test set as validation) on runs of any stage trained with
``--config.<stage>_training.test_each_epoch=True``, from their history.jsonl (OUT/selection.json,
.md and .png). ``shifted`` tests a
trained GAttANet with each test image's global query taken from the previous test image (its
agreement with another image's queries), without retraining.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from train import compilation, precision
from train.errors import UserError
from train.tools.analyses.common import (  # noqa: F401  (the analyses' API, as before)
    DEFAULT_CUE_WEIGHTS,
    DEFAULT_SIGMAS,
    accuracy,
    outputs,
)
from train.tools.analyses.cues import cues, wrong_classes  # noqa: F401
from train.tools.analyses.lesion import default_lesions, lesion  # noqa: F401
from train.tools.analyses.maps import maps
from train.tools.analyses.noise import noise
from train.tools.analyses.paired import (  # noqa: F401
    compare_correct,
    mcnemar_p,
    model_name,
    paired,
    pooled,
)
from train.tools.analyses.seeds import seeds, table
from train.tools.analyses.selection import replay
from train.tools.analyses.shifted import shifted
from train.tools.analyses.umap import knn_accuracy, umap  # noqa: F401
from train.tools.trained import load

ANALYSES = (
    "noise",
    "lesion",
    "umap",
    "maps",
    "cues",
    "table",
    "seeds",
    "paired",
    "pooled",
    "shifted",
    "selection",
)


def define_flags() -> dict:
    """The CLI's flags; defined only when run as a program, so importing this module (tests,
    notebooks) never clashes with other modules' absl flags."""
    return {
        "workdir": flags.DEFINE_string(
            "workdir",
            None,
            "Attention workdir ('table', 'seeds', 'paired', 'pooled', 'selection': output).",
        ),
        "runs": flags.DEFINE_list(
            "runs",
            [],
            "table, seeds, paired: attention workdirs; pooled: paired outputs; selection: any.",
        ),
        "sigmas": flags.DEFINE_list("sigmas", [str(s) for s in DEFAULT_SIGMAS], "noise levels."),
        "lesions": flags.DEFINE_list("lesions", [], "lesion strings (default: single sites)."),
        "images": flags.DEFINE_list("images", ["0", "1", "2", "3"], "maps: test indices."),
        "cue_weights": flags.DEFINE_list(
            "cue_weights", [str(w) for w in DEFAULT_CUE_WEIGHTS], "cues: weights of the cue."
        ),
        "max_examples": flags.DEFINE_integer("max_examples", 0, "First N test images (0: all)."),
        "data_dir": flags.DEFINE_string("data_dir", "", "Override the tfds data directory."),
        "backbone_checkpoint": flags.DEFINE_string(
            "backbone_checkpoint", "", "The frozen backbone, where it is not where it was."
        ),
    }


def run(analysis: str, f: dict) -> None:
    if not f["workdir"]:
        raise UserError("--workdir is required")
    if analysis == "table":
        if not f["runs"]:
            raise UserError("table needs --runs DIR1,DIR2,... (attention workdirs)")
        table(Path(f["workdir"]), f["runs"])
        return
    if analysis == "seeds":
        sigmas = _parse(f["sigmas"], float, "--sigmas must be numbers")
        load_args = {"data_dir": f["data_dir"], "max_examples": f["max_examples"]}
        seeds(Path(f["workdir"]), f["runs"], sigmas, f["lesions"], **load_args)
        return
    if analysis == "selection":
        replay(Path(f["workdir"]), f["runs"])
        return
    if analysis == "pooled":
        pooled(Path(f["workdir"]), f["runs"])
        return
    if analysis == "paired":
        load_args = {"data_dir": f["data_dir"], "max_examples": f["max_examples"]}
        paired(Path(f["workdir"]), f["runs"], **load_args)
        return
    m = load(f["workdir"], f["data_dir"], f["max_examples"], f["backbone_checkpoint"])
    with precision.scope(m.config):  # the precision the workdir trained at
        _single(analysis, m, f)


def _single(analysis: str, m, f: dict) -> None:
    """An analysis of one attention workdir."""
    if analysis == "noise":
        noise(m, _parse(f["sigmas"], float, "--sigmas must be numbers"))
    elif analysis == "lesion":
        lesion(m, f["lesions"])
    elif analysis == "umap":
        umap(m)
    elif analysis == "maps":
        maps(m, _parse(f["images"], int, "--images must be test indices"))
    elif analysis == "cues":
        cues(m, _parse(f["cue_weights"], float, "--cue_weights must be numbers"))
    elif analysis == "shifted":
        shifted(m)


def _parse(values: list[str], kind, what: str) -> list:
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise UserError(f"{what}, got {values}") from None


def main(argv, defined: dict):
    if len(argv) != 2 or argv[1] not in ANALYSES:
        names = "|".join(ANALYSES)
        got = f"unknown analysis {argv[1]!r}; " if len(argv) == 2 else ""
        raise app.UsageError(f"{got}usage: python -m train.analyze {{{names}}} --workdir DIR ...")
    # several runs: the default precision
    with compilation.cache(), precision.scope_for("float32"):
        run(argv[1], {k: v.value for k, v in defined.items()})


def run_cli():
    """``python -m train.analyze``."""
    from train import cli

    cli.run(main, define_flags, tool="tool")


if __name__ == "__main__":
    run_cli()
