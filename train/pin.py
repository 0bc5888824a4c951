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
import os
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


def read_pinned(path: Path) -> dict:
    """The workdir's pinned.json ({} if there is none); one line if it is not one of ours."""
    record = path / PINNED
    try:
        pinned = json.loads(record.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(
            f"{record} is not readable ({e}): it pins this run's config and backbone; restore it "
            "or remove it (the run then checks its backbone against results.json, if any)"
        ) from None
    if not isinstance(pinned, dict):
        raise UserError(f"{record} is not a record of this project (not a JSON object)")
    return pinned


def _update_pinned(path: Path, **fields) -> None:
    pinned = read_pinned(path) | fields
    progress.write_text(path / PINNED, json.dumps(pinned, indent=1))


def record_config(path: Path, config) -> None:
    """The run's config.json, and its copy in pinned.json (each restores the other), with the
    backbones it names as paths relative to the workdir (``locate_backbone``)."""
    text = config.to_json_best_effort(indent=2)
    progress.write_text(path / "config.json", text)
    relative = {}
    if config.get("backbone_checkpoint"):
        relative["backbone_checkpoint"] = _relative(config.backbone_checkpoint, path)
    if (config.get("sweep") or {}).get("backbones"):
        relative["sweep.backbones"] = [_relative(b, path) for b in config.sweep.backbones]
    _update_pinned(path, config=json.loads(text), from_workdir=relative)


def _relative(target: str, workdir: Path) -> str:
    return os.path.relpath(os.path.abspath(os.path.expanduser(target)), os.path.abspath(workdir))


def locate_backbone(workdir: Path, recorded: str, given: str = "", index: int | None = None):
    """Where the backbone a workdir's config names is now: ``given`` (a flag that points
    elsewhere), else the place the run recorded relative to its workdir (the workdir moved or
    was copied with its backbone: ``stage=both``, the protocol's sweeps), else the path as
    recorded. None of them there: one line naming the recorded path and the flag."""
    if given:
        return given
    if not recorded:
        return recorded
    relative = read_pinned(workdir).get("from_workdir", {})
    moved = relative.get("backbone_checkpoint") if index is None else None
    if index is not None and len(relative.get("sweep.backbones", ())) > index:
        moved = relative["sweep.backbones"][index]
    moved = moved and os.path.normpath(Path(workdir) / moved)
    if moved and moved == os.path.normpath(os.path.abspath(os.path.expanduser(recorded))):
        moved = None  # the same place
    for candidate in ([moved] if moved else []) + [recorded]:
        if Path(candidate).expanduser().exists():
            return candidate
    raise UserError(
        f"the frozen backbone of {workdir} is not where the run recorded it: {recorded}"
        + (f" (nor at {moved}, its place relative to the workdir)" if moved else "")
        + "; pass its place now with --backbone_checkpoint"
    )


def check(config, path: Path) -> dict:
    """Compares ``config`` with the workdir's pinned config.json (if the run has started):
    raises UserError naming every changed field that alters what is trained; returns the safe
    changes as {field: [pinned, now]}. A lost config.json is checked against its copy in
    pinned.json and written again; with neither, a started run is refused."""
    record = path / "config.json"
    if not started(path):
        return {}
    copy = read_pinned(path).get("config")
    if record.is_file():
        try:
            written = json.loads(record.read_text())
        except ValueError as e:
            raise UserError(f"{record} is not a readable config ({e}); it pins this run") from None
        if not isinstance(written, dict):
            raise UserError(f"{record} is not a config of this project (not a JSON object)")
    elif isinstance(copy, dict):
        written = copy
    else:
        raise UserError(
            f"{record} is missing, and nothing else in {path} records the config this run "
            "started with (it pins what is trained): restore it, or use a new workdir"
        )
    pinned = json.loads(defaults.complete(written).to_json_best_effort())
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
    if not record.is_file():
        progress.write_text(record, json.dumps(written, indent=2))
        progress.log(f"note: {record} was missing: written again from its copy in {PINNED}")
    elif copy is None:  # a workdir from before the copy: it gets one now
        _update_pinned(path, config=written)
    return changed


def check_backbone(path: Path, sha: str | None) -> None:
    """Pins the frozen backbone's sha256 at the first start; refuses another one later. Where
    pinned.json lost it, a run with results is checked against the sha256 its results.json
    records before the pin is written again."""
    if sha is None:
        return
    if started(path):
        pinned = read_pinned(path).get("backbone_checkpoint_sha256")
        where = f"when it started ({PINNED})"
        if not pinned:
            pinned, where = _recorded_backbone(path), "in its results.json"
        if pinned and pinned != sha:
            raise UserError(
                f"the backbone this run trains on has changed: sha256 {pinned[:12]}... {where}, "
                f"{sha[:12]}... now; resume with the original backbone, or use a new workdir"
            )
        if pinned:
            _update_pinned(path, backbone_checkpoint_sha256=sha)
            return
        progress.log(
            f"note: {path / PINNED} did not pin the backbone and no result records it: pinned "
            "now to the one given"
        )
    _update_pinned(path, backbone_checkpoint_sha256=sha)


def _recorded_backbone(path: Path) -> str | None:
    try:
        results = json.loads((path / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results.get("backbone_checkpoint_sha256") if isinstance(results, dict) else None
