"""Defaults in one place: every config a run or a tool reads gets every field."""

import json

import pytest

from configs import resnet50_imagenet, toy_cifar10
from train import defaults


def as_json(config):
    return json.loads(config.to_json_best_effort())


@pytest.mark.parametrize("module", [toy_cifar10, resnet50_imagenet])
def test_a_shipped_config_is_already_complete(module):
    config = module.get_config()
    assert as_json(defaults.complete(config)) == as_json(config)


def test_an_older_config_json_gets_the_missing_fields_and_keeps_its_values():
    current = as_json(toy_cifar10.get_config())
    old = json.loads(json.dumps(current))
    for section, field in [("attention", "heads"), ("attention", "q_avg_source"),
                           ("dataset", "image_shape"), ("addon", "gate")]:  # fmt: skip
        del old[section][field]
    del old["sweep"]
    old["attention"]["d"] = 32
    completed = as_json(defaults.complete(old))
    assert completed["attention"]["d"] == 32
    assert completed["attention"]["heads"] == 1
    assert completed["attention"]["q_avg_source"] == "own"
    assert completed["dataset"]["image_shape"] == [32, 32, 3]
    assert completed["sweep"] == current["sweep"]
    # a comparison run from before the gate field trained the gate of that time
    assert completed["addon"]["gate"] == "direct" != current["addon"]["gate"]
    completed["attention"]["d"], completed["addon"]["gate"] = 16, current["addon"]["gate"]
    assert completed == current


def test_a_resnet_config_gets_resnet_defaults_not_the_toy_models():
    old = as_json(resnet50_imagenet.get_config())
    del old["model"]["width"]
    completed = as_json(defaults.complete(old))
    assert completed["model"]["width"] == 64
    assert "features" not in completed["model"]
