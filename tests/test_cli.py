"""The entry point as a user meets it: --help lists the configs, --dry_run writes nothing,
every config takes ':smoke'."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

CONFIGS = sorted(p.stem for p in Path("configs").glob("[a-z]*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_takes_smoke_and_names_its_variants(name):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config("smoke")
    assert config.smoke is True
    assert "smoke" in module.VARIANTS


def test_help_lists_every_config_with_its_variants():
    r = subprocess.run(
        [sys.executable, "-m", "train.main", "--help"], capture_output=True, text=True, timeout=60
    )
    text = r.stdout + r.stderr
    for name in CONFIGS:
        assert f"configs/{name}.py: " in text
    assert "variants: t<T>, t<T>free, cue, heads<H>, finetune, smoke" in text
    assert "--[no]dry_run" in text


def test_dry_run_prints_the_run_and_writes_nothing(tmp_path):
    workdir = tmp_path / "never"
    r = subprocess.run(
        [sys.executable, "-m", "train.main", "--config", "configs/compare_toy_cifar10.py:gsa,smoke",
         "--config.dataset.name=embedded", f"--workdir={workdir}", "--dry_run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert not workdir.exists()
    out = json.loads(r.stdout[r.stdout.index("\n{") :])
    assert out["stage"] == "addon" and out["trained_params"] == 16_866
    assert out["frozen_params"] == 620_362 and out["splits"]["test"] == 256
    assert out["sites"][0] == "conv1 conv (32, 32, 32)"
    assert "addon:" in r.stdout  # the resolved config comes first


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_the_same_model_with_either_flax_api(name):
    """model.api='nnx' gives the NNX twin of the config's backbone: the same variables (names
    and shapes), the same attention and add-on sites, the same summary (train.summary)."""
    from train import defaults, models
    from train.tools import summary

    module = importlib.import_module(f"configs.{name}")
    built = {}
    for api in ("linen", "nnx"):
        config = defaults.complete(module.get_config())
        config.model.api = api
        backbone = models.build_backbone(config)
        shapes = models.backbone_shapes(backbone, config)
        built[api] = (
            jax.tree.map(lambda a: (a.shape, a.dtype), shapes),
            models.build_attention(config, backbone, shapes).sites,
            models.build_addons(config, backbone, shapes).sites,
            summary.summarize(config),
        )
    assert built["nnx"] == built["linen"]
