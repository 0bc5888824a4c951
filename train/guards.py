"""Run-time guards of a training run; each failure is one line.

- finite training: a non-finite loss or gradient stops the run at once, naming its step (with
  ``on_nonfinite='skip'``: when every update of an epoch was skipped).

In the attention stage, GAttANet's invariants:

- alpha = 0 is the backbone: a fresh attention run whose alphas are all 0 must give the frozen
  backbone's logits (checked on one batch before training). A modulation that is not the identity
  at alpha = 0, or a second pass that runs the backbone differently from the first, fails here.
- the frozen backbone stays what it was: the backbone checkpoint's files hash the same at the
  end of the stage as when they were loaded (another run writing into that workdir would
  otherwise leave results computed against weights that no longer exist).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from gattanet_jax import site_alphas
from train import checkpoints
from train.data.augment import to_float
from train.errors import UserError


def check_alpha_zero_is_backbone(task, variables, images, dtype_name: str) -> None:
    if task.baseline_logits_fn is None or task.stage != "attention":
        return
    params = variables["params"]
    if set(params) == {"attention", "backbone"}:  # joint fine-tuning (train.finetune_task)
        params = params["attention"]
    if any(np.any(np.asarray(v) != 0) for v in site_alphas(params).values()):
        return
    x = to_float(task.place.replicate(images))
    ours = np.asarray(jax.jit(task.logits_fn)(variables, task.frozen, x), np.float32)
    base = np.asarray(jax.jit(task.baseline_logits_fn)(variables, task.frozen, x), np.float32)
    # bfloat16: the two programs round differently (one bfloat16 ulp of the largest logit is
    # 1/256 of it), so the bound scales with the logits' range
    scale = 1.0 if dtype_name == "float32" else max(1.0, float(np.max(np.abs(base))))
    tol = 1e-5 if dtype_name == "float32" else 2e-2
    if not np.allclose(ours, base, rtol=tol, atol=tol * scale):
        worst = float(np.max(np.abs(ours - base)))
        raise UserError(
            "guard failed: with every alpha = 0 the attention model must give the frozen "
            f"backbone's logits, but they differ by up to {worst:.3g} on {len(x)} images; the "
            "modulation or the second pass is wired wrongly"
        )


def check_backbone_unchanged(task) -> None:
    if task.backbone_source is None:
        return
    where, step, sha = task.backbone_source
    if step is None:  # a weights file
        intact = Path(where).is_file() and checkpoints.digest_file(where) == sha
    else:
        intact = (Path(where) / str(step)).is_dir() and checkpoints.digest(where, step) == sha
        where = f"{where}/{step}"
    if not intact:
        raise UserError(
            f"guard failed: the backbone checkpoint {where} changed or disappeared "
            "while the attention stage ran (did another run write to that workdir?); this "
            "stage's results were computed against the weights it loaded at the start"
        )


def check_finite(finite: list, first_step: int, epoch: int, ckpt, every=False) -> None:
    """Stops at the first non-finite loss or gradient, naming its step; nothing is saved.
    ``every``: the skip mode's stop, when every update of an epoch was skipped."""
    flags = np.asarray(jax.device_get(finite))
    if flags.all():
        return
    per_step = flags.reshape(len(flags), -1).all(axis=1)  # a sweep: every member finite
    step = first_step + int(np.argmin(per_step)) + 1
    last = ckpt.latest_step()
    where = f"{ckpt.directory}/{last}" if last is not None else "none yet"
    what = (
        f"every update of epoch {epoch + 1} was non-finite and skipped (from step {step})"
        if every
        else f"non-finite loss or gradient at step {step} (epoch {epoch + 1})"
    )
    raise UserError(
        f"{what}; stopped without saving anything from this epoch; last good checkpoint: {where}"
    )
