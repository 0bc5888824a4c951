"""benchmarks.addon_step: each system's step is that system's, as train.compare trains it."""

from benchmarks import addon_step
from gattanet_jax import count_params


def test_each_timed_run_trains_its_own_system(tmp_path):
    # trainable parameters of configs/compare_toy_cifar10.py's systems (docs/SYSTEMS.md)
    expected = {"gattanet": 15_845, "gala": 17_195, "se": 14_601, "gsa": 16_866}
    for system, params in expected.items():
        run = addon_step.build_run(system, str(tmp_path / system))
        assert count_params(run.task.params) == params, system
        assert run.recipe.batch_size == 128 and run.task.frozen
    seconds = addon_step.step_seconds("se", repeats=1, warmup=1)
    assert 0 < seconds < 60
