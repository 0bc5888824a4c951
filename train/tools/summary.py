r"""Prints a model's parameter counts and attention sites as one JSON object.

python -m train.summary --config configs/toy_cifar10.py [--config.attention.d=32]
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from gattanet_jax import count_params
from train import cli, defaults, models, validate
from train.errors import UserError

# Table 1's attention parameter counts (rounded to 0.1K in the paper): (backbone, classes, d).
TABLE1 = {
    ("toy", 10, 16): 15.8e3,
    ("toy", 100, 16): 18.7e3,
    ("toy", 100, 32): 37.4e3,
    ("toy", 100, 64): 74.9e3,
    ("resnet18", 1000, 8): 68.9e3,
    ("resnet18", 1000, 16): 101.4e3,
    ("resnet18", 1000, 32): 166.5e3,
    ("resnet50", 1000, 4): 78.7e3,
    ("resnet50", 1000, 8): 118.0e3,
    ("resnet50", 1000, 16): 196.7e3,
    ("resnet50", 1000, 32): 353.9e3,
    ("resnet50", 1000, 64): 668.4e3,
}


def summarize_addon(config, backbone, backbone_vars) -> dict:
    """stage='addon': the comparison system's trainable parameters at its sites."""
    from gattanet_jax import addon
    from gattanet_jax.attention import param_name

    addons = models.build_addons(config, backbone, backbone_vars)
    shapes = jax.eval_shape(lambda: addon.init_addons(addons, jax.random.key(0)))["params"]
    kept = addon.drop_replaced(backbone_vars["params"], addons)
    a = config.addon
    return {
        "backbone": config.model.backbone,
        "addon": a.kind,
        "protocol": "from_scratch" if a.from_scratch else "frozen_backbone",
        "addon_params": count_params(shapes),
        "backbone_params": count_params(kept),
        "trainable_params": count_params(shapes) + (count_params(kept) if a.from_scratch else 0),
        "sites": [
            {
                "name": s.name,
                "shape": list(s.shape),
                "params": count_params(shapes[param_name(s.name)]),
            }
            for s in addons.sites
        ],
    }


def summarize(config) -> dict:
    config = defaults.complete(config)
    validate.check_config(config)
    backbone = models.build_backbone(config)
    backbone_vars = models.backbone_shapes(backbone, config)
    if config.stage == "addon":
        return summarize_addon(config, backbone, backbone_vars)
    attention = models.build_attention(config, backbone, backbone_vars)
    att_shapes = jax.eval_shape(
        lambda: attention.init(
            jax.random.key(0),
            {s.name: jax.numpy.zeros((1, *s.shape)) for s in attention.sites},
        )
    )
    n_attention = count_params(att_shapes.get("params", {}))
    row = (config.model.backbone, config.dataset.num_classes, config.attention.d)
    m = config.model
    default_arch = m.backbone == "toy" or (not m.stage_sizes and m.width == 64)
    a = config.attention
    default_arch = default_arch and a.heads == 1 and not a.cue_classes and a.q_avg_source == "own"
    paper = TABLE1.get(row) if default_arch else None
    table = (
        {
            "table1_attention_params": paper,
            "relative_difference": round((n_attention - paper) / paper, 6),
            "matches_table1": round(n_attention / 100) * 100 == round(paper),  # to 0.1K
        }
        if paper
        else {}
    )
    return {
        "backbone": config.model.backbone,
        "backbone_params": count_params(backbone_vars.get("params", {})),
        "attention_d": config.attention.d,
        "attention_params": n_attention,
        **table,
        "lesion_notation": "".join(s.code for s in attention.sites),
        "sites": [
            {"name": s.name, "kind": s.kind, "shape": list(s.shape)} for s in attention.sites
        ],
    }


def counts(config, summary: dict) -> dict:
    """Trained and frozen parameters of a run of ``config`` (from a ``summarize`` result)."""
    if config.stage == "addon":
        frozen = 0 if config.addon.from_scratch else summary["backbone_params"]
        return {"trained_params": summary["trainable_params"], "frozen_params": frozen}
    backbone = {"trained_params": summary["backbone_params"], "frozen_params": 0}
    attention = {"trained_params": summary["attention_params"],
                 "frozen_params": summary["backbone_params"]}  # fmt: skip
    if config.attention_training.finetune_backbone:
        attention = {"trained_params": sum(attention.values()), "frozen_params": 0}
    by_stage = {"backbone": backbone, "attention": attention}
    if config.stage == "both":
        return by_stage
    return by_stage[config.stage]


def dry_run(config) -> dict:
    """What a run of ``config`` would do, without training or writing anything: the resolved
    config, parameter counts, sites, and the data splits it would read with their sizes."""
    from train.data import input_pipeline

    config = defaults.complete(config)
    validate.check_before_work(config)
    s = summarize(config)
    data = input_pipeline.load(config, models.image_shape(config))
    sizes = {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)}
    return {
        "stage": config.stage,
        **counts(config, s),
        "sites": [f"{x['name']} {x.get('kind', 'conv')} {tuple(x['shape'])}" for x in s["sites"]],
        "dataset": config.dataset.name,
        "data_dir": config.dataset.data_dir,
        "splits": sizes,
        "num_classes": data.num_classes,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        print(json.dumps(summarize(flags.FLAGS.config)))
    except ValueError as e:  # e.g. a site name no module has
        raise UserError(str(e)) from None


def run_cli():
    """``python -m train.summary``; its flag is defined only here (``train.main`` imports this
    module)."""
    config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    cli.run(main, tool="tool", config_flag="config")


if __name__ == "__main__":
    run_cli()
