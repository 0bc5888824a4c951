"""A training process killed with SIGKILL (at a random moment, or in the middle of a checkpoint
write) and rerun ends bit-identical to an uninterrupted run."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train import checkpoints

COMMON = [
    "--config=configs/toy_cifar10.py:smoke",
    "--config.dataset.name=embedded",
    "--config.model.features=(8, 16, 16)",
    "--config.model.hidden=32",
]
ARGS = [
    *COMMON,
    "--config.stage=backbone",
    "--config.backbone_training.num_epochs=10",
    "--config.backbone_training.patience=10",
    # a model that learns on the smoke data: validation accuracy improves in several epochs
    # (1, 2, 3, 7, 8 and 10), so there is a second best checkpoint to crash in
    "--config.backbone_training.learning_rate=3e-3",
    "--config.backbone_training.augment=False",
]


def command(workdir, *extra):
    """The backbone run; with ``attention_args``, the attention stage on it (which takes no
    backbone_training options: they would be refused as unused)."""
    args = COMMON if "--config.stage=attention" in extra else ARGS
    return [sys.executable, "-m", "train.main", f"--workdir={workdir}", *args, *extra]


def attention_args(backbone_workdir):
    """The attention stage, on the NNX twin of the Linen-trained backbone (model.api): exact
    resume on the NNX path, with a checkpoint of the other API."""
    return [
        "--config.stage=attention",
        "--config.model.api=nnx",
        f"--config.backbone_checkpoint={backbone_workdir}",
        "--config.attention_training.num_epochs=10",
        "--config.attention_training.patience=10",
    ]


def final_params(workdir):
    mngr = checkpoints.manager(workdir / "checkpoints", keep=3, create=False)
    tree = mngr.restore(mngr.latest_step())
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    r = subprocess.run(
        command(workdir), check=True, capture_output=True, timeout=600, env=ENV, text=True
    )
    bests = [line for line in r.stdout.splitlines() if " * |" in line]
    assert len(bests) >= 2, "the crash during best/2 needs a run with two best epochs"
    return workdir


@pytest.fixture(scope="module")
def straight_attention(straight, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight_attention")
    subprocess.run(
        command(workdir, *attention_args(straight)),
        check=True,
        capture_output=True,
        timeout=600,
        env=ENV,
    )
    return workdir


def assert_same_run(straight, crashed):
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((crashed / "results.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_validation_accuracy", "best_epoch", "steps"):
        assert a[key] == b[key], key
    for x, y in zip(final_params(straight), final_params(crashed), strict=True):
        assert np.all(np.isfinite(x))  # (NaN would compare equal)
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("stage", ["backbone", "attention"])
def test_kill_9_at_a_random_moment_then_rerun_equals_an_uninterrupted_run(
    request, straight, tmp_path, stage
):
    env = ENV
    extra = attention_args(straight) if stage == "attention" else []
    if stage == "attention":
        straight = request.getfixturevalue("straight_attention")
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        command(crashed, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    epoch = wait_two_checkpoints(crashed)
    # somewhere in epochs 3-8 of 10 (possibly during a save), whatever the machine's speed
    delay = random.SystemRandom().uniform(0.0, 6 * epoch)
    print(f"killing {delay:.2f} s after the second checkpoint (one epoch: {epoch:.2f} s)")
    sleep_before_checkpoint(crashed, delay, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "results.json").exists(), "the run finished before it was killed"
    r = subprocess.run(
        command(crashed, *extra), capture_output=True, timeout=600, env=env, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(straight, crashed)


# checkpoints/1: best/1 is already complete when the periodic save of the same epoch dies.
@pytest.mark.parametrize("target, n", [("checkpoints", 1), ("checkpoints", 3), ("best", 2)])
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_as_latest(
    straight, tmp_path, target, n
):
    crashed = tmp_path / "crashed"
    killer = [sys.executable, "tests/kill_during_save.py", target, str(n)]
    r = subprocess.run(
        killer + command(crashed)[3:], capture_output=True, timeout=600, env=ENV, text=True
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert list((crashed / target).glob("*.orbax-checkpoint-tmp*")), "no half-written step"
    complete = checkpoints.manager(crashed / target, keep=3, create=False).latest_step()
    if target == "checkpoints":
        assert complete == (n - 1 or None)  # the previous complete one, or none at all
    else:
        assert complete is not None
    if complete:
        assert (crashed / target / str(complete) / "_CHECKPOINT_METADATA").exists()
    assert not (crashed / "results.json").exists()
    r = subprocess.run(command(crashed), capture_output=True, timeout=600, env=ENV, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    if target == "checkpoints" and n > 1:
        assert f"resumed from epoch {n - 1} " in r.stdout
    assert not list((crashed / target).glob("*.orbax-checkpoint-tmp*"))
    assert_same_run(straight, crashed)


def wait_two_checkpoints(workdir) -> float:
    """Waits for the first two periodic checkpoints; returns one epoch's time."""
    deadline = time.time() + 300
    seen = []
    for n in (1, 2):
        while not (workdir / "checkpoints" / str(n)).exists() and time.time() < deadline:
            time.sleep(0.02)
        seen.append(time.time())
    return seen[1] - seen[0]


def sleep_before_checkpoint(workdir, delay: float, n: int):
    """Sleeps ``delay`` seconds, or less if periodic checkpoint ``n`` appears first: later
    epochs can be much faster than the first two (a busy machine frees up), and the run must
    not end before its signal."""
    end = time.time() + delay
    while time.time() < end and not (workdir / "checkpoints" / str(n)).exists():
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_saves_at_the_next_step_and_the_rerun_equals_an_uninterrupted_run(
    straight, tmp_path, signum
):
    """A scheduler's preemption (SIGTERM) or Ctrl-C (SIGINT): the run checkpoints at the next
    step boundary, exits with 128 + the signal, and a rerun ends bit-identical."""
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        command(stopped), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True
    )
    epoch = wait_two_checkpoints(stopped)
    delay = random.SystemRandom().uniform(0.0, 4 * epoch)  # somewhere in epochs 3-6
    sleep_before_checkpoint(stopped, delay, 6)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out[-2000:] + err[-2000:]
    saved = re.search(r"checkpoint saved at step (\d+)", out)
    if saved:  # within an epoch: at the next step; during its evaluation: its own checkpoint
        step = int(saved.group(1))
        per_epoch = int(re.search(r"step \d+/(\d+) ", out).group(1))
        mid = (stopped / "checkpoints_mid" / str(step)).is_dir()
        assert mid or (step % per_epoch == 0 and (stopped / "checkpoints").is_dir()), out
    else:  # everything was saved already (just after an epoch's checkpoint): stopped at once
        assert "stopped at once" in err and len(err.strip().splitlines()) == 1, err
    assert not (stopped / "results.json").exists()
    r = subprocess.run(command(stopped), capture_output=True, timeout=600, env=ENV, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout
    assert_same_run(straight, stopped)
