"""Compilation: the persistent cache serves a second identical run, and the loop reports what
compiling cost."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from train import compilation

TINY = [
    "--config",
    "configs/toy_cifar10.py:smoke",
    "--config.stage=backbone",
    "--config.dataset.name=embedded",
    "--config.dataset.max_train_examples=64",
    "--config.dataset.max_test_examples=32",
    "--config.model.features=(4,8,8)",
    "--config.model.hidden=16",
    "--config.eval_batch_size=32",
]


def _train(workdir, cache_home):
    """One tiny training run in its own process, with the project's default cache settings."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home))
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)
    r = subprocess.run(
        [sys.executable, "-m", "train.main", *TINY, "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    process = json.loads((workdir / "results.json").read_text())["processes"][-1]
    return process, r.stdout


def test_a_second_identical_run_compiles_from_the_cache(tmp_path):
    cache = tmp_path / "cache" / "gattanet-jax" / "xla"
    first, log = _train(tmp_path / "first", tmp_path / "cache")
    written = sorted(p.name for p in cache.iterdir())
    second, _ = _train(tmp_path / "second", tmp_path / "cache")
    assert "[backbone] compiled " in log and "time to the first training step: " in log, log
    assert any(name.startswith("jit_train_step") for name in written), written
    # every program the first run wrote is read back, and the second compiles none worth caching
    assert first["compile"]["cache_hits"] == 0
    assert second["compile"]["cache_hits"] == len(written) >= 2, (second, written)
    # (a small program near the 0.1 s threshold may cross it on a busy machine: one more entry)
    assert set(written) <= {p.name for p in cache.iterdir()}


def test_compile_log_names_each_compilation_and_its_parts():
    with compilation.timed() as log:
        jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()
    outside = len(log.records)
    jax.jit(lambda x: jnp.cos(x) * 5)(jnp.ones(9)).block_until_ready()  # after stop: not counted
    assert len(log.records) == outside >= 1
    record = log.records[-1]
    assert record["name"] == "jit(<lambda>)" and record["xla_s"] > 0 and record["lower_s"] > 0
    assert log.summary()["programs"] == outside
    assert log.new_lines(min_s=0.0)[-1].startswith("compiled jit(<lambda>) in")
    assert log.new_lines() == []  # each compilation is reported once


def test_cache_directory_override_and_off_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "c"))
    before = jax.config.jax_compilation_cache_dir
    try:
        assert compilation.enable_cache() == str(tmp_path / "c") and (tmp_path / "c").is_dir()
        monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", "false")
        assert compilation.enable_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.default_dir() == tmp_path / "xdg" / "gattanet-jax" / "xla"


def test_the_step_benchmark_compiles_each_step_once():
    from benchmarks import step as step_bench

    with compilation.timed() as log:
        results, _ = step_bench.train_steps(4, "float32", 4, repeats=2, warmup=1)
    steps = [r for r in log.records if r["name"] == "jit(train_step)"]
    assert len(steps) == 2, log.records  # the backbone's step and the attention step, once each
    for name in ("backbone_train_step", "attention_step"):
        assert results[name]["compile_s"] > 0 and results[name]["flops"] > 0
        assert results[f"{name}_s"] > 0
