"""Lesions: accuracy with sites removed from the attention system (Figure 2b)."""

from __future__ import annotations

import numpy as np

from gattanet_jax.sites import lesion_mask, lesion_string
from train.errors import UserError
from train.tools import plots
from train.tools.analyses.common import accuracy, figure_title, outputs, write_result
from train.tools.trained import Trained


def default_lesions(sites) -> list[str]:
    """The full model, every single-site removal, every single-site-only model, no site."""
    n = len(sites)
    masks = [[True] * n]
    masks += [[j != i for j in range(n)] for i in range(n)]
    masks += [[j == i for j in range(n)] for i in range(n)]
    masks.append([False] * n)
    return [lesion_string(mk, sites) for mk in masks]


def lesion(m: Trained, lesions=None) -> dict:
    sites = m.attention.sites
    lesions = list(lesions or default_lesions(sites))
    base_acc = None
    rows = []
    for name in lesions:
        try:
            mask = np.asarray(lesion_mask(name, sites), np.float32)
        except ValueError as e:
            raise UserError(str(e)) from None
        att, base, _ = outputs(m, m.test.images, mask=mask)
        base_acc = accuracy(base, m.test.labels)
        rows.append({"lesion": name, "accuracy": accuracy(att, m.test.labels)})
        print(f"{name}  {rows[-1]['accuracy']:.4f}", flush=True)
    result = {"test_examples": len(m.test), "baseline_accuracy": base_acc, "rows": rows}
    accs = [[r["accuracy"] for r in rows]]
    write_result(m, "lesion", result, plots.lesion(lesions, accs, [base_acc], figure_title(m)))
    return result
