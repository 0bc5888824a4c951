"""Several runs at once: Table 1's columns, and the noise and lesion analyses' mean and sd over
runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train import selection
from train.errors import UserError
from train.tools import plots
from train.tools.analyses.common import DEFAULT_SIGMAS, figure_title
from train.tools.analyses.lesion import lesion
from train.tools.analyses.noise import noise
from train.tools.trained import load, read_config


def percent_stats(values) -> dict:
    """Mean and sample standard deviation of accuracies (fractions), in percent."""
    values = 100 * np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1))}


def table(out: Path, runs: list[str]) -> str:
    """Table 1's columns from the results of a list of attention workdirs."""
    header = (
        "| backbone | data | base params | base acc. | d | attention params | acc. | gain | "
        "selected on |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for run in runs:
        path = Path(run)
        config = read_config(path)
        results_path = path / "results.json"
        if config.stage != "attention" or not results_path.is_file():
            raise UserError(f"{path} is not a finished attention workdir (no results.json)")
        r = json.loads(results_path.read_text())
        base, acc = r["backbone_test_accuracy"], r["test_accuracy"]
        lines.append(
            f"| {config.model.backbone} | {config.dataset.name} | {r['frozen_params']:,} | "
            f"{100 * base:.2f} | {config.attention.d} | {r['trainable_params']:,} | "
            f"{100 * acc:.2f} | {100 * (acc - base):+.2f} | {selection.recorded(r)} |"
        )
    text = header + "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    print(text, end="")
    return text


def seeds(out: Path, runs: list[str], sigmas=DEFAULT_SIGMAS, lesions=None, **load_args) -> dict:
    """``noise`` and ``lesion`` on each run (written into its own analysis/ as usual), then
    their mean and sample standard deviation over the runs, in ``out``."""
    if len(runs) < 2:
        raise UserError("seeds needs --runs with two or more attention workdirs")
    per_run, title = [], None
    for run in runs:
        m = load(run, **load_args)
        title = title or figure_title(m)
        per_run.append({"workdir": run, "noise": noise(m, sigmas), "lesion": lesion(m, lesions)})
    names = [r["lesion"] for r in per_run[0]["lesion"]["rows"]]
    if any([r["lesion"] for r in p["lesion"]["rows"]] != names for p in per_run):
        raise UserError("seeds needs runs with the same sites (their lesions differ)")

    def array(part, key):
        return np.array([[r[key] for r in p[part]["rows"]] for p in per_run])

    base, att = array("noise", "baseline_accuracy"), array("noise", "attention_accuracy")
    acc = array("lesion", "accuracy")
    lesion_base = np.array([p["lesion"]["baseline_accuracy"] for p in per_run])
    title = f"{title}, {len(runs)} runs"
    out.mkdir(parents=True, exist_ok=True)
    for name, figure in (
        ("noise", plots.noise(list(sigmas), base, att, title)),
        ("lesion", plots.lesion(names, acc, lesion_base, title)),
    ):
        figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        plots.close(figure)

    result = {
        "runs": list(runs),
        "noise": [
            {
                "sigma": float(sigma),
                "baseline_accuracy": percent_stats(base[:, i]),
                "attention_accuracy": percent_stats(att[:, i]),
                "gain": percent_stats(att[:, i] - base[:, i]),
            }
            for i, sigma in enumerate(sigmas)
        ],
        "lesion": [
            {
                "lesion": n,
                "accuracy": percent_stats(acc[:, i]),
                "gain": percent_stats(acc[:, i] - lesion_base),
            }
            for i, n in enumerate(names)
        ],
        "per_run": per_run,
    }
    (out / "seeds.json").write_text(json.dumps(result, indent=2))

    def cell(x):
        return f"{x['mean']:.2f} ± {x['sd']:.2f}"

    lines = [
        f"Mean ± sd over {len(runs)} runs, test accuracy (%).",
        "",
        "| noise σ | frozen baseline | GAttANet | gain |",
        "|---|---|---|---|",
        *(
            f"| {r['sigma']:g} | {cell(r['baseline_accuracy'])} | "
            f"{cell(r['attention_accuracy'])} | {cell(r['gain'])} |"
            for r in result["noise"]
        ),
        "",
        "| lesion | accuracy | gain over the frozen baseline |",
        "|---|---|---|",
        *(
            f"| `{r['lesion']}` | {cell(r['accuracy'])} | {cell(r['gain'])} |"
            for r in result["lesion"]
        ),
    ]
    text = "\n".join(lines) + "\n"
    (out / "seeds.md").write_text(text)
    print(text, end="")
    print(f"wrote {out}/noise.png, lesion.png, seeds.json and seeds.md")
    return result
