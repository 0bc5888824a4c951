"""ResNet18/50: torchvision's architecture, Table 1's parameter counts, weight conversion, the
ResNet attention variant, ImageNet preprocessing, and the attention stage on mock ImageNet."""

import hashlib
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gattanet_jax as gj
from configs import resnet18_imagenet, resnet50_imagenet
from gattanet_jax import weights
from gattanet_jax.backbones import resnet
from train.data import imagenet
from train.errors import UserError
from train.tools import summary

# Table 1: (config module, d) -> attention parameters as printed in the paper.
TABLE1_RESNET = [
    (resnet18_imagenet, 8, 68.9e3),
    (resnet18_imagenet, 16, 101.4e3),
    (resnet18_imagenet, 32, 166.5e3),
    (resnet50_imagenet, 4, 78.7e3),
    (resnet50_imagenet, 8, 118.0e3),
    (resnet50_imagenet, 16, 196.7e3),
    (resnet50_imagenet, 32, 353.9e3),
    (resnet50_imagenet, 64, 668.4e3),
]


@pytest.mark.parametrize(("module", "d", "paper"), TABLE1_RESNET)
def test_attention_parameter_counts_match_table_1(module, d, paper):
    config = module.get_config()
    config.attention.d = d
    s = summary.summarize(config)
    # exact to the paper's printed precision (0.1K), and summary says so beside the figure
    assert round(s["attention_params"] / 100) * 100 == round(paper), s["attention_params"]
    assert s["table1_attention_params"] == paper and s["matches_table1"] is True
    # torchvision's own counts for the backbones, and the paper's six sites at 224 px
    assert (
        s["backbone_params"]
        == {"resnet18": 11_689_512, "resnet50": 25_557_032}[config.model.backbone]
    )
    assert s["lesion_notation"] == "ccccdd"
    shapes = [tuple(site["shape"]) for site in s["sites"]]
    assert shapes[0] == (112, 112, 64) and shapes[-1] == (1000,)
    assert [sh[:2] for sh in shapes[1:4]] == [(56, 56), (28, 28), (14, 14)]


def random_state_dict(model, image_shape, seed=0):
    """Random torchvision-format weights for ``model`` (names from the model's own tree, so a
    wrong name shows up in the independent torch reference instead)."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape))))
    rng = np.random.default_rng(seed)
    sd = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        keys = [k.key for k in path]
        collection, modules, leaf_name = keys[0], keys[1:-1], keys[-1]
        suffix = weights._LEAF[(collection, leaf_name)]
        name = f"{resnet.torch_name(modules)}.{suffix}"
        shape = leaf.shape
        if leaf_name == "kernel" and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif leaf_name == "kernel":
            shape = shape[::-1]
            value = rng.normal(0, np.sqrt(1.0 / shape[1]), shape)
        elif leaf_name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0, 0.1, shape)
        sd[name] = value.astype(np.float32)
        if leaf_name == "mean":
            sd[name.replace("running_mean", "num_batches_tracked")] = np.array(7, np.int64)
    return sd


VARIANTS = {
    "basic": dict(stage_sizes=(2, 1, 1, 1), block="basic", width=8, num_classes=10),
    "bottleneck": dict(stage_sizes=(1, 2, 1, 1), block="bottleneck", width=8, num_classes=10),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", width=64, num_classes=1000),
}


# The torch logits of each variant, computed once by tests/torch_resnet.py where torch is
# installed (`python -m tests.test_resnet`), for the environments without torch.
STORED = os.path.join(os.path.dirname(__file__), "data", "torch_resnet_logits.npz")


def torch_case(variant):
    """The variant's model, random torchvision-format weights, their sha256, and two images."""
    kw = VARIANTS[variant]
    size = 64 if variant == "resnet50" else 40
    model = resnet.ResNet(**kw)
    sd = random_state_dict(model, (size, size, 3))
    digest = hashlib.sha256(b"".join(sd[k].tobytes() for k in sorted(sd))).hexdigest()
    x = np.random.default_rng(1).uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    return model, sd, digest, x


def converted_logits(model, sd, x):
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *x.shape[1:]))))
    variables = weights.from_torchvision(sd, abstract, resnet.torch_name)
    return np.asarray(jax.jit(model.apply)(variables, x))


def torch_logits(variant, sd, x):
    import tests.torch_resnet as torch_resnet

    kw = VARIANTS[variant]
    return torch_resnet.forward(
        sd, x, kw["stage_sizes"], kw["block"] == "bottleneck", resnet.IMAGENET_MEAN,
        resnet.IMAGENET_STD,
    )  # fmt: skip


@pytest.mark.reference
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_weights_give_the_torch_logits(variant):
    pytest.importorskip("torch")
    model, sd, _, x = torch_case(variant)
    ours, ref = converted_logits(model, sd, x), torch_logits(variant, sd, x)
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel < 1e-4, rel


@pytest.mark.reference
@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_weights_give_the_stored_torch_logits(variant, api):
    """The same comparison without torch: against the logits torch gave for the same weights
    (the weights' sha256 is stored with them, so the reference is for these weights); on the
    Linen ResNet and on its NNX twin (``resnet_nnx.load_torchvision``)."""
    model, sd, digest, x = torch_case(variant)
    with np.load(STORED) as stored:
        assert str(stored[f"{variant}/weights_sha256"]) == digest, "other weights than stored"
        ref = stored[f"{variant}/logits"]
    if api == "nnx":
        from flax import nnx

        from gattanet_jax.backbones import resnet_nnx

        twin = resnet_nnx.ResNet(**VARIANTS[variant], rngs=nnx.Rngs(0))
        resnet_nnx.load_torchvision(twin, sd, x.shape[1])
        twin.eval()
        ours = np.asarray(nnx.jit(lambda m, x: m(x))(twin, x))
    else:
        ours = converted_logits(model, sd, x)
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel < 1e-4, rel


def store_torch_logits(path=STORED):
    """Writes the torch logits of every variant (needs torch)."""
    arrays = {}
    for variant in sorted(VARIANTS):
        _, sd, digest, x = torch_case(variant)
        arrays[f"{variant}/logits"] = torch_logits(variant, sd, x)
        arrays[f"{variant}/weights_sha256"] = np.array(digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    print(f"wrote {path}")


def test_pth_safetensors_and_npz_read_the_same(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    model = resnet.ResNet(**VARIANTS["basic"])
    sd = random_state_dict(model, (32, 32, 3))
    torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, tmp_path / "w.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **sd)
    for name in ("w.pth", "w.safetensors", "w.npz"):
        read = weights.read_state_dict(tmp_path / name)
        assert sorted(read) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(read[k], sd[k])


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pth_loading_never_runs_code_from_the_file(tmp_path):
    pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"conv1.weight": _RunsCode(str(marker))}))
    with pytest.raises(weights.WeightsError, match="cannot read weights file"):
        weights.read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_mismatched_weights_list_missing_unexpected_and_misshaped_names():
    model = resnet.ResNet(**VARIANTS["basic"])
    sd = random_state_dict(model, (32, 32, 3))
    del sd["layer2.0.downsample.1.running_var"]
    sd["layer5.0.conv1.weight"] = np.zeros((3, 3), np.float32)
    sd["fc.weight"] = np.zeros((7, 64), np.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    with pytest.raises(weights.WeightsError) as e:
        weights.from_torchvision(sd, abstract, resnet.torch_name)
    msg = str(e.value)
    assert "1 missing: layer2.0.downsample.1.running_var (16,)" in msg
    assert "1 unexpected: layer5.0.conv1.weight (3, 3)" in msg
    assert "1 mis-shaped: fc.weight: file (7, 64), model needs (10, 64)" in msg
    assert "num_batches_tracked" not in msg


def test_weights_of_another_dtype_or_with_non_finite_values_are_named():
    """An integer array where the model has floats (a quantized or foreign state dict) and an
    array holding NaN or infinity are refused by name, never cast or loaded."""
    model = resnet.ResNet(**VARIANTS["basic"])
    sd = random_state_dict(model, (32, 32, 3))
    sd["conv1.weight"] = sd["conv1.weight"].astype(np.int8)
    sd["fc.bias"] = np.full_like(sd["fc.bias"], np.nan)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    with pytest.raises(weights.WeightsError) as e:
        weights.from_torchvision(sd, abstract, resnet.torch_name)
    msg = str(e.value)
    assert "1 of another dtype: conv1.weight is int8, model needs floating point" in msg, msg
    assert "1 with non-finite values: fc.bias (10 of 10)" in msg, msg
    assert "\n" not in msg


def resnet_attention(batch_norm=True, layer_norm=True, d=3):
    model = resnet.ResNet(**VARIANTS["basic"])
    bv = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    sites = gj.resolve_sites(model, bv, (32, 32, 3), resnet.RESNET_SITES)
    att = gj.AttentionSystem(
        sites, d=d, alpha_init=0.3, batch_norm_kq=batch_norm, layer_norm_gatta=layer_norm
    )
    return model, bv, att


def test_key_query_batch_norm_in_training_mode_is_its_formula():
    """Training mode: each of the d key (query) features normalised with the batch's mean and
    biased variance over batch and positions, epsilon 1e-3, then scale and offset; running
    averages move by momentum 0.99. Dense sites: plain biases, no normalisation."""
    _, _, att = resnet_attention(layer_norm=False)
    att = att.clone(dropout_rate=0.0)
    rng = np.random.default_rng(30)
    acts = {s.name: rng.normal(size=(4, *s.shape)).astype(np.float32) for s in att.sites}
    av = gj.init_attention(att, jax.random.key(1))
    av = jax.tree.map(lambda a: a + rng.uniform(0.2, 0.8, a.shape).astype(np.float32), av)
    out, updates = att.apply(av, acts, train=True, mutable=["batch_stats"])
    for site in att.sites:
        p = jax.tree.map(np.asarray, av["params"][gj.attention.param_name(site.name)])
        a = acts[site.name].astype(np.float64)
        for w, got in (("K", out.keys[site.name]), ("Q", out.queries[site.name])):
            if site.kind == "dense":  # k_j(c,:) = A_j(c) K_j(c,:) + b
                expected = a[..., None] * p[w] + p[f"{w}_bias"]
            else:
                raw = a @ p[w]
                axes = tuple(range(raw.ndim - 1))
                mean, var = raw.mean(axes), raw.var(axes)
                expected = (raw - mean) / np.sqrt(var + 1e-3) * p[f"{w}_bn_scale"]
                expected = expected + p[f"{w}_bn_offset"]
                stats = jax.tree.map(np.asarray, av["batch_stats"][site.name])
                new = updates["batch_stats"][site.name]
                np.testing.assert_allclose(
                    new[f"{w}_mean"], 0.99 * stats[f"{w}_mean"] + 0.01 * mean, rtol=1e-5
                )
                np.testing.assert_allclose(
                    new[f"{w}_var"], 0.99 * stats[f"{w}_var"] + 0.01 * var, rtol=1e-4
                )
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=site.name)


def test_resnet_attention_variant_trains_its_statistics_and_folds_them_for_inference():
    model, bv, att = resnet_attention()
    av = gj.init_attention(att, jax.random.key(1))
    assert sorted(av["params"]["stem"]) == [
        "K", "K_bn_offset", "K_bn_scale", "Q", "Q_bn_offset", "Q_bn_scale", "alpha",
        "gatta_offset", "gatta_scale",
    ]  # fmt: skip
    assert sorted(av["params"]["fc"]) == [
        "K", "K_bias", "Q", "Q_bias", "alpha", "gatta_offset", "gatta_scale",
    ]  # fmt: skip
    assert sorted(av["batch_stats"]) == ["layer1", "layer2", "layer3", "stem"]  # conv sites
    assert av["params"]["stem"]["gatta_scale"].shape == (16, 16)  # one per position
    assert av["params"]["fc"]["gatta_scale"].shape == (10,)  # one per unit
    x = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3))
    run = jax.jit(
        lambda v, x, train, internals: gj.two_pass(
            model, att, v, bv, x, train=train, rng=jax.random.key(3), return_internals=internals
        ),
        static_argnums=(2, 3),
    )
    out = run(av, x, True, False)
    stats = out.updates["batch_stats"]
    assert float(jnp.max(jnp.abs(stats["layer1"]["K_mean"]))) > 0  # running averages moved
    trained = {"params": av["params"], **out.updates}
    # inference: the keys' and queries' BatchNorm folded into K and Q equals materialising them
    fast = run(trained, x, False, False).logits
    full = run(trained, x, False, True)
    np.testing.assert_allclose(fast, full.logits, rtol=2e-5, atol=2e-5)
    # LayerNorm over each map: zero mean and unit variance before scale and offset
    g = full.attention.gatta["stem"]
    np.testing.assert_allclose(jnp.mean(g, axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(g, axis=(1, 2)), 1, atol=1e-3)
    # alpha = 0 is still exactly the backbone
    zero = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if p[-1].key == "alpha" else v, trained
    )
    np.testing.assert_allclose(
        run(zero, x, False, False).logits, jax.jit(model.apply)(bv, x), rtol=1e-6, atol=1e-6
    )


def test_random_resized_crop_and_centre_crop():
    image = np.random.default_rng(0).integers(0, 256, (50, 90, 3), np.uint8)
    a = imagenet.random_resized_crop(image, np.random.default_rng(5), 24)
    b = imagenet.random_resized_crop(image, np.random.default_rng(5), 24)
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # a function of the generator's state
    # shorter side 50 -> 28 (longer 90 -> 50), then the centre 24 x 24
    ramp = np.tile(np.arange(90, dtype=np.uint8)[None, :, None], (50, 1, 3))
    c = imagenet.resize_center_crop(ramp, 24, 28)
    assert c.shape == (24, 24, 3)
    assert abs(float(c[:, 12].mean()) - 45) < 3  # the middle column stays in the middle
    # a tall, thin image falls back to a centre crop at the extreme allowed aspect ratio
    thin = np.zeros((200, 10, 3), np.uint8)
    assert imagenet.random_resized_crop(thin, np.random.default_rng(0), 8).shape == (8, 8, 3)


def summary_count(config):
    return summary.summarize(config)["attention_params"]


def test_attention_stage_on_a_tiny_resnet_with_mock_imagenet(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from train import models, train

    config = resnet18_imagenet.get_config("tiny")
    config.dataset.data_dir = str(tmp_path / "tfds")
    model = models.build_backbone(config)
    np.savez(tmp_path / "r.npz", **random_state_dict(model, config.dataset.image_shape))
    config.backbone_checkpoint = str(tmp_path / "r.npz")
    with tfds.testing.mock_data(num_examples=80, policy=tfds.testing.MockPolicy.USE_CODE):
        state, results = train.train_and_evaluate(config, str(tmp_path / "wd"))
        assert results["steps"] == 48 // 8  # 64 examples, a quarter held out, batch 8
        assert results["backbone_checkpoint"] == str(tmp_path / "r.npz")
        saved = json.loads((tmp_path / "wd" / "results.json").read_text())
        assert saved == results and saved["trainable_params"] == summary_count(config)
        # 24 test images: accuracies are whole counts of them; the loss is a real number
        for key in ("test_accuracy", "backbone_test_accuracy"):
            assert saved[key] * 24 == pytest.approx(round(saved[key] * 24), abs=1e-6)
        assert np.isfinite(saved["test_loss"]) and saved["test_loss"] > 0
        # the attention's BatchNorm statistics were trained and checkpointed with the state
        stats = state["variables"]["batch_stats"]
        assert float(jnp.max(jnp.abs(stats["stem"]["K_mean"]))) > 0
        assert os.path.isdir(tmp_path / "wd" / "best")
        # resuming a finished run changes nothing
        _, again = train.train_and_evaluate(config, str(tmp_path / "wd"))
        assert again["test_accuracy"] == results["test_accuracy"]


def test_wrong_weights_file_is_one_clear_error(tmp_path):
    from train import train

    config = resnet18_imagenet.get_config("tiny")
    config.backbone_checkpoint = str(tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"weights file .*missing\.pth' not found"):
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    np.savez(tmp_path / "toy.npz", conv1=np.zeros(3))
    config.backbone_checkpoint = str(tmp_path / "toy.npz")
    fits = r"do not fit the model: 62 missing: bn1\.bias .*conv1\.weight \(8, 3, 7, 7\)"
    with pytest.raises(UserError, match=fits + r".* \| 1 unexpected: conv1 "):
        train.train_and_evaluate(config, str(tmp_path / "wd"))


if __name__ == "__main__":
    store_torch_logits()
