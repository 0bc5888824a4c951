r"""Prints a model's parameter counts and attention sites as one JSON object.

python -m train.summary --config configs/toy_cifar10.py [--config.attention.d=32]
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app
from ml_collections import config_flags

from gattanet_jax import count_params
from train import cli, models, validate
from train.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)


def summarize(config) -> dict:
    validate.check_config(config)
    backbone = models.build_backbone(config)
    backbone_vars = models.backbone_shapes(backbone, config)
    attention = models.build_attention(config, backbone, backbone_vars)
    att_shapes = jax.eval_shape(
        lambda: attention.init(
            jax.random.key(0),
            {s.name: jax.numpy.zeros((1, *s.shape)) for s in attention.sites},
        )
    )
    return {
        "backbone": config.model.backbone,
        "backbone_params": count_params(backbone_vars.get("params", {})),
        "attention_d": config.attention.d,
        "attention_params": count_params(att_shapes.get("params", {})),
        "lesion_notation": "".join(s.code for s in attention.sites),
        "sites": [
            {"name": s.name, "kind": s.kind, "shape": list(s.shape)} for s in attention.sites
        ],
    }


def main(argv):
    del argv
    try:
        print(json.dumps(summarize(_CONFIG.value)))
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
