"""A run's per-epoch record, ``<workdir>/history.jsonl``: one JSON line per epoch with the
epoch's training means, its validation, and the test split's accuracy and loss where the recipe
asks for them (``<stage>_training.test_each_epoch``, for analyses of the selection rule; never
used to select). ``train.analyze selection`` replays early-stopping rules on it.

Written by process 0 at the end of each epoch; a resumed run first drops the epochs after the
checkpoint it resumed from, so the file always describes the trajectory the run is on.
"""

from __future__ import annotations

import json
from pathlib import Path

from train import progress
from train.errors import UserError

NAME = "history.jsonl"


def record(epoch: int, train: dict, val: dict, test: dict | None = None) -> dict:
    """One epoch's line: its training means, validation and (if recorded) test, each a dict of
    'loss' and 'accuracy'."""
    splits = {"train": train, "val": val} | ({"test": test} if test else {})
    return {"epoch": int(epoch)} | {
        f"{split}_{key}": float(values[key])
        for split, values in splits.items()
        for key in ("loss", "accuracy")
    }


def append(workdir: Path, record: dict) -> None:
    if progress.is_main():
        with open(Path(workdir) / NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


def keep_until(workdir: Path, epoch: int) -> None:
    """Drops the records of epochs after ``epoch`` (those of a trajectory the run left)."""
    path = Path(workdir) / NAME
    if not progress.is_main() or not path.exists():
        return
    try:
        records = read(workdir)
    except UserError as e:  # a log, not the run's state: set aside, the run goes on
        aside = path.with_name(NAME + ".damaged")
        path.replace(aside)
        progress.log(f"note: {e}: set aside as {aside}; the epochs from now on are recorded anew")
        return
    kept = [r for r in records if r["epoch"] <= epoch]
    tmp = path.with_name(NAME + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def read(workdir: Path) -> list[dict]:
    """The records, one per epoch in order (the last written for an epoch written twice)."""
    path = Path(workdir) / NAME
    if not path.exists():
        raise UserError(f"{workdir} has no {NAME} (a run trained before the file existed?)")
    by_epoch, lines = {}, path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError):
            if n == len(lines):  # a line cut by a crash: the last
                continue
            raise UserError(f"{path}: line {n} is not an epoch record") from None
    return [by_epoch[e] for e in sorted(by_epoch)]
