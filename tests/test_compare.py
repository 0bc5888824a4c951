"""train.compare: every system on every frozen backbone, one table."""

import json

import pytest

from configs import compare_toy_cifar10
from tests.test_train import tiny_config
from train import train
from train.tools import compare, summary


def small(config):
    config.dataset.name = "embedded"
    config.dataset.max_train_examples = 96
    config.dataset.max_test_examples = 64
    config.model.features = (4, 8, 8)
    config.model.hidden = 16
    config.attention_training.num_epochs = 1
    config.eval_batch_size = 64


def test_a_system_on_two_backbones_makes_one_table(tmp_path):
    train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path / "b0"))
    backbones = [str(tmp_path / "b0")] * 2  # the same backbone twice: run seeds 0 and 1
    out = compare.compare(str(tmp_path / "cmp"), backbones, ["se"], "smoke", configure=small)
    runs = out["systems"]
    assert [len(v) for v in runs.values()] == [2]
    assert runs["se"][0]["steps"] == runs["se"][1]["steps"]
    text = compare.table(out)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert set(rows) == {"frozen backbone", "se"}
    assert f"{100 * runs['se'][1]['test_accuracy']:.2f}" in rows["se"]
    assert "±" in rows["se"]
    # a rerun reads the finished runs back
    again = compare.compare(str(tmp_path / "cmp"), backbones, ["se"], "smoke", configure=small)
    assert json.dumps(again, default=str) == json.dumps(out, default=str)


def test_the_comparison_budgets_are_within_ten_percent_of_gattanet():
    counts = {}
    for system in compare_toy_cifar10.SYSTEMS:
        s = summary.summarize(compare_toy_cifar10.get_config(system))
        counts[system] = s.get("addon_params", s.get("attention_params"))
    assert counts["gattanet"] == 15845
    for system, n in counts.items():
        assert abs(n - 15845) / 15845 < 0.1, (system, n)
    with pytest.raises(ValueError, match="unknown system"):
        compare_toy_cifar10.get_config("gattanet,scratch")


def test_the_agreement_controls_are_gattanet_with_another_global_query():
    plain = compare_toy_cifar10.get_config("gattanet")
    for system, source in [("learned_q", "learned"), ("shifted_q", "shifted")]:
        config = compare_toy_cifar10.get_config(system)
        assert config.attention.q_avg_source == source
        config.attention.q_avg_source = "own"
        assert config.to_dict() == plain.to_dict(), system
    counts = {s: summary.summarize(compare_toy_cifar10.get_config(s))["attention_params"]
              for s in ("learned_q", "shifted_q")}  # fmt: skip
    assert counts == {"learned_q": 15845 + 16, "shifted_q": 15845}
