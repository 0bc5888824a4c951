"""What early stopping watches and which weights a stage keeps (``<stage>_training.monitor`` and
``.restore``).

The early-stopping record ``meta`` keeps the best monitored value as a score where higher is
better: the validation accuracy, or minus the validation loss.
"""

from __future__ import annotations

MONITORS = ("val_accuracy", "val_loss")  # Keras' EarlyStopping watches 'val_loss' by default
RESTORES = ("best", "last")  # Keras keeps the last weights unless restore_best_weights=True


def score(monitor: str, val: dict) -> float:
    """The monitored value of one validation, higher is better."""
    return float(val["accuracy"]) if monitor == "val_accuracy" else -float(val["loss"])


def update(meta: dict, val: dict, monitor: str, patience: int) -> bool:
    """Counts one epoch's validation into ``meta`` (``epoch`` already counts it): the best score,
    the epochs without improvement, and whether early stopping ends the run. Returns whether the
    monitored value improved (the first epoch always does)."""
    value = score(monitor, val)
    improved = meta["epoch"] == 1 or value > meta["best_val"]
    if improved:
        meta["best_val"], meta["bad_epochs"] = value, 0
    else:
        meta["bad_epochs"] += 1
    meta["done"] = meta["done"] or meta["bad_epochs"] >= patience
    return improved


def keeps(restore: str, improved: bool) -> bool:
    """Whether this epoch's weights replace the stage's result (``best/``)."""
    return improved or restore == "last"


HELD_OUT, TEST, TRAINING = "held-out validation", "test", "training data"
CAVEATS = {  # what the final line adds to a result so selected
    TEST: "selected on the test set: not a held-out figure",
    TRAINING: "selected on the training data: there is no validation split",
}


def selected_on(validation: str, validation_size: int) -> str:
    """The split that chose a run's epoch and stopped it, from the data it actually used:
    the test split (``dataset.validation='test'``), the held-out part of the training split, or,
    with none held out (``validation_fraction=0``), the training data itself."""
    if validation == "test":
        return TEST
    return HELD_OUT if validation_size else TRAINING


def recorded(results: dict) -> str:
    """The split that chose a recorded result's epoch (a record from before the field: held-out
    validation, the only selection there was then)."""
    return results.get("selected_on", HELD_OUT)


def results(monitor: str, restore: str, best: float, selected: str) -> dict:
    """results.json's record of the selection: what was watched, its best value, which weights
    were kept and the split they were selected on (``selected_on``)."""
    record = {"monitor": monitor, "restore": restore}
    if monitor == "val_accuracy":
        record["best_validation_accuracy"] = best
    else:
        record["best_validation_loss"] = -best
    record["selected_on"] = selected
    return record


def replay(history: list[dict], monitor: str, restore: str, patience: int,
           num_epochs: int) -> dict | None:  # fmt: skip
    """What a run on this trajectory would have kept with another rule, computed with the run's
    own ``update`` and ``keeps`` on the recorded validations: ``{'stop_epoch', 'epoch',
    'early_stopped'}`` (``epoch`` is the one whose weights are kept). None where the rule had not
    yet stopped when the history ends before ``num_epochs`` (the run stopped earlier)."""
    meta = {"epoch": 0, "best_val": -1.0, "bad_epochs": 0, "done": False}
    kept = None
    for record in history:
        meta["epoch"] = record["epoch"]
        val = {"accuracy": record["val_accuracy"], "loss": record["val_loss"]}
        if keeps(restore, update(meta, val, monitor, patience)):
            kept = record["epoch"]
        if meta["done"] or meta["epoch"] == num_epochs:
            return {"stop_epoch": meta["epoch"], "epoch": kept, "early_stopped": meta["done"]}
    return None
