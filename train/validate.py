"""Checks of a config and a workdir before any work starts: each problem is one clear line.

Overrides on the command line are type-checked by ml_collections already (``--config.attention.d=
abc`` is refused while parsing); these checks also catch values written into a config file.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from gattanet_jax.backbones.toy import DROPOUT_PLACES
from train import models
from train.errors import UserError
from train.models import ADDON_KINDS, APIS, BACKBONES, DTYPES
from train.precision import PRECISIONS
from train.selection import MONITORS, RESTORES

STAGES = ("backbone", "attention", "both", "addon")
GATES = ("direct", "residual")
SQUASHES = ("tanh", "sigmoid")
NONFINITE = ("stop", "skip")
PIPELINES = ("memory", "imagenet")
Q_AVG_SOURCES = ("own", "learned", "shifted")
VALIDATIONS = ("held_out", "test")
KERNEL_INITS = ("flax", "keras")
PARALLEL_MODES = ("none", "jit", "pmap")


def _fail(field: str, want: str, value) -> None:
    raise UserError(f"config.{field} must be {want}, got {value!r}")


def _positive_int(config, field: str, least: int = 1) -> None:
    v = config[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        _fail(field, "a positive integer" if least == 1 else f"an integer >= {least}", v)


def _number(config, field: str, low: float, high: float, high_open=False, low_open=False):
    v = config[field]
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        _fail(field, "a number", v)
    if not math.isfinite(v):
        _fail(field, "a finite number", v)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        _fail(field, f"in {lo}{low}, {high}{hi}", v)


def _choice(config, field: str, choices: tuple[str, ...]) -> None:
    if config[field] not in choices:
        _fail(field, f"one of {choices}", config[field])


class _Flat:
    """config['a.b'] for nested ConfigDicts, so messages name the full field."""

    def __init__(self, config):
        self._config = config

    def __getitem__(self, dotted: str):
        node = self._config
        for part in dotted.split("."):
            node = node[part]
        return node


def _finite_everywhere(tree, prefix: str = "") -> None:
    """Every number of the config is finite (a NaN passes every range check)."""
    for key, value in tree.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict):
            _finite_everywhere(value, f"{field}.")
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                _fail(field, "finite", value)


def check_config(config) -> None:
    """Raises UserError naming the first field with a bad type or value."""
    _finite_everywhere(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    c = _Flat(config)
    _choice(c, "stage", STAGES)
    _choice(c, "parallel", PARALLEL_MODES)
    _choice(c, "on_nonfinite", NONFINITE)
    _positive_int(c, "seed", least=0)
    for field in (
        "dataset.num_classes",
        "attention.d",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "eval_batch_size",
        "log_every_steps",
    ):
        _positive_int(c, field)
    _number(c, "dataset.validation_fraction", 0.0, 1.0, high_open=True)
    _choice(c, "dataset.validation", VALIDATIONS)
    if c["dataset.jpeg_quality"] != 0:
        _number(c, "dataset.jpeg_quality", 1, 95)
        _positive_int(c, "dataset.jpeg_quality")
    _number(c, "attention.dropout_rate", 0.0, 1.0, high_open=True)
    _number(c, "attention.alpha_init", -1e6, 1e6)
    _choice(c, "model.backbone", BACKBONES)
    _choice(c, "model.api", APIS)
    _choice(c, "model.dtype", tuple(DTYPES))
    _choice(c, "model.precision", PRECISIONS)
    if c["model.backbone"] == "toy":
        _positive_int(c, "model.hidden")
        _number(c, "model.dropout_rate", 0.0, 1.0, high_open=True)
        _positive_ints(c, "model.features")
        _choice(c, "model.kernel_init", KERNEL_INITS)
        _choice(c, "model.dropout_after", DROPOUT_PLACES)
        _number(c, "model.pixel_scale", 0.0, 1e6, low_open=True)
    else:
        _positive_int(c, "model.width")
        if c["model.stage_sizes"]:
            _positive_ints(c, "model.stage_sizes", length=4)
    for field in ("attention.batch_norm_kq", "attention.layer_norm_gatta"):
        if not isinstance(c[field], bool):
            _fail(field, "True or False", c[field])
    _check_attention(c, config)
    _positive_int(c, "checkpoint_every_steps", least=0)
    _check_addon(c)  # every stage: a wrong value is a mistake even where it is not used
    _check_types(c)
    _choice(c, "dataset.pipeline", PIPELINES)
    if c["dataset.pipeline"] == "imagenet":
        if c["dataset.jpeg_quality"] != 0:
            _fail("dataset.jpeg_quality", "0 for the imagenet pipeline", c["dataset.jpeg_quality"])
        _positive_int(c, "dataset.workers")
        shape = tuple(c["dataset.image_shape"])
        if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
            _fail("dataset.image_shape", "(size, size, 3) for the imagenet pipeline", shape)
        _positive_int(c, "dataset.resize", least=shape[0])
    sites = c["model.sites"]
    if (
        not isinstance(sites, list | tuple)
        or not sites
        or not all(isinstance(s, str) and s for s in sites)
    ):
        _fail("model.sites", "a non-empty tuple of module paths", sites)
    for stage in ("backbone_training", "attention_training"):
        for field in ("batch_size", "num_epochs", "patience"):
            _positive_int(c, f"{stage}.{field}")
        _number(c, f"{stage}.learning_rate", 0.0, float("inf"), low_open=True)
        _number(c, f"{stage}.weight_decay", 0.0, float("inf"))
        if not isinstance(c[f"{stage}.augment"], bool):
            _fail(f"{stage}.augment", "True or False", c[f"{stage}.augment"])
        _choice(c, f"{stage}.monitor", MONITORS)
        _choice(c, f"{stage}.restore", RESTORES)
        if not isinstance(c[f"{stage}.test_each_epoch"], bool):
            _fail(f"{stage}.test_each_epoch", "True or False", c[f"{stage}.test_each_epoch"])


def check_before_work(config) -> None:
    """Every check a run makes, made before it reads data or compiles: the config's values, and
    where an attention system will be trained (stage 'attention', and the second stage of
    'both'), its sites, d and lesion against the backbone's shapes."""
    from gattanet_jax import sites as sites_lib

    check_config(config)
    if config.stage not in ("attention", "both"):
        return
    try:
        backbone = models.build_backbone(config)
        attention = models.attention_from_shapes(config, backbone)
        sites_lib.lesion_mask(config.attention.lesion or None, attention.sites)
    except ValueError as e:
        raise UserError(f"config.attention.lesion: {e}") from None


def _check_attention(c, config) -> None:
    """The attention system's fields and its training recipe's beyond-the-paper ones."""
    a = config.attention
    _positive_int(c, "attention.iterations")
    _positive_int(c, "attention.heads")
    for field in ("attention.bounded", "attention.cue_classes"):
        if not isinstance(c[field], bool):
            _fail(field, "True or False", c[field])
    _number(c, "attention.cue_weight", 0.0, 1.0)
    _choice(c, "attention.q_avg_source", Q_AVG_SOURCES)
    _number(c, "attention.cue_fraction", 0.0, 1.0)
    t = config.attention_training
    if not isinstance(t.finetune_backbone, bool):
        _fail("attention_training.finetune_backbone", "True or False", t.finetune_backbone)
    _number(c, "attention_training.backbone_learning_rate", 0.0, 10.0)
    _choice(c, "attention_training.backbone_batch_stats", ("frozen", "update"))
    if c["attention.cue_fraction"] > 0 and not c["attention.cue_classes"]:
        _fail("attention.cue_fraction", "0 without attention.cue_classes=True", a.cue_fraction)


def _check_addon(c) -> None:
    """The comparison system's fields (stage 'addon')."""
    _choice(c, "addon.kind", ADDON_KINDS)
    _choice(c, "addon.squash", SQUASHES)
    _choice(c, "addon.gate", GATES)
    _positive_int(c, "addon.reduction")
    _positive_int(c, "addon.heads")
    if not isinstance(c["addon.from_scratch"], bool):
        _fail("addon.from_scratch", "True or False", c["addon.from_scratch"])
    sites = c["addon.sites"]
    if (
        not isinstance(sites, list | tuple)
        or not sites
        or not all(isinstance(s, str) and s for s in sites)
    ):
        _fail("addon.sites", "a non-empty tuple of module paths", c["addon.sites"])


def _check_types(c) -> None:
    """The fields no range check above covers: strings, flags, sizes and the sweep's lists."""
    for field in ("backbone_checkpoint", "dataset.data_dir", "distributed.coordinator_address"):
        if not isinstance(c[field], str):
            _fail(field, "a string (a path; '' for none)", c[field])
    if not isinstance(c["dataset.name"], str) or not c["dataset.name"]:
        _fail("dataset.name", "a dataset name", c["dataset.name"])
    for field in ("smoke", "distributed.auto"):
        if not isinstance(c[field], bool):
            _fail(field, "True or False", c[field])
    for field in ("dataset.max_train_examples", "dataset.max_test_examples"):
        _positive_int(c, field, least=0)
    _positive_ints(c, "dataset.image_shape", length=3)
    _positive_int(c, "distributed.num_processes")
    _positive_int(c, "distributed.process_id", least=0)
    if not isinstance(c["attention.lesion"], str | None):
        _fail("attention.lesion", "a lesion string ('' for none)", c["attention.lesion"])
    sweeps = {
        "sweep.seeds": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "sweep.learning_rates": lambda v: _is_number(v) and 0 < v < float("inf"),
        "sweep.alpha_inits": lambda v: _is_number(v) and math.isfinite(v),
        "sweep.lesions": lambda v: isinstance(v, str),
        "sweep.backbones": lambda v: isinstance(v, str) and v,
    }
    for field, good in sweeps.items():
        v = c[field]
        if not isinstance(v, list | tuple) or not all(good(x) for x in v):
            _fail(field, "a list of per-member values (empty: none)", v)
    if c["sweep.layout"] not in ("auto", "vmap", "loop"):
        _fail("sweep.layout", "'auto', 'vmap' or 'loop'", c["sweep.layout"])


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _positive_ints(config, field: str, length: int | None = None) -> None:
    v = config[field]
    if not isinstance(v, list | tuple):
        _fail(field, "a tuple of positive integers", v)
    ok = v and all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in v)
    if not ok or (length is not None and len(v) != length):
        count = f"{length} " if length else ""
        _fail(field, f"a tuple of {count}positive integers", v)


def unused(config) -> dict[str, str]:
    """The fields (exact names, or sections ending in '.') that this config's stage and modes
    do not read, each with what it is for instead."""
    stage, out = config.stage, {}
    finetune = stage in ("attention", "both") and config.attention_training.finetune_backbone
    scratch = stage == "addon" and config.addon.from_scratch
    toy = config.model.backbone == "toy"
    if stage in ("backbone", "both") or scratch:
        out["backbone_checkpoint"] = (
            "the frozen backbone of stage 'attention' or 'addon'; stage 'both' trains its own"
        )
    if stage in ("backbone", "addon"):
        out["attention."] = "GAttANet's attention system (stage 'attention' or 'both')"
        out["model.sites"] = "GAttANet's sites (stage 'attention' or 'both'; add-ons: addon.sites)"
        out["sweep.alpha_inits"] = out["sweep.lesions"] = "attention sweeps"
    if stage != "addon":
        out["addon."] = "the comparison systems (stage 'addon')"
    if stage == "backbone" or scratch:
        out["attention_training."] = "the recipe of training on a frozen backbone"
    if stage in ("attention", "addon") and not scratch:
        out["backbone_training."] = "the recipe of training a backbone (stage 'backbone')"
        if toy:
            out["model.kernel_init"] = "initialising a backbone that trains from scratch"
            if not finetune:  # a frozen backbone runs without its dropout
                out["model.dropout_rate"] = "the dropout of a backbone that trains"
                out["model.dropout_after"] = "the dropout of a backbone that trains"
    if stage in ("attention", "both") and not finetune:
        for field in ("backbone_learning_rate", "backbone_batch_stats"):
            out[f"attention_training.{field}"] = (
                "joint fine-tuning (attention_training.finetune_backbone=True)"
            )
    if stage in ("attention", "both") and not config.attention.cue_classes:
        out["attention.cue_weight"] = "top-down cues (attention.cue_classes=True)"
    if stage == "addon":
        kind = config.addon.kind
        if kind != "gala":
            out["addon.squash"] = "GALA (addon.kind='gala')"
        if kind not in ("gala", "se"):
            out["addon.gate"] = "GALA and SE"
        if kind not in ("gsa", "gsa_conv"):
            out["addon.heads"] = "GSA (addon.kind='gsa' or 'gsa_conv')"
        if kind == "gsa_conv":
            out["addon.reduction"] = "GALA, SE and the residual GSA"
    if not _sweeping(config):
        out["sweep.layout"] = "sweeps (a non-empty list in config.sweep)"
    if config.dataset.pipeline == "memory":
        for field in ("workers", "resize", "test_split"):
            out[f"dataset.{field}"] = "the streamed ImageNet pipeline (dataset.pipeline='imagenet')"
    return out


def _sweeping(config) -> bool:
    sweep = config.get("sweep") or {}
    return any(sweep.get(k) for k in ("seeds", "learning_rates", "alpha_inits", "lesions",
                                       "backbones"))  # fmt: skip


def check_overrides(config, fields) -> None:
    """Refuses, in one line, a field set on the command line that this config's stage and modes
    do not read (it would be ignored)."""
    rules = unused(config)
    for field in sorted(fields):
        for pattern, purpose in rules.items():
            if field == pattern or (pattern.endswith(".") and field.startswith(pattern)):
                raise UserError(
                    f"config.{field} is not used by stage={config.stage!r} with this config "
                    f"(it is for {purpose}): remove --config.{field}"
                )


def prepare_workdir(workdir: str) -> Path:
    """Creates ``workdir`` and proves it is writable before any training starts."""
    if not workdir:
        raise UserError("--workdir is empty; give a directory for checkpoints and results")
    path = Path(workdir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"  # one per process: hosts share workdirs
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"workdir {path} is not writable: {e.strerror or e}") from None
    return path


def recipe_name(config) -> str:
    """The config section of the stage's training recipe."""
    scratch = config.stage == "addon" and config.addon.from_scratch
    return "backbone_training" if config.stage == "backbone" or scratch else "attention_training"


def check_sweep(config) -> None:
    """What a sweep (config.sweep) needs of the rest of the config."""
    s, stage = config.sweep, config.stage
    if stage not in ("backbone", "attention", "addon"):
        raise UserError(
            "config.sweep trains one stage: needs stage 'backbone', 'attention' or 'addon', got "
            f"{stage!r} (run the backbone sweep, then the attention sweep on its members)"
        )
    if config.parallel != "none":
        raise UserError("config.sweep runs on one device: set config.parallel='none'")
    if s.get("layout", "auto") not in ("auto", "vmap", "loop"):
        raise UserError(f"config.sweep.layout must be 'auto', 'vmap' or 'loop', got {s.layout!r}")
    for key in ("alpha_inits", "lesions"):
        if s.get(key) and stage != "attention":
            raise UserError(f"config.sweep.{key} is for the attention stage, not {stage!r}")
    frozen = stage == "attention" or (stage == "addon" and not config.addon.from_scratch)
    if s.get("backbones") and not frozen:
        raise UserError(
            "config.sweep.backbones gives each member a frozen backbone: for the attention "
            f"stage or an add-on to a frozen backbone, not {stage!r}"
        )
    if stage == "attention" and config.attention_training.finetune_backbone:
        raise UserError(
            "config.sweep trains attention systems on a frozen backbone: set "
            "config.attention_training.finetune_backbone=False"
        )
    name = recipe_name(config)
    t = config[name]
    if (t.monitor, t.restore) != ("val_accuracy", "best"):
        raise UserError(
            "config.sweep selects each member's best validation accuracy: set "
            f"config.{name}.monitor='val_accuracy' and restore='best'"
        )
