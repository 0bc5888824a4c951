"""train.compare: every system on every frozen backbone, one table."""

import fcntl
import json
import shutil
import threading
import time

import pytest

from configs import compare_toy_cifar10
from tests.test_train import tiny_config
from train import train
from train.errors import UserError
from train.tools import compare, summary


def small(config):
    config.dataset.name = "embedded"
    config.dataset.max_train_examples = 96
    config.dataset.max_test_examples = 64
    config.model.features = (4, 8, 8)
    config.model.hidden = 16
    config.attention_training.num_epochs = 1
    config.eval_batch_size = 64


def test_a_system_on_two_backbones_makes_one_table(tmp_path, capsys):
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
    # a rerun reads the finished runs back, and says so
    capsys.readouterr()
    again = compare.compare(str(tmp_path / "cmp"), backbones, ["se"], "smoke", configure=small)
    assert json.dumps(again, default=str) == json.dumps(out, default=str)
    assert "[compare] 2 of 2 runs finished in" in capsys.readouterr().out
    # a backbone whose training has not ended is refused before anything is trained
    shutil.copytree(tmp_path / "b0", tmp_path / "b1")
    (tmp_path / "b1" / "results.json").unlink()
    with pytest.raises(UserError, match=r"backbone .*b1 has not finished training \(no "
                       r"results.json; its last checkpoint is of epoch 1\): rerun .* or pass "
                       r".*b1/best to use"):  # fmt: skip
        compare.compare(str(tmp_path / "late"), [backbones[0], str(tmp_path / "b1")], ["se"],
                        "smoke", configure=small)  # fmt: skip
    assert not (tmp_path / "late").exists()
    # more seeds join the comparison: --backbones B --seeds 3 trains seed 3 into se/3
    capsys.readouterr()
    more = compare.compare(str(tmp_path / "cmp"), backbones[:1], ["se"], "smoke", configure=small,
                           seeds=["3"])  # fmt: skip
    assert json.loads((tmp_path / "cmp" / "se" / "3" / "config.json").read_text())["seed"] == 3
    assert more["seeds"] == [3] and "| seed 3 |" in compare.table(more)
    assert more["systems"]["se"][0]["steps"] == runs["se"][0]["steps"]
    for bad in (["1", "1"], ["x", "2"], ["-1", "2"], ["0"]):
        with pytest.raises(UserError, match="--seeds must give 2 distinct integers >= 0"):
            compare.compare(str(tmp_path / "bad"), backbones, ["se"], "smoke", seeds=bad)


def small_nnx(config):
    small(config)
    config.model.api = "nnx"


def test_a_run_another_process_holds_is_left_to_it_and_waited_for(tmp_path):
    """Two compare processes on one workdir: a run claimed by the other (its lock held here) is
    not trained twice: this one trains the rest first, then waits for the lock; the holder
    gone without results, it trains the run itself. (The runs on the NNX twin of the
    Linen-trained backbone: train.compare with model.api='nnx'.)"""
    train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path / "b0"))
    backbones, cmp = [str(tmp_path / "b0")] * 2, tmp_path / "cmp"
    (cmp / "se" / "0").mkdir(parents=True)
    worker = threading.Thread(
        target=lambda: box.update(out=compare.compare(str(cmp), backbones, ["se"], "smoke",
                                                      configure=small_nnx))
    )  # fmt: skip
    box = {}
    with open(cmp / "se" / "0" / compare.LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker.start()
        deadline = time.time() + 120
        while not (cmp / "se" / "1" / "results.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert (cmp / "se" / "1" / "results.json").exists()
        assert not (cmp / "se" / "0" / "results.json").exists()  # left to the lock's holder
        assert worker.is_alive()  # waiting for it
    # the holder gone (its file closed), the worker claims the run
    worker.join(timeout=300)
    runs = box["out"]["systems"]["se"]
    assert len(runs) == 2 and runs[0]["steps"] == runs[1]["steps"]
    assert json.loads((cmp / "se" / "0" / "results.json").read_text())["steps"] == runs[0]["steps"]
    assert json.loads((cmp / "se" / "1" / "config.json").read_text())["model"]["api"] == "nnx"


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
