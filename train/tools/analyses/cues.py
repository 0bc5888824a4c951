"""Top-down cues: accuracy with the true class cued, a wrong class cued, and uncued."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gattanet_jax import two_pass
from train.data.augment import to_float
from train.errors import UserError
from train.tools import plots
from train.tools.analyses.common import (
    DEFAULT_CUE_WEIGHTS,
    accuracy,
    figure_title,
    outputs,
    write_result,
)
from train.tools.trained import Trained


@functools.partial(jax.jit, static_argnums=(0, 1))
def _cued_logits(backbone, attention, variables, bvars, images, cue, weight):
    out = two_pass(
        backbone, attention, variables, bvars, to_float(images), cue=cue, cue_weight=weight
    )
    return out.logits


def wrong_classes(labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """A uniformly drawn class other than the true one, per example (fixed by ``seed``)."""
    shift = np.random.default_rng(seed).integers(1, num_classes, size=len(labels))
    return (labels + shift) % num_classes


def cues(m: Trained, weights=DEFAULT_CUE_WEIGHTS, seed: int = 0, batch: int = 500) -> dict:
    """Test accuracy with the true class cued, a wrong class cued, and uncued, per cue weight."""
    if not m.attention.cue_classes:
        raise UserError(
            f"{m.workdir} was trained without top-down cues (config.attention.cue_classes=False)"
        )
    labels = np.asarray(m.test.labels)
    wrong = wrong_classes(labels, m.attention.cue_classes, seed)
    att, base, _ = outputs(m, m.test.images)
    uncued, base_acc = accuracy(att, labels), accuracy(base, labels)

    def acc(cue, w):
        pieces = []
        for start in range(0, len(labels), batch):
            chunk, c = m.test.images[start : start + batch], cue[start : start + batch]
            pad = batch - len(chunk)
            if pad:  # one shape, one compilation
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                c = np.concatenate([c, np.repeat(c[-1:], pad)])
            logits = _cued_logits(
                m.backbone, m.attention, m.variables, m.backbone_vars, chunk, c, jnp.float32(w)
            )
            pieces.append(np.asarray(logits)[: batch - pad])
        return accuracy(np.concatenate(pieces), labels)

    rows = []
    for w in weights:
        rows.append(
            {
                "weight": float(w),
                "true_cue_accuracy": acc(labels, w),
                "wrong_cue_accuracy": acc(wrong, w),
                "uncued_accuracy": uncued,
            }
        )
        r = rows[-1]
        print(
            f"weight {w:<5g} true cue {r['true_cue_accuracy']:.4f} wrong cue "
            f"{r['wrong_cue_accuracy']:.4f} uncued {uncued:.4f}",
            flush=True,
        )
    result = {"test_examples": len(labels), "baseline_accuracy": base_acc, "rows": rows}
    write_result(m, "cues", result, plots.cues(rows, base_acc, figure_title(m)))
    return result
