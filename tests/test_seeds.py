"""Seeds as a batch dimension: a backbone sweep over seeds equals the plain backbone runs of its
seeds, its members are plain backbone workdirs, and attention systems or add-ons train on N
frozen backbones at once, each equal to its own plain run."""

import json

import jax
import numpy as np
import pytest

from tests.test_train import tiny_config
from train import history, members, sweep, train
from train.errors import UserError

SEEDS = (0, 1, 2)


def seeds_config(epochs=3, layout="vmap"):
    config = tiny_config("backbone", epochs=epochs, max_train_examples=480)
    config.backbone_training.learning_rate = 3e-3
    config.backbone_training.patience = 1  # members stop at different epochs
    config.backbone_training.test_each_epoch = True  # each member's history.jsonl, as a run's
    config.sweep.seeds = SEEDS
    config.sweep.layout = layout
    return config


def member_params(state, m):
    return jax.tree.map(lambda x: np.asarray(x[m]), state["state"]["params"])


def assert_close(single, stacked, atol=1e-6):
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=atol)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A backbone sweep of three seeds: (workdir, final state, results)."""
    path = tmp_path_factory.mktemp("seeds") / "backbones"
    state, results = train.train_and_evaluate(seeds_config(), str(path))
    return path, state, results


@pytest.fixture(scope="module")
def plain_backbones(tmp_path_factory):
    """The plain backbone runs of members 0 and 2 (both layouts are compared with them)."""
    path = tmp_path_factory.mktemp("plain_backbones")
    configs = sweep.member_configs(seeds_config())
    return {m: train.train_and_evaluate(configs[m], str(path / str(m))) for m in (0, 2)} | {
        "path": path
    }


@pytest.fixture(scope="module")
def plain_attention(backbones, tmp_path_factory):
    """The plain attention run on member 1's backbone (both layouts are compared with it)."""
    plain = tiny_config("attention", epochs=2, max_train_examples=480)
    plain.attention.d = 4
    # a member is a backbone workdir
    plain.seed, plain.backbone_checkpoint = SEEDS[1], str(backbones[0] / "members" / "1")
    return train.train_and_evaluate(plain, str(tmp_path_factory.mktemp("plain_attention")))


@pytest.mark.parametrize("layout", ["vmap", "loop"])
def test_backbone_seeds_equal_plain_backbone_runs(backbones, plain_backbones, tmp_path, layout):
    path, state, results = backbones
    if layout == "loop":
        path = tmp_path / "loop"
        state, results = train.train_and_evaluate(seeds_config(layout=layout), str(path))
    rows = results["members"]
    assert results["members_stage"] == "backbone" and [r["seed"] for r in rows] == list(SEEDS)
    assert len({r["test_accuracy"] for r in rows}) > 1  # the seeds differ

    def single_dir(m):
        return plain_backbones["path"] / str(m)

    for m in (0, 2):
        single_state, single = plain_backbones[m]
        assert rows[m]["best_epoch"] == single["best_epoch"]
        assert rows[m]["early_stopped"] == single["early_stopped"]
        assert rows[m]["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-9)
        # vmapped, a convolution or dense layer whose weights differ per member is one batched
        # operation that sums in another order: Adam turns the last-bit differences of a
        # near-zero gradient into ~1e-6 of a weight over the run. Looped, each member's layers
        # are the plain run's own, but in one program with the other members' steps, which XLA
        # may fuse otherwise than the plain run's (jaxlib 0.10.2: within 1e-6; jaxlib 0.12.1:
        # one weight in 2,048 off by 1.2e-6). A stopped member's state is its state when it
        # stopped.
        atol = 1e-5
        assert_close(single_state["state"]["params"], member_params(state, m), atol)
        own = json.loads((path / "members" / str(m) / "results.json").read_text())
        assert own["test_accuracy"] == rows[m]["test_accuracy"] and own["stage"] == "backbone"
        assert own["epochs"] == single["epochs"]
        ours, theirs = history.read(path / "members" / str(m)), history.read(single_dir(m))
        assert [r["epoch"] for r in ours] == list(range(1, single["epochs"] + 1))
        for a, b in zip(ours, theirs, strict=True):
            assert a.keys() == b.keys() and "test_accuracy" in a
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_a_stopped_member_keeps_its_state():
    import jax.numpy as jnp
    import optax

    from train import steps

    def loss_fn(params, extra, frozen, x, y, rngs):
        del extra, frozen, rngs
        logits = x.reshape(len(x), -1)[:, :10] * params["w"]
        return jnp.mean(steps.cross_entropy(logits, y)), (logits, {})

    step = members.members_step(lambda mask: loss_fn, False, 4)
    one = steps.init_state({"w": jnp.ones(())}, optax.adam(0.1))
    state = jax.tree.map(lambda x: jnp.stack([x, x]), one)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3)), jnp.uint8)
    labels = jnp.arange(8) % 10
    new, metrics = step(
        state, jnp.stack([jax.random.key_data(jax.random.key(s)) for s in (0, 1)]),
        jnp.full((2,), 0.1), jnp.ones((2, 1)), {}, images, labels,
        jnp.stack([jnp.arange(8)] * 2), jnp.int32(0), members=(0,),
    )  # fmt: skip
    assert metrics["finite"].tolist() == [True, True] and float(metrics["loss"][1]) == 0.0
    assert float(new["params"]["w"][0]) != 1.0  # the active member trained
    assert float(new["params"]["w"][1]) == 1.0 and int(new["step"][1]) == 0  # the stopped one not


# the looped members run the NNX twin of the backbone (model.api): the same numbers as the
# plain Linen run
@pytest.mark.parametrize("layout, api", [("vmap", "linen"), ("loop", "nnx")])
def test_attention_on_each_members_backbone_equals_plain_runs(
    backbones, plain_attention, tmp_path, layout, api
):
    path = backbones[0]
    dirs = [str(path / "members" / str(m)) for m in range(len(SEEDS))]
    config = tiny_config("attention", epochs=2, max_train_examples=480)
    config.attention.d = 4
    config.sweep.seeds = SEEDS
    config.sweep.backbones = tuple(dirs)
    config.sweep.layout = layout
    config.model.api = api
    state, results = train.train_and_evaluate(config, str(tmp_path / "attention"))
    rows = results["members"]
    assert len({r["backbone_test_accuracy"] for r in rows}) > 1  # three different backbones
    m = 1
    single_state, single = plain_attention
    assert rows[m]["backbone_test_accuracy"] == pytest.approx(single["backbone_test_accuracy"])
    assert rows[m]["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-9)
    assert rows[m]["alpha"] == pytest.approx(single["alpha"], rel=1e-6, abs=1e-7)
    assert_close(single_state["state"]["params"], member_params(state, m))
    assert "| backbone | gain |" in (tmp_path / "attention" / "sweep.md").read_text()


def test_an_addon_on_each_members_backbone_equals_plain_runs(backbones, tmp_path):
    from configs import compare_toy_cifar10

    path = backbones[0]
    dirs = [str(path / "members" / str(m)) for m in range(2)]

    def gala():
        config = compare_toy_cifar10.get_config("gala,smoke")
        small = tiny_config("addon", epochs=2, max_train_examples=480)
        for section in ("dataset", "model", "attention_training"):
            config[section] = small[section]
        config.eval_batch_size = small.eval_batch_size
        config.addon.reduction = 2
        # the papers' gate Y = s X: with the residual gate (gamma from 0) the module's first
        # gradients are near 0, and Adam scales their last-bit noise up to a learning rate's step
        config.addon.gate = "direct"
        return config

    config = gala()
    config.sweep.seeds = (0, 1)
    config.sweep.backbones = tuple(dirs)
    state, results = train.train_and_evaluate(config, str(tmp_path / "gala"))
    plain = gala()
    plain.seed, plain.backbone_checkpoint = 1, dirs[1]
    single_state, single = train.train_and_evaluate(plain, str(tmp_path / "plain"))
    row = results["members"][1]
    assert row["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-9)
    assert row["backbone_test_accuracy"] == pytest.approx(single["backbone_test_accuracy"])
    assert_close(single_state["state"]["params"], member_params(state, 1))


def test_backbones_for_a_backbone_sweep_are_refused(tmp_path):
    config = seeds_config()
    config.sweep.backbones = ("a", "b", "c")
    with pytest.raises(UserError, match=r"config.sweep.backbones gives each member a frozen"):
        train.train_and_evaluate(config, str(tmp_path))


def test_a_backbone_sweep_crashed_after_a_member_stopped_resumes_as_an_uninterrupted_one(
    backbones, tmp_path, monkeypatch
):
    from tests.test_sweep import crash_after
    from tests.test_train import assert_trees_equal

    _, straight_state, straight = backbones
    stopped = [r["member"] for r in straight["members"] if r["epochs"] < straight["epochs"]]
    assert stopped and straight["epochs"] == 3  # a member stopped before the last epoch
    config = seeds_config()
    config.checkpoint_every_steps = 4  # 13 steps per epoch: saves within each epoch
    crash_after(monkeypatch, 30)  # epoch 3, its step 5
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path / "crashed"))
    monkeypatch.undo()
    state, results = train.train_and_evaluate(config, str(tmp_path / "crashed"))
    for key in ("test_accuracy", "best_epoch", "epochs", "early_stopped"):
        assert [r[key] for r in results["members"]] == [r[key] for r in straight["members"]]
    assert_trees_equal(state["state"], straight_state["state"])
