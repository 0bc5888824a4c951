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


def results(monitor: str, restore: str, best: float, validation: str) -> dict:
    """results.json's record of the selection: what was watched, its best value, which weights
    were kept and what they were selected on."""
    record = {"monitor": monitor, "restore": restore}
    if monitor == "val_accuracy":
        record["best_validation_accuracy"] = best
    else:
        record["best_validation_loss"] = -best
    record["selected_on"] = "test" if validation == "test" else "held-out validation"
    return record
