"""A training process killed with SIGKILL and rerun ends bit-identical to an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from train import checkpoints

ARGS = [
    "--config=configs/toy_cifar10.py:smoke",
    "--config.stage=backbone",
    "--config.dataset.name=embedded",
    "--config.model.features=(4, 8, 8)",
    "--config.model.hidden=16",
    "--config.backbone_training.num_epochs=10",
    "--config.backbone_training.patience=10",
]


def command(workdir):
    return [sys.executable, "-m", "train.main", f"--workdir={workdir}", *ARGS]


def final_params(workdir):
    mngr = checkpoints.manager(workdir / "checkpoints", keep=3, create=False)
    tree = mngr.restore(mngr.latest_step())
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_kill_9_at_a_random_moment_then_rerun_equals_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, capture_output=True, timeout=600, env=env)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        command(crashed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 300
    while not (crashed / "checkpoints" / "1").exists() and time.time() < deadline:
        time.sleep(0.05)
    delay = random.SystemRandom().uniform(
        0.0, 3.0
    )  # somewhere in epochs 2-10, possibly during a save
    print(f"killing {delay:.2f} s after the first checkpoint")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "results.json").exists(), "the run finished before it was killed"
    subprocess.run(command(crashed), check=True, capture_output=True, timeout=600, env=env)

    a = json.loads((straight / "results.json").read_text())
    b = json.loads((crashed / "results.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_validation_accuracy", "best_epoch", "steps"):
        assert a[key] == b[key], key
    for x, y in zip(final_params(straight), final_params(crashed), strict=True):
        np.testing.assert_array_equal(x, y)
