"""A trained attention workdir, loaded for the analyses: its config (with today's defaults), the
frozen backbone it names, its best attention variables and its test split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from train import checkpoints, defaults, models, pin
from train.data import input_pipeline
from train.data.augment import to_float
from train.errors import UserError


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained attention workdir, loaded."""

    workdir: Path
    config: ml_collections.ConfigDict
    backbone: object
    attention: object
    backbone_vars: dict
    variables: dict  # the attention system's: {'params': ..., and 'batch_stats' if it has them}
    test: input_pipeline.Split
    class_names: tuple[str, ...]
    results: dict
    baseline_vars: dict  # the frozen backbone before any fine-tuning (else = backbone_vars)

    @property
    def out(self) -> Path:
        path = self.workdir / "analysis"
        path.mkdir(exist_ok=True)
        return path


def read_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir} is not a training workdir (no config.json)")
    return defaults.complete(json.loads(path.read_text()))


def _analysis_config(
    path: Path, data_dir: str, max_examples: int, backbone: str = ""
) -> ml_collections.ConfigDict:
    """The workdir's config, reading its test split from ``data_dir`` (if given), its first
    ``max_examples`` images only (if given), its frozen backbone where it is now
    (``pin.locate_backbone``; ``backbone``: given elsewhere)."""
    config = read_config(path)
    config.backbone_checkpoint = pin.locate_backbone(path, config.backbone_checkpoint, backbone)
    if data_dir:
        config.dataset.data_dir = data_dir
    if max_examples:
        config.dataset.max_test_examples = max_examples
    return config


def _best_variables(path: Path, task, what: str) -> dict:
    """The variables of the workdir's best checkpoint, restored into the shapes of ``task``."""
    from train import steps

    abstract = jax.eval_shape(lambda: steps.variables({"params": task.params, "extra": task.extra}))
    directory, step = checkpoints.find_model_checkpoint(str(path))
    mngr = checkpoints.manager(directory, keep=1, create=False)
    return checkpoints.restore(mngr, step, {"variables": abstract}, what)["variables"]


def _results(path: Path) -> dict:
    """The workdir's results.json ({} before the run has finished)."""
    record = path / "results.json"
    return json.loads(record.read_text()) if record.is_file() else {}


def load(workdir: str, data_dir: str = "", max_examples: int = 0, backbone: str = "") -> Trained:
    from train.tasks import attention_task, split_finetuned  # the same loading as training

    path = Path(workdir)
    config = _analysis_config(path, data_dir, max_examples, backbone)
    if config.stage != "attention":
        raise UserError(
            f"{path} holds a {config.stage!r} stage; analyses need an attention workdir "
            "(for stage=both, pass <workdir>/attention)"
        )
    backbone = models.build_backbone(config)
    task = attention_task(config, backbone, jax.random.key(0))
    checkpoints.check_recorded_backbone(_results(path), task.backbone_source[2], str(path))
    variables = _best_variables(path, task, "attention checkpoint")
    baseline_vars = backbone_vars = task.frozen["backbone"]
    if config.attention_training.finetune_backbone:
        variables, backbone_vars = split_finetuned(variables, task.frozen)
    attention = models.build_attention(config, backbone, backbone_vars)
    if config.dataset.pipeline != "memory":
        raise UserError(
            "the analyses read the test split into memory; they are not available for streamed "
            f"datasets (config.dataset.pipeline={config.dataset.pipeline!r}) yet"
        )
    data = input_pipeline.load(config, models.image_shape(config))
    results = _results(path)
    return Trained(
        path,
        config,
        backbone,
        attention,
        backbone_vars,
        variables,
        data.test,
        data.class_names,
        results,
        baseline_vars,
    )


def addon_logits(workdir: str, data_dir: str = "", max_examples: int = 0, batch: int = 500):
    """(test labels, logits, the frozen backbone's logits) of a comparison system's workdir (GALA,
    SE or GSA added to a frozen backbone: what ``train.compare`` trains), from its best
    checkpoint, with the loading of training."""
    from train.addon_tasks import addon_task

    path = Path(workdir)
    config = _analysis_config(path, data_dir, max_examples)
    if config.stage != "addon" or config.addon.from_scratch or config.dataset.pipeline != "memory":
        raise UserError(
            f"{path} is not an add-on to a frozen backbone with an in-memory test split "
            f"(stage {config.stage!r}); expected a workdir of train.compare"
        )
    backbone = models.build_backbone(config)
    task = addon_task(config, backbone, jax.random.key(0))
    if task.backbone_source:
        checkpoints.check_recorded_backbone(_results(path), task.backbone_source[2], str(path))
    variables = _best_variables(path, task, "add-on checkpoint")
    test = input_pipeline.load(config, models.image_shape(config)).test

    @jax.jit
    def both(variables, frozen, images):
        x = to_float(images)
        return task.logits_fn(variables, frozen, x), task.baseline_logits_fn(None, frozen, x)

    pieces = [
        both(variables, task.frozen, test.images[i : i + batch]) for i in range(0, len(test), batch)
    ]
    logits, base = (np.concatenate([np.asarray(p[k]) for p in pieces]) for k in (0, 1))
    return np.asarray(test.labels), logits, base
