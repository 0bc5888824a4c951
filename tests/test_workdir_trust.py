"""A workdir that changes under a run: one writer at a time, a pinned config, checksummed
checkpoints, parts of a workdir lost."""

import json
import os
import subprocess
import sys

import pytest

from train import lock, train
from train.errors import UserError

from .test_train import tiny_config


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = rf"in use by pid {os.getpid()} on host \S+ \(since "
    with lock.hold(tmp_path / "w"):
        with pytest.raises(UserError, match=holder), lock.hold(tmp_path / "w"):
            pass
        with pytest.raises(UserError, match="in use by pid"):  # before any work
            train.train_and_evaluate(tiny_config(), str(tmp_path / "w"))
    with lock.hold(tmp_path / "w"):  # released: free again
        pass


def test_a_dead_holders_lock_is_taken_over_and_said(tmp_path, capsys):
    code = (
        "import os\nfrom train import lock\n"
        f"with lock.hold({str(tmp_path / 'w')!r}):\n    os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == -9
    holder = json.loads((tmp_path / "w" / lock.LOCK).read_text())
    with lock.hold(tmp_path / "w"):
        pass
    out = capsys.readouterr().out
    assert f"took over the lock of {tmp_path / 'w'} from pid {holder['pid']}" in out
    with lock.hold(tmp_path / "w"):  # a clean release leaves nothing to take over
        pass
    assert "took over" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "field, value",
    [
        ("attention.dropout_rate", float("nan")),
        ("backbone_training.learning_rate", float("inf")),
        ("attention.alpha_init", float("nan")),
        ("attention_training.weight_decay", float("-inf")),
        ("attention.cue_weight", float("nan")),
    ],
)
def test_non_finite_numbers_anywhere_are_refused_before_any_work(tmp_path, field, value):
    config = tiny_config(stage="both")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(UserError, match=rf"config\.{field} must be finite"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "backbone").exists()


def test_second_stage_and_parallel_mistakes_are_refused_before_the_first_stage(tmp_path):
    from train.tools import summary

    config = tiny_config(stage="both")
    config.attention.lesion = "xyz"
    with pytest.raises(UserError, match=r"config\.attention\.lesion: lesion 'xyz' must have"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "backbone").exists()  # nothing trained
    with pytest.raises(UserError, match=r"config\.attention\.lesion"):
        summary.dry_run(config)
    config = tiny_config()
    config.parallel = "foo"
    with pytest.raises(UserError, match=r"config\.parallel must be one of"):
        summary.dry_run(config)


@pytest.mark.parametrize("backbones", [[], [""], ["pretrained/toy_cifar10_s0/backbone", ""]])
def test_compare_refuses_empty_backbone_names_before_training(tmp_path, backbones):
    from train.tools import compare

    with pytest.raises(UserError, match="--backbones must name"):
        compare.compare(str(tmp_path), backbones, ["gattanet"], "smoke")
    assert not any(tmp_path.iterdir())
