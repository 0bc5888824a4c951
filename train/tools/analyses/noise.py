"""Accuracy under additive Gaussian noise, with and without attention (Figures 2a and 4a)."""

from __future__ import annotations

from train.tools import plots
from train.tools.analyses.common import (
    DEFAULT_SIGMAS,
    accuracy,
    figure_title,
    outputs,
    write_result,
)
from train.tools.trained import Trained


def noise(m: Trained, sigmas=DEFAULT_SIGMAS, seed: int = 0) -> dict:
    rows = []
    for sigma in sigmas:
        att, base, _ = outputs(m, m.test.images, sigma=sigma, seed=seed)
        rows.append(
            {
                "sigma": float(sigma),
                "baseline_accuracy": accuracy(base, m.test.labels),
                "attention_accuracy": accuracy(att, m.test.labels),
            }
        )
        print(
            f"sigma {sigma:<6g} baseline {rows[-1]['baseline_accuracy']:.4f} "
            f"attention {rows[-1]['attention_accuracy']:.4f}",
            flush=True,
        )
    result = {"test_examples": len(m.test), "noise_seed": seed, "rows": rows}
    base, att = ([[r[k] for r in rows]] for k in ("baseline_accuracy", "attention_accuracy"))
    write_result(m, "noise", result, plots.noise(list(sigmas), base, att, figure_title(m)))
    return result
