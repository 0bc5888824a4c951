"""The table "What moves the toy baseline" of docs/RESULTS.md, from the ablation's workdirs
(docs/runs/baseline/ablation.sh):

  python docs/runs/baseline/table.py [workdir root, default workdirs/baseline]

Rows: each early-stopping rule replayed on the recorded default runs ('recorded', the default
recipe with the test split evaluated each epoch: ``train.analyze selection``), then each recipe
switch that changes training, against the default recipe on the same seed (paired). Variants
with no finished run yet are listed as such.
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
    "keras_init": "Glorot uniform kernels (Keras' default initialiser)",
    "pixels_255": "raw 0-255 pixel values (ImageDataGenerator without rescale)",
}


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


def row(name: str, seeds: list[int], acc: np.ndarray, base: np.ndarray) -> str:
    diff = acc - base
    n = len(acc)
    sd = f"{acc.std(ddof=1):.2f}" if n > 1 else "-"
    se = f"{diff.std(ddof=1) / np.sqrt(n):.2f}" if n > 1 else "-"
    return (
        f"| {name} | {','.join(map(str, seeds))} | {acc.mean():.2f} ± {sd} | "
        f"{diff.mean():+.2f} ± {se} |"
    )


def main(root: Path) -> str:
    recorded = seed_dirs(root / "recorded")
    if not recorded:
        return f"no finished recorded run under {root}/recorded yet"
    lines = [
        "| variant | seeds | test accuracy (%) | difference to the default recipe (± paired se) |",
        "|---|---|---|---|",
    ]
    runs = [selection.replay_run(recorded[s]) for s in sorted(recorded)]
    for name, *_ in selection.RULES:
        kept = [(s, r["rules"][name]) for s, r in zip(sorted(recorded), runs, strict=True)]
        kept = [(s, k) for s, k in kept if k is not None]
        if kept:
            acc = np.array([100 * k["test_accuracy"] for _, k in kept])
            base = np.array(
                [100 * runs[sorted(recorded).index(s)]["test_accuracy"] for s, _ in kept]
            )
            label = "default recipe (" + name + ")" if name == "val_accuracy, best" else name
            lines.append(row(label, [s for s, _ in kept], acc, base))
    for variant, what in TRAINING.items():
        done = {s: finished(d) for s, d in seed_dirs(root / variant).items() if s in recorded}
        if not done:
            lines.append(f"| {what} | - | not run yet | - |")
            continue
        seeds = sorted(done)
        acc = np.array([100 * done[s]["test_accuracy"] for s in seeds])
        base = np.array([100 * finished(recorded[s])["test_accuracy"] for s in seeds])
        lines.append(row(what, seeds, acc, base))
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "workdirs" / "baseline"))
