"""A workdir's config is the config of the process that started it (``config.json``): a later
process may change only what does not alter what is trained.

Safe to change on a resume or rerun (each process records its own values in ``results.json``'s
``processes``): how long and how patiently to train, how often to log, evaluate and checkpoint,
where the data lives, how non-finite updates are treated, and the hosts. Anything else (data,
model, seed, recipe, the backbone and its sha256) is refused in one line naming each changed
field and its two values.
"""

from __future__ import annotations

import json
from pathlib import Path

from train import defaults, progress
from train.errors import UserError

SAFE = (
    "backbone_training.num_epochs",
    "backbone_training.patience",
    "attention_training.num_epochs",
    "attention_training.patience",
    "log_every_steps",
    "checkpoint_every_epochs",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "dataset.data_dir",
    "on_nonfinite",
    "backbone_checkpoint",  # a path: what it holds is pinned by its sha256 (``check_backbone``)
    "distributed.",
)
PINNED = "pinned.json"  # what the config does not say: the frozen backbone's sha256


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict as {'section.field': value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _safe(field: str) -> bool:
    return any(field == s or (s.endswith(".") and field.startswith(s)) for s in SAFE)


def started(path: Path) -> bool:
    """The workdir holds a checkpoint of some process: its config is pinned."""
    return any(
        child.name.isdigit()
        for sub in ("checkpoints", "checkpoints_mid", "best")
        if (path / sub).is_dir()
        for child in (path / sub).iterdir()
    )


def check(config, path: Path) -> dict:
    """Compares ``config`` with the workdir's pinned config.json (if the run has started):
    raises UserError naming every changed field that alters what is trained; returns the safe
    changes as {field: [pinned, now]}."""
    record = path / "config.json"
    if not started(path) or not record.is_file():
        return {}
    try:
        pinned = json.loads(defaults.complete(json.loads(record.read_text())).to_json_best_effort())
    except ValueError as e:
        raise UserError(f"{record} is not a readable config ({e}); it pins this run") from None
    now = flat(json.loads(defaults.complete(config).to_json_best_effort()))
    pinned = flat(pinned)
    changed = {f: [pinned.get(f), now.get(f)] for f in sorted(set(now) | set(pinned))
               if pinned.get(f) != now.get(f)}  # fmt: skip
    unsafe = {f: v for f, v in changed.items() if not _safe(f)}
    if unsafe:
        listed = "; ".join(f"{f}: {a!r} -> {b!r}" for f, (a, b) in unsafe.items())
        raise UserError(
            f"{path} was started with another config ({record}); a resume may not change what "
            f"is trained: {listed}. Use a new workdir for a new config"
        )
    return changed


def check_backbone(path: Path, sha: str | None) -> None:
    """Pins the frozen backbone's sha256 at the first start; refuses another one later."""
    if sha is None:
        return
    record = path / PINNED
    if record.is_file() and started(path):
        pinned = json.loads(record.read_text()).get("backbone_checkpoint_sha256")
        if pinned and pinned != sha:
            raise UserError(
                f"the backbone this run trains on has changed: sha256 {pinned[:12]}... when it "
                f"started, {sha[:12]}... now; resume with the original backbone, or use a new "
                "workdir"
            )
        return
    progress.write_text(record, json.dumps({"backbone_checkpoint_sha256": sha}, indent=1))
