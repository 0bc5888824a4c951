"""Runs compared example by example on the same test images (McNemar's exact test, paired
standard errors), and those comparisons pooled over seeds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from train.errors import UserError
from train.tools.analyses.common import outputs
from train.tools.trained import addon_logits, load, read_config


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: under 'the two are equally accurate' each example that
    exactly one of them gets right is that one's with probability 1/2."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    log_norm = math.lgamma(n + 1) - n * math.log(2.0)  # log(n! / 2^n), in logs: n is large
    tail = sum(
        math.exp(log_norm - math.lgamma(i + 1) - math.lgamma(n - i + 1)) for i in range(k + 1)
    )
    return min(1.0, 2.0 * tail)


def compare_correct(a: np.ndarray, b: np.ndarray) -> dict:
    """Two models' per-example correctness (booleans over the same examples), compared."""
    n = len(a)
    diff = a.astype(np.float64) - b.astype(np.float64)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    return {
        "accuracy_a": float(a.mean()),
        "accuracy_b": float(b.mean()),
        "difference": float(diff.mean()),
        "difference_se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "both_right": int(np.sum(a & b)),
        "only_a": only_a,
        "only_b": only_b,
        "both_wrong": int(np.sum(~a & ~b)),
        "mcnemar_p": mcnemar_p(only_a, only_b),
    }


def paired(out: Path, runs: list[str], **load_args) -> dict:
    """Every run against its frozen backbone, and every pair of runs against each other, example
    by example on the same test images (accuracies in [0, 1], the paired standard error of their
    difference, McNemar's exact p)."""
    if len(runs) < 2:
        raise UserError("paired needs --runs with two or more attention or add-on workdirs")
    correct, labels = {}, None
    for run in runs:
        if read_config(Path(run)).stage == "addon":  # GALA, SE or GSA from train.compare
            y, att, base = addon_logits(run, **load_args)
        else:
            m = load(run, **load_args)
            y = np.asarray(m.test.labels)
            att, base, _ = outputs(m, m.test.images)
        if labels is not None and not np.array_equal(y, labels):
            raise UserError(
                f"{run} was tested on other images than {runs[0]}; paired needs one test set"
            )
        labels = y
        correct[run] = (np.argmax(att, -1) == y, np.argmax(base, -1) == y)
    result = {
        "runs": list(runs),
        "test_examples": len(labels),
        "against_backbone": [dict(compare_correct(*correct[r]), run=r) for r in runs],
        "pairs": [
            dict(compare_correct(correct[a][0], correct[b][0]), a=a, b=b)
            for a, b in itertools.combinations(runs, 2)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired.json").write_text(json.dumps(result, indent=2))

    def row(first, second, c):
        return (
            f"| {first} | {second} | {100 * c['accuracy_a']:.2f} | {100 * c['accuracy_b']:.2f} | "
            f"{100 * c['difference']:+.2f} ± {100 * c['difference_se']:.2f} | {c['only_a']} | "
            f"{c['only_b']} | {c['mcnemar_p']:.3g} |"
        )

    lines = [
        f"{len(labels)} test images; difference ± its paired standard error, in points; 'only a': "
        "images a gets right and b wrong.",
        "",
        "| a | b | accuracy a | accuracy b | a - b | only a | only b | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
        *(row(c["run"], "its frozen backbone", c) for c in result["against_backbone"]),
        *(row(c["a"], c["b"], c) for c in result["pairs"]),
    ]
    text = "\n".join(lines) + "\n"
    (out / "paired.md").write_text(text)
    print(text, end="")
    print(f"wrote {out}/paired.json and paired.md")
    return result


def model_name(run: str) -> str:
    """A run's model, as pooling matches it across seeds: its directory's name, or its parent's
    where the name is a seed (``workdirs/converged/gala/1`` and ``pretrained/s1/gala``: gala), or
    the sweep's where it is a sweep member (``W/gala/members/1``: gala)."""
    parts = Path(run).parts
    if len(parts) > 2 and parts[-1].isdigit() and parts[-2] == "members":
        return parts[-3]
    return parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def pooled(out: Path, paired_dirs: list[str]) -> dict:
    """Each difference of several ``paired`` outputs (one per seed), pooled: its value on each,
    their mean, the mean's standard error sqrt(sum se_i^2) / n (the seeds' differences taken as
    independent; they share the test images, so a correlation between them would make it
    larger) and the sd over seeds. Models are matched by ``model_name``; a difference enters
    when every output has it."""
    if len(paired_dirs) < 2:
        raise UserError("pooled needs --runs with two or more output directories of paired")
    tables = []
    for d in paired_dirs:
        path = Path(d) / "paired.json"
        if not path.exists():
            raise UserError(f"{path} does not exist: run `train.analyze paired` into {d} first")
        try:
            saved = json.loads(path.read_text())
            diffs = {
                (model_name(c["run"]), "its frozen backbone"): c for c in saved["against_backbone"]
            }
            diffs.update({(model_name(c["a"]), model_name(c["b"])): c for c in saved["pairs"]})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not an output of `train.analyze paired` ({e})") from None
        tables.append(diffs)

    def lookup(diffs, a, b):  # (difference, se), with the sign of a - b
        if (a, b) in diffs:
            return diffs[a, b]["difference"], diffs[a, b]["difference_se"]
        if (b, a) in diffs:
            return -diffs[b, a]["difference"], diffs[b, a]["difference_se"]
        return None

    rows = []
    for a, b in tables[0]:
        found = [lookup(diffs, a, b) for diffs in tables]
        if any(f is None for f in found):
            continue
        values = [v for v, _ in found]
        n = len(values)
        rows.append(
            {
                "a": a,
                "b": b,
                "differences": values,
                "mean": float(np.mean(values)),
                "se": math.sqrt(sum(se * se for _, se in found)) / n,
                "sd_over_seeds": float(np.std(values, ddof=1)),
            }
        )
    if not rows:
        raise UserError(f"{', '.join(paired_dirs)} have no models in common")
    result = {"paired": list(paired_dirs), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pooled.json").write_text(json.dumps(result, indent=2))
    heads = " | ".join(Path(d).name for d in paired_dirs)
    lines = [
        f"Differences a - b of {len(paired_dirs)} paired comparisons, in points; their mean ± its "
        "standard error, and their sd.",
        "",
        f"| a | b | {heads} | mean ± se | sd |",
        "|---|---|" + "---|" * len(paired_dirs) + "---|---|",
        *(
            f"| {r['a']} | {r['b']} | "
            + " | ".join(f"{100 * v:+.2f}" for v in r["differences"])
            + f" | {100 * r['mean']:+.2f} ± {100 * r['se']:.2f} | {100 * r['sd_over_seeds']:.2f} |"
            for r in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    (out / "pooled.md").write_text(text)
    print(text, end="")
    print(f"wrote {out}/pooled.json and pooled.md")
    return result
