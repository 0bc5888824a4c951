r"""Times the training step of each comparison system as ``train.compare`` trains it.

  python -m benchmarks.addon_step [--systems gattanet,gala,se,gsa] [--repeats 20] [--json]

For each system of configs/compare_toy_cifar10.py, the training loop's own compiled step
(``train.run.Run``: the system added to the frozen toy backbone shipped in
pretrained/toy_cifar10_s0/backbone, batch 128, the attention-stage recipe) on batches of the
embedded dataset (no download; the step's cost does not depend on the pixels). Keys:
``<system>_step_s``, the median seconds of one step after ``--warmup`` untimed steps, and
``<system>_over_se``, its ratio to SE's step (the cheapest add-on), measured in the same run.
"""

from __future__ import annotations

import itertools
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import flags

from benchmarks.common import report
from configs import compare_toy_cifar10
from train import cli, defaults
from train.run import Run
from train.tools import compare

BACKBONE = "pretrained/toy_cifar10_s0/backbone"

_SYSTEMS = flags.DEFINE_list("systems", list(compare_toy_cifar10.SYSTEMS), "Systems to time.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps per system.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")


def build_run(system: str, workdir: str) -> Run:
    """The run ``train.compare`` makes of ``system`` on the shipped frozen backbone, with the
    embedded dataset's batches."""
    config = compare.run_config(system, BACKBONE, 0)
    config.dataset.name = "embedded"
    return Run(defaults.complete(config), workdir)


def step_seconds(system: str, repeats: int, warmup: int) -> float:
    """Median seconds of the training step of ``system`` on the shipped frozen backbone."""
    with tempfile.TemporaryDirectory() as workdir:
        run = build_run(system, workdir)
        run.prepare()
        state, frozen, times = run.state, run.task.frozen, []
        batches = itertools.cycle(list(run.batch_args.epoch(0, 0)))
        for i in range(warmup + repeats):
            args = next(batches)
            t = time.perf_counter()
            state, metrics = run.step_fn(state, frozen, *args)
            jax.block_until_ready(metrics)
            if i >= warmup:
                times.append(time.perf_counter() - t)
        run.writer.close()
    return float(np.median(times))


def main(argv):
    del argv
    results = {"device": jax.devices()[0].device_kind, "machine": platform.machine(),
               "cpus": os.cpu_count()}  # fmt: skip
    for system in _SYSTEMS.value:
        results[f"{system}_step_s"] = round(step_seconds(system, _REPEATS.value, _WARMUP.value), 4)
    if "se_step_s" in results:
        for system in _SYSTEMS.value:
            ratio = results[f"{system}_step_s"] / results["se_step_s"]
            results[f"{system}_over_se"] = round(ratio, 2)
    report(results, _JSON.value)


if __name__ == "__main__":
    cli.run(main, tool="tool")
