"""Version-specific settings are set only where the installed JAX knows them."""

import json
import os
import subprocess
import sys

import jax

from train import versions

# Every JAX_* variable the suite's setup may set, by its jax.config option.
CHECK = """
import json, os, sys, jax
unknown = [v for v in json.loads(sys.argv[1]) if v.lower() not in jax.config.values]
print(json.dumps({"devices": len(jax.devices("cpu")), "unknown": unknown}))
"""


def test_the_suites_settings_are_accepted_by_the_installed_jax():
    settings = json.loads(os.environ["GATTANET_TEST_SETTINGS"])
    variables = [name.upper() for name in settings["options"]]
    assert all(v in os.environ for v in variables)
    done = subprocess.run(
        [sys.executable, "-c", CHECK, json.dumps(variables)],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["unknown"] == []
    if "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]:
        assert found["devices"] == 8
    assert set(settings["xla_flags"]) <= set(os.environ["XLA_FLAGS"].split())


def test_the_probe_drops_the_flags_xla_refuses_and_keeps_the_rest():
    found = versions.probe(
        [
            "--xla_gattanet_no_such_flag=1",
            "--xla_force_host_platform_device_count=3",
            "--xla_gattanet_nor_this_one=true",
        ],
        ["jax_enable_x64", "jax_gattanet_no_such_option"],
    )
    assert found.flags == ["--xla_force_host_platform_device_count=3"]
    assert found.refused == ["--xla_gattanet_no_such_flag=1", "--xla_gattanet_nor_this_one=true"]
    assert found.options == ["jax_enable_x64"]


def test_an_option_is_updated_only_where_jax_defines_it():
    assert versions.update("jax_gattanet_no_such_option", 1) is False
    name = "jax_dump_ir_to"
    assert versions.update(name, jax.config.values[name]) is True
    assert versions.known_options([name, "jax_gattanet_no_such_option"]) == [name]
