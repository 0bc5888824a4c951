"""What the analyses share: the outputs of a trained model and its frozen backbone over test
images (noisy, lesioned, with internals), accuracy, and how results and figures are written."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from gattanet_jax import two_pass
from train.data.augment import to_float
from train.tools import plots
from train.tools.trained import Trained

DEFAULT_CUE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# 0, then a log grid up to 0.25 (images in [0, 1]), as in Figures 2a and 4a.
DEFAULT_SIGMAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.25)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batch_outputs(
    backbone, attention, internals, variables, bvars, base_vars, images, mask, sigma, key
):
    x = to_float(images)
    x = x + sigma * jax.random.normal(key, x.shape, x.dtype)  # additive, not clipped
    out = two_pass(
        backbone, attention, variables, bvars, x, lesion=mask, return_internals=internals
    )
    base = backbone.apply(base_vars, x, train=False)
    extra = (out.attention.q_avg, out.attention.gatta) if internals else None
    return out.logits, base, extra


def outputs(m: Trained, images, *, sigma=0.0, mask=None, seed=0, internals=False, batch=500):
    """(attention logits, baseline logits[, (q_avg, gatta)]) over ``images``, in batches padded to
    one shape (one compilation). The noise of image i depends on (seed, i) only, and the two
    models see the same noisy image."""
    n = len(images)
    mask = jnp.ones(len(m.attention.sites)) if mask is None else jnp.asarray(mask, jnp.float32)
    pieces = []
    for start in range(0, n, batch):
        chunk = images[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        key = jax.random.fold_in(jax.random.key(seed), start)
        res = _batch_outputs(
            m.backbone,
            m.attention,
            internals,
            m.variables,
            m.backbone_vars,
            m.baseline_vars,
            chunk,
            mask,
            jnp.float32(sigma),
            key,
        )
        pieces.append(jax.tree.map(lambda a, k=batch - pad: np.asarray(a)[:k], res))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == labels))


def figure_title(m: Trained) -> str:
    """What the figures show: the model and the data, never a workdir's name."""
    c = m.config
    backbone = "toy CNN" if c.model.backbone == "toy" else c.model.backbone
    return f"GAttANet d={c.attention.d} on a frozen {backbone}, {c.dataset.name} test set"


def write_result(m: Trained, name: str, result: dict, figure) -> None:
    result = dict(result, workdir=str(m.workdir), figure=f"{name}.png")
    (m.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    figure.savefig(m.out / f"{name}.png", dpi=110, bbox_inches="tight")
    plots.close(figure)
    print(f"wrote {m.out / name}.png and {name}.json")
