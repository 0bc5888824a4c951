"""Two processes on localhost (jax.distributed over CPU, gloo collectives) train as one."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests.test_parallel import parallel_config
from train import checkpoints, progress, train

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
from tests.test_parallel import parallel_config


def get_config():
    config = parallel_config("jit")
    config.distributed.coordinator_address = "localhost:{port}"
    config.distributed.num_processes = 2
    return config
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    config_file = tmp_path / "two_hosts.py"
    config_file.write_text(CONFIG.format(port=free_port()))
    other_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(
        os.environ,
        # 2 processes x 2 devices, with the session's other XLA settings (tests/conftest.py)
        XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=2", *other_flags]),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )
    workdir = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train.main",
                f"--config={config_file}",
                f"--workdir={workdir}",
                f"--config.distributed.process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "[backbone] epoch 1/1" in outs[0]
    assert "[backbone] epoch" not in outs[1]  # only process 0 logs
    assert len(list((workdir / "tensorboard").iterdir())) == 1

    state, results = train.train_and_evaluate(parallel_config("none"), str(tmp_path / "one"))
    two = json.loads((workdir / "results.json").read_text())
    assert two["steps"] == results["steps"] == 3
    assert two["test_accuracy"] == results["test_accuracy"]
    mngr = checkpoints.manager(workdir / "checkpoints", keep=1, create=False)
    meta = progress.meta_arrays({"epoch": 0, "best_val": 0.0, "bad_epochs": 0, "done": False})
    abstract = {"state": state["state"], "meta": meta}
    saved = checkpoints.restore(mngr, mngr.latest_step(), abstract, "two-process checkpoint")
    for a, b in zip(
        jax.tree.leaves(state["state"]["params"]),
        jax.tree.leaves(saved["state"]["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
