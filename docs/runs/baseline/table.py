"""The table "What moves the toy baseline" of docs/RESULTS.md, from the ablation's runs
(docs/runs/baseline/ablation.sh copies each finished run's config.json, results.json,
elapsed.json and history.jsonl into docs/runs/baseline/<variant>/<seed>/):

  python docs/runs/baseline/table.py [runs root, default docs/runs/baseline]

It also draws <runs root>/curves.png: each run's training accuracy (under augmentation and
dropout) and validation accuracy per epoch, by variant ('recorded' stands for the default recipe;
dotted lines are unfinished runs).

Rows: the default recipe (the shipped backbones, pretrained/toy_cifar10_s<seed>/backbone); each
early-stopping rule replayed on the recorded default runs ('recorded', the default recipe with
the test split evaluated each epoch: ``train.analyze selection``), against the recorded run's own
rule, and the best test accuracy any of its epochs reached (no rule stopping within those epochs
keeps more); then each recipe switch that changes training, against the shipped default
backbone of the same seed (paired). A variant with no finished run yet shows its unfinished
runs' epochs so far and their best validation accuracy against the recorded default runs over
the same epochs (an early sign, not a result), where a snapshot copied them here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from train.tools.analyses import selection  # noqa: E402

TRAINING = {
    "test_selected": "train on all 50,000 images, select on the test set",
    "dropout_dense1": "one dropout layer, after the hidden dense layer (not after each pooling)",
    "keras_init": "Glorot uniform kernels (Keras' default initialiser)",
    "dropout_dense1_test_selected": (
        "combined: dropout after the dense layer, all 50,000 images, selected on the test set"
    ),
    "pixels_255": "raw 0-255 pixel values (ImageDataGenerator without rescale)",
    "jpeg_q50": "probe: the copy re-encoded at JPEG quality 50 (more compression)",
}
REPLAYED = "early-stopping rules replayed on the recorded default runs"
PEAK = "the best test accuracy of any epoch trained (a bound on every rule)"
HEADER = [
    "| variant | seeds | test accuracy (%) | difference to the default recipe (± paired se) |",
    "|---|---|---|---|",
]


def finished(path: Path) -> dict | None:
    results = path / "results.json"
    return json.loads(results.read_text()) if results.is_file() else None


def seed_dirs(path: Path) -> dict[int, Path]:
    """A variant's finished runs by seed: <variant>/<seed>/ (a run each) or, from a sweep,
    <variant>/members/<i>/ (the seed is the run's own config's)."""
    dirs = sorted(path.glob("members/*")) or sorted(path.glob("*"))
    return {
        json.loads((d / "config.json").read_text())["seed"]: d
        for d in dirs
        if finished(d) is not None
    }


def running_dirs(path: Path) -> dict[int, Path]:
    """A variant's unfinished runs by seed: a history and a config but no results yet (a
    snapshot, ``SNAPSHOT=1 bash docs/runs/baseline/ablation.sh``, copies them while they run)."""
    return {
        json.loads((d / "config.json").read_text())["seed"]: d
        for d in sorted(path.glob("*"))
        if finished(d) is None and (d / "config.json").is_file() and (d / "history.jsonl").is_file()
    }


def epochs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def running_row(what: str, runs: dict[int, Path], recorded: dict[int, Path]) -> str:
    """An unfinished variant: its epochs so far and its best validation accuracy up to there,
    beside the recorded default run of the same seed over the same epochs (an early sign only:
    validation, not test, and before the run has stopped). A variant selected on the test set
    validates on the test split, so it is compared with the recorded runs' test accuracy."""
    seeds = sorted(runs)
    if not seeds:
        return f"| {what} | - | not finished yet | - |"
    on_test = (
        json.loads((runs[seeds[0]] / "config.json").read_text())["dataset"].get("validation")
        == "test"
    )
    key, split = ("test_accuracy", "the test set") if on_test else ("val_accuracy", "validation")
    parts, diffs = [], []
    for s in seeds:
        ours = epochs(runs[s] / "history.jsonl")
        n = len(ours)
        best = 100 * max(e["val_accuracy"] for e in ours)
        parts.append(f"seed {s} {best:.2f} in {n} epochs")
        if s in recorded:  # no recorded default run for this seed: no difference to show
            theirs = [e for e in epochs(recorded[s] / "history.jsonl") if e["epoch"] <= n]
            diffs.append(best - 100 * max(e[key] for e in theirs))
    against = "-"
    if diffs:
        compared = [s for s in seeds if s in recorded]
        against = (
            f"{np.mean(diffs):+.2f} on {split} against the default recipe over the same epochs"
            + (
                f" (seed{'s' * (len(compared) > 1)} {','.join(map(str, compared))})"
                if len(compared) < len(seeds)
                else ""
            )
        )
    return (
        f"| {what} | {','.join(map(str, seeds))} | running; best accuracy on {split} so far: "
        f"{', '.join(parts)} | {against} |"
    )


def shipped_default() -> dict[int, float]:
    """Test accuracy (%) of the shipped default-recipe backbones, by seed."""
    out = {}
    for d in sorted((ROOT / "pretrained").glob("toy_cifar10_s*/backbone")):
        results, config = finished(d), json.loads((d / "config.json").read_text())
        out[config["seed"]] = 100 * results["test_accuracy"]
    return out


def row(name: str, seeds: list[int], acc: np.ndarray, base: np.ndarray) -> str:
    diff = acc - base
    n = len(acc)
    sd = f"{acc.std(ddof=1):.2f}" if n > 1 else "-"
    se = f"{diff.std(ddof=1) / np.sqrt(n):.2f}" if n > 1 else "-"
    return (
        f"| {name} | {','.join(map(str, seeds))} | {acc.mean():.2f} ± {sd} | "
        f"{diff.mean():+.2f} ± {se} |"
    )


def replay_rows(root: Path) -> list[str]:
    recorded = seed_dirs(root / "recorded")
    if not recorded:
        return [f"| {REPLAYED} | - | not finished yet | - |"]
    seeds = sorted(recorded)
    runs = [selection.replay_run(recorded[s]) for s in seeds]
    lines = []
    for name, *_ in selection.RULES:
        kept = [(s, r["rules"][name], r) for s, r in zip(seeds, runs, strict=True)]
        kept = [(s, k, r) for s, k, r in kept if k is not None]
        if kept:
            acc = np.array([100 * k["test_accuracy"] for _, k, _ in kept])
            base = np.array([100 * r["test_accuracy"] for _, _, r in kept])
            label = f"recorded default runs, {name}"
            lines.append(row(label, [s for s, _, _ in kept], acc, base))
    # No rule that stops and selects within the epochs a run trained can keep more than this.
    peak = np.array([100 * max(r["curves"]["test_accuracy"]) for r in runs])
    own = np.array([100 * r["test_accuracy"] for r in runs])
    lines.append(row(f"recorded default runs, {PEAK}", seeds, peak, own))
    return lines


def curves(root: Path) -> Path | None:
    """Training and validation accuracy per epoch of every run, one colour a variant (dotted
    while a run is unfinished)."""
    from train.tools import plots

    variants = {"recorded": "default recipe (recorded runs)", **TRAINING}
    runs = [
        (what, d / "history.jsonl", done)
        for variant, what in variants.items()
        for done, dirs in ((True, seed_dirs(root / variant)), (False, running_dirs(root / variant)))
        for _, d in sorted(dirs.items())
        if (d / "history.jsonl").is_file()
    ]
    if not runs:
        return None
    fig, axes = plots.plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    colors = dict(zip(variants.values(), plots.plt.get_cmap("tab10").colors, strict=False))
    labelled = set()
    for what, path, done in runs:
        records = epochs(path)
        x = [e["epoch"] for e in records]
        name = what if done else f"{what}: unfinished, so far"
        label = None if name in labelled else name
        labelled.add(name)
        for ax, key in zip(axes, ("train_accuracy", "val_accuracy"), strict=True):
            y = [100 * e[key] for e in records]
            ls = "-" if done else ":"  # dotted: still running
            ax.plot(x, y, color=colors[what], lw=0.8, ls=ls, alpha=0.8, label=label)
    axes[1].axhline(83.28, color="black", ls="--", lw=1, label="the paper's test accuracy")
    axes[0].set_title("training accuracy (under augmentation and dropout)")
    axes[1].set_title("validation accuracy (the test split when selected on it)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(60, 86)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("toy backbone on the CIFAR-10 JPEG copy: each variant's runs (a line per seed)")
    fig.tight_layout()
    out = root / "curves.png"
    fig.savefig(out, dpi=100)
    plots.close(fig)
    return out


def main(root: Path) -> str:
    default = shipped_default()
    seeds = sorted(default)
    acc = np.array([default[s] for s in seeds])
    default_row = (
        f"| default recipe (the shipped backbones) | {','.join(map(str, seeds))} | "
        f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f} | - |"
    )
    lines = [*HEADER, default_row]
    lines += replay_rows(root)
    for variant, what in TRAINING.items():
        done = {s: finished(d) for s, d in seed_dirs(root / variant).items() if s in default}
        if not done:
            running = running_dirs(root / variant)
            lines.append(running_row(what, running, seed_dirs(root / "recorded")))
            continue
        seeds = sorted(done)
        acc = np.array([100 * done[s]["test_accuracy"] for s in seeds])
        lines.append(row(what, seeds, acc, np.array([default[s] for s in seeds])))
        if running := {s: d for s, d in running_dirs(root / variant).items() if s not in done}:
            recorded = seed_dirs(root / "recorded")
            lines.append(running_row(f"{what}, still running", running, recorded))
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "runs" / "baseline"
    print(main(root))
    if drawn := curves(root):
        print(f"wrote {drawn}")
