"""vmap sweeps: N attention systems in one compiled step equal N separate attention runs."""

import json

import jax
import numpy as np
import pytest

from gattanet_jax import agreement
from tests.test_train import assert_trees_equal, compilations, tiny_config
from train import sweep, train
from train.errors import UserError


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "backbone"
    config = tiny_config(epochs=4, max_train_examples=3000)  # well above chance
    config.backbone_training.augment = False
    config.backbone_training.learning_rate = 1e-2
    train.train_and_evaluate(config, str(path))
    return path


def sweep_config(backbone_dir):
    config = tiny_config("attention", epochs=2)
    config.backbone_checkpoint = str(backbone_dir)
    config.attention.d = 4
    config.attention_training.augment = True  # per-member augmentation streams too
    config.sweep.seeds = (0, 1, 2, 3)
    config.sweep.learning_rates = (1e-3, 3e-3, 1e-3, 1e-2)
    config.sweep.alpha_inits = (0.0, 0.1, 0.0, -0.1)
    config.sweep.lesions = ("", "", "c.cdd", "...d.")
    return config


def test_four_member_sweep_equals_separate_runs_of_its_members(backbone_dir, tmp_path):
    config = sweep_config(backbone_dir)
    with compilations() as compiled:
        state, results = train.train_and_evaluate(config, str(tmp_path / "sweep"))
    assert compiled.count("jit(member_step)") == 1, compiled
    assert len(results["members"]) == 4
    assert len({str(r["alpha"]) for r in results["members"]}) == 4  # the members differ
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| 2 | 2 | 0.001 | 0 | c.cdd |" in table
    saved = json.loads((tmp_path / "sweep" / "results.json").read_text())
    members = sweep.member_configs(config)
    for m in (1, 3):  # differ from each other in every swept field (a lesion in 3 only)
        member = members[m]
        single_state, single = train.train_and_evaluate(member, str(tmp_path / f"single{m}"))
        row = saved["members"][m]
        assert row["best_epoch"] == single["best_epoch"]
        assert row["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-9)
        for a, b in zip(
            jax.tree.leaves(single_state["state"]["params"]),
            jax.tree.leaves(jax.tree.map(lambda x, m=m: x[m], state["state"]["params"])),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
        assert row["alpha"] == pytest.approx(single["alpha"], rel=1e-6, abs=1e-7)
    # resuming the finished sweep changes nothing
    _, again = train.train_and_evaluate(config, str(tmp_path / "sweep"))
    assert [r["test_accuracy"] for r in again["members"]] == [
        r["test_accuracy"] for r in results["members"]
    ]


def test_sweep_lists_of_different_lengths_are_refused(backbone_dir, tmp_path):
    config = sweep_config(backbone_dir)
    config.sweep.seeds = (0, 1, 2)
    with pytest.raises(UserError, match=r"config.sweep: every non-empty list must have one value"):
        train.train_and_evaluate(config, str(tmp_path))


def test_single_value_lists_broadcast(backbone_dir):
    config = sweep_config(backbone_dir)
    config.sweep.learning_rates = (5e-3,)
    members = sweep.member_configs(config)
    assert [m.attention_training.learning_rate for m in members] == [5e-3] * 4
    assert [m.seed for m in members] == [0, 1, 2, 3]
    assert all(not m.sweep.seeds for m in members)


def test_a_bad_lesion_in_a_sweep_is_one_clear_error(backbone_dir, tmp_path):
    config = sweep_config(backbone_dir)
    config.sweep.lesions = ("", "", "cc", "...d.")
    with pytest.raises(UserError, match=r"config.sweep.lesions: lesion 'cc' must have one char"):
        train.train_and_evaluate(config, str(tmp_path))


def crash_after(monkeypatch, steps: int):
    """The sweep's compiled step raises KeyboardInterrupt at its call ``steps`` + 1 (a crash)."""
    compile_step = sweep.SweepRun.compile_step

    def crashing(self):
        step, calls = compile_step(self), []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) > steps:
                raise KeyboardInterrupt("simulated crash")
            return step(*args, **kwargs)

        return counted

    monkeypatch.setattr(sweep.SweepRun, "compile_step", crashing)


def test_a_sweep_crashed_within_an_epoch_resumes_there_and_ends_as_an_uninterrupted_one(
    backbone_dir, tmp_path, monkeypatch
):
    config = sweep_config(backbone_dir)
    config.checkpoint_every_steps = 2  # 4 steps per epoch: saves after steps 2 and 6
    straight_state, straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
    crash_after(monkeypatch, 7)  # epoch 2, its step 4
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path / "crashed"))
    monkeypatch.undo()
    assert (tmp_path / "crashed" / "checkpoints_mid" / "6").is_dir()
    state, results = train.train_and_evaluate(config, str(tmp_path / "crashed"))
    for key in ("test_accuracy", "best_validation_accuracy", "best_epoch"):
        assert [r[key] for r in results["members"]] == [r[key] for r in straight["members"]]
    assert_trees_equal(state["state"], straight_state["state"])


def test_a_sweep_stops_at_a_non_finite_member_or_skips_its_updates(backbone_dir, tmp_path):
    config = sweep_config(backbone_dir)
    config.sweep.learning_rates = (1e-3, 1e30, 1e-3, 1e-3)  # member 1 diverges
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step \d+ \(epoch 1\)"):
        train.train_and_evaluate(config, str(tmp_path / "stop"))
    config.on_nonfinite = "skip"
    with pytest.raises(UserError, match=r"every update of epoch 2 was non-finite and skipped"):
        train.train_and_evaluate(config, str(tmp_path / "skip"))


def test_the_alpha_zero_guard_checks_every_sweep_member(backbone_dir, tmp_path, monkeypatch):
    original = agreement.modulation
    monkeypatch.setattr(
        agreement, "modulation", lambda gatta, alpha, kind: original(gatta, alpha, kind) + 0.01
    )
    config = sweep_config(backbone_dir)
    config.sweep.alpha_inits = (0.1, 0.1, 0.0, 0.1)  # only member 2 starts at alpha = 0
    with pytest.raises(UserError, match=r"guard failed: with every alpha = 0"):
        train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("stage", "both", r"config.sweep trains one stage: needs stage 'backbone', 'attention'"),
        ("stage", "backbone", r"config.sweep.alpha_inits is for the attention stage, not"),
        ("sweep.layout", "grouped", r"config.sweep.layout must be 'auto', 'vmap' or 'loop'"),
        ("parallel", "jit", r"config.sweep runs on one device"),
        ("attention_training.finetune_backbone", True, r"on a frozen backbone: set"),
    ],
)
def test_a_sweep_of_another_mode_is_one_clear_error(backbone_dir, tmp_path, field, value, message):
    config = sweep_config(backbone_dir)
    config.update_from_flattened_dict({field: value})
    with pytest.raises(UserError, match=message):
        train.train_and_evaluate(config, str(tmp_path))
