"""Beyond the paper in training: joint fine-tuning (with two heads)."""

import numpy as np
import pytest

from tests.test_train import leaves, tiny_config
from train import train
from train.tools import analyze


def test_joint_fine_tuning_trains_the_backbone_with_its_own_learning_rate(tmp_path):
    config = tiny_config("both", epochs=1)
    config.dataset.max_test_examples = 64
    config.attention_training.finetune_backbone = True
    config.attention_training.backbone_learning_rate = 1e-3
    config.attention.heads = 2  # (T = 2 trains in test_analyze's cued run)
    _, results = train.train_and_evaluate(config, str(tmp_path))
    m = analyze.load(str(tmp_path / "attention"))
    # the fine-tuned backbone moved away from the pretrained one, which is kept as the baseline
    tuned, original = leaves(m.backbone_vars["params"]), leaves(m.baseline_vars["params"])
    assert all(np.abs(a - b).max() > 0 for a, b in zip(tuned, original, strict=True))
    assert m.attention.heads == 2
    att, base, _ = analyze.outputs(m, m.test.images)
    assert analyze.accuracy(att, m.test.labels) == pytest.approx(results["test_accuracy"])
    assert analyze.accuracy(base, m.test.labels) == pytest.approx(results["backbone_test_accuracy"])
    assert results["backbone_test_accuracy"] == results["backbone_stage"]["test_accuracy"]
    assert np.asarray(results["alpha"]["conv1"]).shape == (2,)
    assert results["trainable_params"] > results["backbone_stage"]["trainable_params"]
    # a rerun resumes the finished run: same numbers
    _, again = train.train_and_evaluate(config, str(tmp_path))
    assert again["test_accuracy"] == results["test_accuracy"]


def test_fine_tuning_gradients_and_batch_norm_statistics_frozen_or_updated():
    import jax
    import jax.numpy as jnp

    import gattanet_jax as gj
    from gattanet_jax.backbones import resnet
    from tests.test_systems import randomize

    net = resnet.ResNet(stage_sizes=(1, 1, 1, 1), block="basic", num_classes=5, width=4)
    bv = randomize(
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))), fan_in=True
    )
    sites = gj.resolve_sites(net, bv, (32, 32, 3), ("stem", "layer1", "avgpool", "fc"))
    attention = gj.AttentionSystem(sites, d=4, alpha_init=0.1, dropout_rate=0.0)
    av = gj.init_attention(attention, jax.random.key(1))
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3))

    def run(bv, train_backbone=True, backbone_batch_stats="frozen"):
        kw = dict(train_backbone=train_backbone, backbone_batch_stats=backbone_batch_stats)
        return gj.two_pass(net, attention, av, bv, x, train=True, rng=jax.random.key(3), **kw)

    run = jax.jit(run, static_argnames=("train_backbone", "backbone_batch_stats"))

    def grads(train_backbone):
        def loss(params):
            out = run({**bv, "params": params}, train_backbone=train_backbone)
            return jnp.sum(out.logits**2)

        return jax.jit(jax.grad(loss))(bv["params"])

    frozen_grads = grads(False)
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(frozen_grads))
    tuned_grads = grads(True)
    assert float(jnp.abs(tuned_grads["stem"]["conv1"]["kernel"]).sum()) > 0
    # 'frozen' statistics: stored ones used, nothing to update
    out = run(bv)
    assert out.backbone_updates == {}
    # 'update': batch statistics, new running averages returned
    out = run(bv, backbone_batch_stats="update")
    new = out.backbone_updates["batch_stats"]["stem"]["bn1"]["mean"]
    assert not np.allclose(new, bv["batch_stats"]["stem"]["bn1"]["mean"])
    with pytest.raises(ValueError, match="backbone_batch_stats"):
        run(bv, backbone_batch_stats="sometimes")


def test_beyond_config_variants():
    from configs import beyond_toy_cifar10 as beyond
    from train.tools import summary

    t2 = beyond.get_config("t2")
    assert t2.attention.iterations == 2 and t2.attention.bounded
    assert not beyond.get_config("t2free").attention.bounded
    assert beyond.get_config("t1").attention.iterations == 1
    assert summary.summarize(beyond.get_config("heads2"))["attention_params"] == 23178
    cue = summary.summarize(beyond.get_config("cue"))
    assert cue["attention_params"] == 15845 + 10 * 16  # plus the class embedding
    assert beyond.get_config("finetune").attention_training.finetune_backbone
    with pytest.raises(ValueError, match="unknown variant"):
        beyond.get_config("t")
