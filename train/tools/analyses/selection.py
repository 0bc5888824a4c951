"""What the selection rule moves: early-stopping rules replayed on runs' recorded trajectories.

A run trained with ``<stage>_training.test_each_epoch=True`` has, in its history.jsonl, every
epoch's validation and test accuracy. Another stopping rule (what it watches, which weights it
keeps) changes when a run stops and which epoch it reports, never the trajectory up to there:
so each rule's figure is read off the one run, with the run's own ``selection.update`` and
``keeps``, exactly as a run with that rule would have stopped and kept (until the run's own stop:
a rule that would have stopped later is reported as not reached).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train import history, selection
from train.errors import UserError
from train.tools import plots
from train.tools.trained import read_config

# (name, watched split, monitor, restore)
RULES = (
    ("val_accuracy, best", "val", "val_accuracy", "best"),
    ("val_accuracy, last", "val", "val_accuracy", "last"),
    ("val_loss, best", "val", "val_loss", "best"),
    ("val_loss, last (Keras' EarlyStopping defaults)", "val", "val_loss", "last"),
    ("test accuracy, best (selected on the test set)", "test", "val_accuracy", "best"),
)


def _trajectory(run: Path) -> tuple[list[dict], dict, dict]:
    config = read_config(run)
    recipe = config[
        "backbone_training" if config.stage in ("backbone", "both") else "attention_training"
    ]
    records = history.read(run)
    if [r["epoch"] for r in records] != list(range(1, len(records) + 1)):
        raise UserError(f"{run}: history.jsonl does not hold every epoch from the first")
    if not records or "test_accuracy" not in records[0]:
        raise UserError(
            f"{run}: no per-epoch test accuracy in history.jsonl (train it with "
            "--config.<stage>_training.test_each_epoch=True)"
        )
    results_path = run / "results.json"
    if not results_path.is_file():
        raise UserError(f"{run}: no results.json (the run has not finished)")
    return records, recipe, json.loads(results_path.read_text())


def replay_run(run: Path) -> dict:
    """Each rule's stop epoch, kept epoch and test accuracy on one run; the run's own rule is
    checked against its results.json."""
    records, recipe, results = _trajectory(run)
    by_epoch = {r["epoch"]: r for r in records}
    rules = {}
    for name, split, monitor, restore in RULES:
        watched = [
            dict(r, val_accuracy=r[f"{split}_accuracy"], val_loss=r[f"{split}_loss"])
            for r in records
        ]
        kept = selection.replay(watched, monitor, restore, recipe.patience, recipe.num_epochs)
        if kept is not None:
            kept["test_accuracy"] = by_epoch[kept["epoch"]]["test_accuracy"]
        rules[name] = kept
    own = selection.replay(records, recipe.monitor, recipe.restore, recipe.patience,
                           recipe.num_epochs)  # fmt: skip
    own_test = by_epoch[own["epoch"]]["test_accuracy"] if own else None
    if (
        own is None
        or own["epoch"] != results["best_epoch"]
        or not np.isclose(own_test, results["test_accuracy"], rtol=0, atol=1e-9)
    ):
        raise UserError(
            f"{run}: replaying the run's own rule does not give its results.json (kept epoch "
            f"{own and own['epoch']} against {results['best_epoch']}): its history is not the "
            "run's"
        )
    return {
        "run": str(run),
        "own_rule": f"{recipe.monitor}, {recipe.restore}",
        "patience": recipe.patience,
        "epochs": len(records),
        "test_accuracy": results["test_accuracy"],
        "rules": rules,
        "curves": {k: [r[k] for r in records] for k in ("val_accuracy", "test_accuracy")},
    }


def summary(runs: list[dict]) -> dict:
    """Per rule over the runs: test accuracy mean and sd (percent), and its paired difference to
    each run's own rule with the difference's standard error (sd / sqrt(n))."""
    out = {}
    for name, *_ in RULES:
        reached = [r for r in runs if r["rules"][name] is not None]
        acc = 100 * np.array([r["rules"][name]["test_accuracy"] for r in reached])
        diff = acc - 100 * np.array([r["test_accuracy"] for r in reached])
        n = len(reached)
        out[name] = {
            "runs": n,
            "mean": float(acc.mean()) if n else None,
            "sd": float(acc.std(ddof=1)) if n > 1 else None,
            "difference": float(diff.mean()) if n else None,
            "difference_se": float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        }
    return out


def _cell(value, digits=2, signed=False):
    return "-" if value is None else f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(runs: list[dict], stats: dict) -> str:
    names = [Path(r["run"]).name or r["run"] for r in runs]
    lines = [
        "| rule | " + " | ".join(f"run {n}: stop / kept epoch, test %" for n in names)
        + " | mean ± sd | difference to the run's own rule (± se) |",
        "|---" * (len(runs) + 3) + "|",
    ]  # fmt: skip
    for name, *_ in RULES:
        cells = []
        for r in runs:
            k = r["rules"][name]
            cells.append(
                "not reached"
                if k is None
                else f"{k['stop_epoch']} / {k['epoch']}, {100 * k['test_accuracy']:.2f}"
            )
        s = stats[name]
        lines.append(
            f"| {name} | " + " | ".join(cells)
            + f" | {_cell(s['mean'])} ± {_cell(s['sd'])} | {_cell(s['difference'], signed=True)}"
            f" ± {_cell(s['difference_se'])} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def figure(runs: list[dict]):
    """Each run's validation and test accuracy per epoch, each rule's kept epoch marked."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    markers = "ovsD*"
    for ax, r in zip(axes[0], runs, strict=True):
        epochs = np.arange(1, r["epochs"] + 1)
        for key, color in (("val_accuracy", "tab:blue"), ("test_accuracy", "tab:orange")):
            ax.plot(epochs, 100 * np.asarray(r["curves"][key]), color=color, lw=1, label=key)
        for (name, *_), marker in zip(RULES, markers, strict=True):
            k = r["rules"][name]
            if k is not None:
                ax.plot(k["epoch"], 100 * k["test_accuracy"], marker, color="k", ms=6,
                        mfc="none", label=name)  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(Path(r["run"]).name or r["run"], fontsize=9)
        ax.set_ylim(max(0, 100 * min(r["curves"]["test_accuracy"][len(epochs) // 4 :]) - 3), None)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return fig


def replay(out: Path, runs: list[str]) -> dict:
    """``train.analyze selection``: OUT/selection.json, selection.md and selection.png."""
    if not runs:
        raise UserError("selection needs --runs DIR1,DIR2,... (workdirs with history.jsonl)")
    replayed = [replay_run(Path(r)) for r in runs]
    stats = summary(replayed)
    out.mkdir(parents=True, exist_ok=True)
    result = {"runs": replayed, "summary": stats}
    (out / "selection.json").write_text(json.dumps(result, indent=2))
    (out / "selection.md").write_text(markdown(replayed, stats))
    fig = figure(replayed)
    fig.savefig(out / "selection.png", dpi=110, bbox_inches="tight")
    plots.close(fig)
    print(markdown(replayed, stats), end="")
    print(f"wrote {out}/selection.md, selection.json and selection.png")
    return result
