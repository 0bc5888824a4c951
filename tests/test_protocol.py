"""The seeds protocol end to end at smoke size: backbones of two seeds in one sweep, three
systems on them, the table checked against the members' own results, the paired statistics."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train import tiny_config
from train.errors import UserError
from train.tools import protocol
from train.tools.analyses.paired import model_name

SYSTEMS = ["gattanet", "shifted_q", "se"]


def base_config():
    """A tiny toy recipe on the NNX twin of the backbone (model.api; the Linen path of every
    step here is tested by the sweeps, seeds and compare tests)."""
    config = tiny_config("attention", epochs=2, max_train_examples=320)
    config.model.api = "nnx"
    config.attention.d = 4
    config.addon.reduction = 2
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    path = tmp_path_factory.mktemp("protocol")
    table = protocol.run(base_config(), str(path), 2, SYSTEMS, patience=1, attention_patience=1)
    return path, table


def test_the_table_is_the_members_own_results(finished):
    path, table = finished
    member = json.loads((path / "backbones" / "members" / "1" / "results.json").read_text())
    assert table["test_accuracy"]["backbone"][1] == member["test_accuracy"]
    gains = []
    for i in range(2):
        own = json.loads((path / "se" / "members" / str(i) / "results.json").read_text())
        assert own["stage"] == "addon" and table["test_accuracy"]["se"][i] == own["test_accuracy"]
        backbone_dir = path / "backbones" / "members" / str(i)
        backbone = json.loads((backbone_dir / "results.json").read_text())
        assert own["backbone_test_accuracy"] == pytest.approx(backbone["test_accuracy"])
        gains.append(100 * (own["test_accuracy"] - own["backbone_test_accuracy"]))
    assert table["gain"]["se"]["mean"] == pytest.approx(np.mean(gains))
    assert table["gain"]["se"]["sd"] == pytest.approx(np.std(gains, ddof=1))
    shifted = json.loads((path / "shifted_q" / "members" / "0" / "config.json").read_text())
    assert shifted["attention"]["q_avg_source"] == "shifted"
    assert shifted["backbone_checkpoint"] == str(path / "backbones" / "members" / "0")
    md = (path / "protocol.md").read_text()
    mean = table["mean_sd"]["gattanet"]
    assert f"{mean['mean']:.2f} ± {mean['sd']:.2f}" in md


def test_paired_per_seed_and_pooled_over_seeds(finished):
    path, _ = finished
    paired = json.loads((path / "paired" / "1" / "paired.json").read_text())
    assert len(paired["against_backbone"]) == 3 and len(paired["pairs"]) == 3
    pooled = json.loads((path / "pooled" / "pooled.json").read_text())
    pairs = {(r["a"], r["b"]) for r in pooled["rows"]}
    assert ("gattanet", "its frozen backbone") in pairs and ("gattanet", "se") in pairs
    assert model_name(str(path / "se" / "members" / "1")) == "se"


def test_a_rerun_resumes_and_changes_nothing(finished):
    path, table = finished
    again = protocol.run(base_config(), str(path), 2, SYSTEMS, patience=1, attention_patience=1)
    assert again == table


def test_protocol_arguments_are_checked(tmp_path):
    with pytest.raises(UserError, match=r"unknown system 'galla'"):
        protocol.run(base_config(), str(tmp_path), 2, ["galla"])
    with pytest.raises(UserError, match=r"--seeds must be 2 or more"):
        protocol.run(base_config(), str(tmp_path), 1, ["gattanet"])


def test_the_command_line_says_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "train.protocol", "--config", "configs/toy_cifar10.py:smoke",
         "--workdir", str(tmp_path), "--systems", "gattanet,galla"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown system 'galla'")


def test_a_two_stage_base_config_gives_each_system_its_stage():
    from configs import demo

    base = demo.get_config()  # stage 'both'
    assert protocol.system_config(base, "gattanet").stage == "attention"
    assert protocol.system_config(base, "se").stage == "addon"
