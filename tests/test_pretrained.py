"""The shipped toy CIFAR-10 models (pretrained/): intact, usable as a frozen backbone
(``--config.backbone_checkpoint``) and by every ``train.analyze`` command."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import toy_cifar10
from gattanet_jax import site_alphas
from tests.test_train import assert_trees_equal
from train import checkpoints, models, tasks
from train.errors import UserError
from train.tools import analyze

ANALYSES = ("noise", "lesion", "umap", "maps")  # cues: for models trained with cues
ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "pretrained" / "toy_cifar10_s0"
DIGESTS = {  # (best step, sha256 of the checkpoint's files), as pretrained/README.md lists them
    "backbone": (250, "d85d932de8daf4ed53830c05b8bbac45567bbab21a4343d1152a520463aa78d6"),
    "gattanet": (27, "ffbc22268a1c947a324141ef786fc905a295953cc15c54d82c973f06737db135"),
    "learned_q": (3, "1f02eb7d6ba7ad8f50295fbdd343d66cb6c158f395b7c49e98d1315e6c64924a"),
    "shifted_q": (3, "b0ad76ed5c755a1c73d15be734b17172eacc56330005e261a9bedcb936661528"),
}
ATTENTION = ("gattanet", "learned_q", "shifted_q")
OTHER_BACKBONES = {  # the other seeds' backbones of the comparison, as the README lists them
    "toy_cifar10_s1": (225, "3cbdddd734bffbf6f5bc3371ba0ab74a16a980c6660cd8439c7b0c3ae2ec1624"),
    "toy_cifar10_s2": (115, "415179f7fc3df008b023b816e40856bffe3e47f2e94c2aa597a1e3a2c849ee9b"),
}
OTHER_ATTENTION = {  # the models trained on them, as the README lists them
    "toy_cifar10_s1/gattanet": (
        76,
        "35a670f31906571a1b07e6dc9054ce2ed3ca5e086b4a7462c87c14d5158b33b0",
    ),
    "toy_cifar10_s1/learned_q": (
        20,
        "ba1d4710f65648f26b6098b9eab562449cf5daaa83bae132075271cb434404f4",
    ),
    "toy_cifar10_s2/gattanet": (
        111,
        "2004cad7caaa1321c5d4657201e380f4632ae3cc4f12db664839b778572028c9",
    ),
    "toy_cifar10_s1/shifted_q": (
        46,
        "f608f2bf2f3f96e7483c9bb5be3fb60e3508a6f7143b7e017a4e97383a93a1cc",
    ),
    "toy_cifar10_s2/learned_q": (
        67,
        "9c0021627d2ac28beebdb0cd2596c7c8d1805b5b58542e32e3a442abc14df5b5",
    ),
    "toy_cifar10_s1/gala": (
        15,
        "0eb97f4ab8e1898b36332b8ce85e0792f74ef7b3a456b9f77c441dd6ccf9fabb",
    ),
    "toy_cifar10_s2/shifted_q": (
        45,
        "4fcd4cbf324ed06a651cefd3b6cbfc39650d144f7e86fe15aa23eaf9959167a3",
    ),
    "toy_cifar10_s2/gala": (
        15,
        "aa3be6261e4655b61a1343d6742bdf78f452df59cc96a2b9e70ae0190e449729",
    ),
    "toy_cifar10_s1/se": (
        3,
        "ef4d40aea1ac1c8fd30e50349463cac65e9ff8297f2acef59cc8eabdee6ea1a2",
    ),
    "toy_cifar10_s2/se": (
        45,
        "d31ae8036670f2c141e39f19f714e1f4feeee790cd90ac33f5037670032f1936",
    ),
    "toy_cifar10_s1/gsa": (
        9,
        "0475b0f3e807c2cb2b61c18c2662b03c68c082f8e7f4e36e97368ade285bbbeb",
    ),
    "toy_cifar10_s2/gsa": (
        5,
        "b102353c816c54ad92ce35479d28202f8f80bcbf912abe75101e37f2bdf79708",
    ),
}


def test_the_shipped_checkpoints_are_the_documented_ones():
    readme = (SHIPPED.parent / "README.md").read_text()
    for name, (step, sha) in DIGESTS.items():
        assert checkpoints.digest(str(SHIPPED / name / "best"), step) == sha, name
        assert sha in readme, name
    for name in ATTENTION:
        results = json.loads((SHIPPED / name / "results.json").read_text())
        assert results["backbone_checkpoint_sha256"] == DIGESTS["backbone"][1], name

    def documented(model, step, sha):  # its digest, and its sha256 and accuracy in the README
        assert checkpoints.digest(str(model / "best"), step) == sha, model
        assert sha in readme, model
        results = json.loads((model / "results.json").read_text())
        assert results["best_epoch"] == step and f"{100 * results['test_accuracy']:.2f} %" in readme
        return results

    for name, (step, sha) in OTHER_BACKBONES.items():
        documented(SHIPPED.parent / name / "backbone", step, sha)
    for name, (step, sha) in OTHER_ATTENTION.items():
        results = documented(SHIPPED.parent / name, step, sha)
        seed = name.split("/")[0]
        assert results["backbone_checkpoint_sha256"] == OTHER_BACKBONES[seed][1], name
        config = json.loads((SHIPPED.parent / name / "config.json").read_text())
        assert config["backbone_checkpoint"] == f"pretrained/{seed}/backbone", name
    size = sum(f.stat().st_size for f in SHIPPED.parent.rglob("*") if f.is_file())
    assert size < 10 * 2**20  # everything shipped


def test_the_shipped_backbone_loads_as_a_frozen_backbone(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = toy_cifar10.get_config()  # the shipped models' config, as a user starts from
    config.backbone_checkpoint = "pretrained/toy_cifar10_s0/backbone"
    variables, (_, step, sha) = tasks.load_backbone(config, models.build_backbone(config))
    assert step == 250 and sha == DIGESTS["backbone"][1]
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 32)


def test_every_analysis_runs_on_the_shipped_gattanet(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.chdir(ROOT)  # its config names the backbone by its path in the repository
    workdir = tmp_path / "gattanet"  # the analyses write into <workdir>/analysis
    shutil.copytree(SHIPPED / "gattanet", workdir)
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        m = analyze.load(str(workdir), str(tmp_path / "tfds"), 40)
    results = json.loads((SHIPPED / "gattanet" / "results.json").read_text())
    alphas = {k: float(v) for k, v in site_alphas(m.variables["params"]).items()}
    assert alphas == pytest.approx(results["alpha"], rel=1e-6)
    backbone = jax.tree.map(np.asarray, m.backbone_vars)
    shipped = checkpoints.manager(SHIPPED / "backbone" / "best", keep=1, create=False)
    assert_trees_equal(backbone, shipped.restore(250)["variables"])
    rows = {r["lesion"]: r["accuracy"] for r in analyze.lesion(m, ["cccdd", "....."])["rows"]}
    assert rows["....."] == analyze.lesion(m, ["....."])["baseline_accuracy"]
    assert len(analyze.noise(m, sigmas=(0.0, 0.1))["rows"]) == 2
    assert analyze.umap(m)["d"] == 16
    analyze.maps(m, (0, 1))
    with pytest.raises(UserError, match="trained without top-down cues"):  # the paper's model
        analyze.cues(m, (0.0, 1.0), batch=20)
    assert {p.name for p in m.out.glob("*.png")} == {f"{a}.png" for a in ANALYSES}


def test_the_shipped_controls_load_and_compare_with_gattanet(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.chdir(ROOT)
    runs = []
    for name in ATTENTION:
        shutil.copytree(SHIPPED / name, tmp_path / name)
        runs.append(str(tmp_path / name))
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        data = {"data_dir": str(tmp_path / "tfds"), "max_examples": 40}
        loaded = {n: analyze.load(r, **data) for n, r in zip(ATTENTION, runs, strict=True)}
        result = analyze.paired(tmp_path / "paired", runs, **data)
    for name, m in loaded.items():
        results = json.loads((SHIPPED / name / "results.json").read_text())
        alphas = {k: float(v) for k, v in site_alphas(m.variables["params"]).items()}
        assert alphas == pytest.approx(results["alpha"], rel=1e-6), name
    assert loaded["learned_q"].variables["params"]["q_avg_learned"].shape == (16,)
    assert loaded["shifted_q"].attention.q_avg_source == "shifted"
    bases = {c["accuracy_b"] for c in result["against_backbone"]}
    assert len(bases) == 1 and len(result["pairs"]) == 3  # one frozen backbone under all three
    assert analyze.shifted(loaded["gattanet"])["test_examples"] == 40
    with pytest.raises(UserError, match="trained with q_avg_source='learned'"):
        analyze.shifted(loaded["learned_q"])
