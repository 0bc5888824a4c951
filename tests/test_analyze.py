"""train.analyze on a tiny trained model: every analysis writes its figure and numbers."""

import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_train import tiny_config
from train import train
from train.errors import UserError
from train.tools import analyze
from train.tools.analyses import paired as paired_analysis
from train.tools.analyses import seeds as seeds_analysis


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config("both", epochs=1)
    config.dataset.max_test_examples = 96
    # the NNX twin of the backbone (model.api): every analysis on it (the Linen one: the
    # shipped models, tests/test_pretrained.py)
    config.model.api = "nnx"
    train.train_and_evaluate(config, str(root))
    return root / "attention"


@pytest.fixture(scope="module")
def model(trained):
    return analyze.load(str(trained))


def written(m, name):
    assert (m.out / f"{name}.png").stat().st_size > 10_000
    return json.loads((m.out / f"{name}.json").read_text())


def test_noise_curves_start_at_the_trained_accuracies(model):
    result = analyze.noise(model, sigmas=(0.0, 0.01, 0.25))
    assert written(model, "noise") == dict(result, workdir=str(model.workdir), figure="noise.png")
    clean = result["rows"][0]
    assert clean["attention_accuracy"] == model.results["test_accuracy"]
    assert clean["baseline_accuracy"] == model.results["backbone_test_accuracy"]
    assert [r["sigma"] for r in result["rows"]] == [0.0, 0.01, 0.25]


def test_lesions_by_default_and_no_site_is_exactly_the_baseline(model):
    result = analyze.lesion(model)
    rows = {r["lesion"]: r["accuracy"] for r in result["rows"]}
    assert list(rows) == [
        "cccdd", ".ccdd", "c.cdd", "cc.dd", "ccc.d", "cccd.",
        "c....", ".c...", "..c..", "...d.", "....d", ".....",
    ]  # fmt: skip
    assert rows["....."] == result["baseline_accuracy"] == model.results["backbone_test_accuracy"]
    assert rows["cccdd"] == model.results["test_accuracy"]
    assert written(model, "lesion")["rows"] == result["rows"]
    with pytest.raises(UserError, match="one character per site"):
        analyze.lesion(model, ["ccc"])


def test_umap_of_q_avg(model):
    result = analyze.umap(model)
    assert written(model, "umap")["d"] == 16
    saved = np.load(model.out / "umap.npz")
    assert saved["embedding"].shape == (96, 2) and saved["q_avg"].shape == (96, 16)
    assert result["test_examples"] == 96
    q, labels = saved["q_avg"], saved["labels"]
    assert result["q_avg_10nn_accuracy"] == analyze.knn_accuracy(q, labels, 10)


def test_knn_accuracy_against_a_loop():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    x = rng.normal(size=(40, 4)) + labels[:, None] * 0.8  # overlapping clusters
    hits = 0
    for i in range(40):
        dist = [np.sum((x[i] - x[j]) ** 2) if j != i else np.inf for j in range(40)]
        votes = np.bincount(labels[np.argsort(dist)[:5]], minlength=3)
        hits += votes.argmax() == labels[i]
    assert analyze.knn_accuracy(x, labels, k=5) == hits / 40
    assert 0.4 < hits / 40 < 1.0  # neither chance nor trivial
    with pytest.raises(UserError, match="0 < k < 40"):
        analyze.knn_accuracy(x, labels, k=40)


def test_maps_and_the_true_class_agreement(model):
    result = analyze.maps(model, [0, 5])
    saved = written(model, "maps")
    assert saved["images"] == [0, 5] and saved["logits_site"] == "logits"
    # recomputed here from the two-pass forward: the logits site's agreement per class unit
    import gattanet_jax as gj

    forward = functools.partial(gj.two_pass, model.backbone, model.attention, return_internals=True)
    images = np.asarray(model.test.images, np.float32) / 255.0
    out = jax.jit(forward)(model.variables, model.backbone_vars, images)
    g = np.asarray(out.attention.gatta["logits"])
    assert g.shape == (96, 10) and np.all(np.isfinite(g))
    labels = np.asarray(model.test.labels)
    highest = float(np.mean(g.argmax(-1) == labels))
    assert result["true_class_has_highest_agreement"] == pytest.approx(highest, abs=1e-9)
    lowest = float(np.mean(g.argmin(-1) == labels))
    assert result["true_class_has_lowest_agreement"] == pytest.approx(lowest, abs=1e-9)
    alpha = result["logits_site_alpha"]
    assert alpha == float(model.variables["params"]["logits"]["alpha"]) and alpha != 0
    largest = float(np.mean((alpha * g).argmax(-1) == labels))
    assert result["true_class_has_largest_factor"] == pytest.approx(largest, abs=1e-9)
    with pytest.raises(UserError, match=r"test indices in \[0, 96\)"):
        analyze.maps(model, [96])


def test_table_from_workdirs(trained, tmp_path):
    text = analyze.table(tmp_path, [str(trained), str(trained)])
    lines = text.strip().splitlines()
    assert lines[0].startswith("| backbone | data | base params | base acc. | d |")
    results = json.loads((trained / "results.json").read_text())
    assert lines[2].startswith(
        f"| toy | embedded | 3,226 | {100 * results['backbone_test_accuracy']:.2f} | 16 | 1,637 |"
    )
    assert len(lines) == 4 and (tmp_path / "table.md").read_text() == text
    with pytest.raises(UserError, match="not a finished attention workdir"):
        analyze.table(tmp_path, [str(trained.parent / "backbone")])


def test_cli(trained):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "train.analyze", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    r = cli("lesion", f"--workdir={trained}", "--lesions=cccdd,.....")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1].endswith("lesion.png and lesion.json")
    r = cli("noise", f"--workdir={trained.parent / 'backbone'}")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"error: {trained.parent / 'backbone'} holds a 'backbone' stage; analyses need an "
        "attention workdir (for stage=both, pass <workdir>/attention)"
    )
    r = cli("histogram", f"--workdir={trained}")
    assert r.returncode == 2 and "usage: python -m train.analyze {noise|lesion|" in r.stderr


@pytest.fixture(scope="module")
def cued(trained, tmp_path_factory):
    """Trained with top-down cues (half the examples cued with their class) and T = 2, on the
    backbone of `trained`."""
    root = tmp_path_factory.mktemp("cued")
    config = tiny_config("attention", epochs=1)
    config.backbone_checkpoint = str(trained.parent / "backbone")
    config.dataset.max_test_examples = 96
    config.attention.cue_classes = True
    config.attention.cue_fraction = 0.5
    config.attention.iterations = 2
    config.attention.bounded = True
    train.train_and_evaluate(config, str(root))
    return analyze.load(str(root))


def test_cue_analysis_true_wrong_and_uncued(cued, model):
    table = np.asarray(cued.variables["params"]["cue_embedding"])
    assert table.shape == (10, 16) and np.abs(table).sum() > 0  # trained from zeros
    result = analyze.cues(cued, weights=(0.0, 1.0))
    assert written(cued, "cues")["rows"] == result["rows"]
    first = result["rows"][0]  # weight 0: every cue is ignored
    assert first["true_cue_accuracy"] == first["wrong_cue_accuracy"] == first["uncued_accuracy"]
    assert first["uncued_accuracy"] == pytest.approx(cued.results["test_accuracy"])
    labels = np.asarray(cued.test.labels)
    wrong = analyze.wrong_classes(labels, 10)
    assert np.all(wrong != labels) and np.all((wrong >= 0) & (wrong < 10))
    with pytest.raises(UserError, match="without top-down cues"):
        analyze.cues(model)


def test_seeds_draws_the_mean_and_sd_of_several_runs(trained, cued, tmp_path):
    runs = [str(trained), str(cued.workdir)]
    result = analyze.seeds(tmp_path / "seeds", runs, sigmas=[0.0, 0.1], lesions=["cccdd", "....."])
    for run, per_run in zip(runs, result["per_run"], strict=True):
        saved = json.loads((analyze.Path(run) / "analysis" / "noise.json").read_text())
        assert per_run["noise"]["rows"] == saved["rows"]
    gains = [
        100
        * (p["noise"]["rows"][1]["attention_accuracy"] - p["noise"]["rows"][1]["baseline_accuracy"])
        for p in result["per_run"]
    ]
    assert result["noise"][1]["gain"]["mean"] == pytest.approx(np.mean(gains))
    assert result["noise"][1]["gain"]["sd"] == pytest.approx(np.std(gains, ddof=1))
    # no site modulated: each run's frozen baseline, so no gain at all
    assert result["lesion"][1]["gain"] == {"mean": pytest.approx(0.0), "sd": pytest.approx(0.0)}
    for name in ("noise.png", "lesion.png"):
        assert (tmp_path / "seeds" / name).stat().st_size > 10_000
    text = (tmp_path / "seeds" / "seeds.md").read_text()
    assert "| 0.1 |" in text and "| `.....` |" in text
    with pytest.raises(UserError, match="two or more attention workdirs"):
        analyze.seeds(tmp_path, runs[:1])


def test_seeds_mean_and_sample_sd_over_runs(trained, cued, tmp_path, monkeypatch):
    runs = [str(trained), str(cued.workdir)]
    accuracies = {runs[0]: (0.50, 0.60, 0.40), runs[1]: (0.54, 0.70, 0.30)}  # base, att, lesion

    def fake_noise(m, sigmas):
        base, att, _ = accuracies[str(m.workdir)]
        row = {"baseline_accuracy": base, "attention_accuracy": att}
        return {"rows": [dict(row, sigma=s) for s in sigmas]}

    def fake_lesion(m, lesions):
        base, att, lesioned = accuracies[str(m.workdir)]
        rows = [{"lesion": "cccdd", "accuracy": att}, {"lesion": ".cccd", "accuracy": lesioned}]
        return {"baseline_accuracy": base, "rows": rows}

    monkeypatch.setattr(seeds_analysis, "noise", fake_noise)
    monkeypatch.setattr(seeds_analysis, "lesion", fake_lesion)
    result = analyze.seeds(tmp_path, runs, sigmas=[0.0, 0.1])
    gain = result["noise"][0]["gain"]  # 10 and 16 points
    assert gain["mean"] == pytest.approx(13.0) and gain["sd"] == pytest.approx(
        np.std([10, 16], ddof=1)
    )
    assert result["noise"][0]["baseline_accuracy"]["mean"] == pytest.approx(52.0)
    lesioned = result["lesion"][1]  # -10 and -24 points from each run's own baseline
    assert lesioned["gain"]["mean"] == pytest.approx(-17.0)
    assert lesioned["accuracy"]["sd"] == pytest.approx(np.std([40, 30], ddof=1))
    assert "| `.cccd` | 35.00 ± 7.07 | -17.00 ± 9.90 |" in (tmp_path / "seeds.md").read_text()


def test_mcnemar_exact_p_values():
    assert analyze.mcnemar_p(0, 0) == 1.0 and analyze.mcnemar_p(5, 5) == 1.0
    assert analyze.mcnemar_p(3, 0) == pytest.approx(0.25)  # 2 * (1/2)^3
    assert analyze.mcnemar_p(10, 20) == pytest.approx(0.09873714670539)  # 2 * P(X <= 10), n = 30
    # n in the thousands, as on a full test set: binomial coefficients past a float's range
    assert analyze.mcnemar_p(1500, 1400) == pytest.approx(0.065987349665, rel=1e-6)


def test_paired_compares_runs_example_by_example(trained, cued, tmp_path):
    runs = [str(trained), str(cued.workdir)]
    result = analyze.paired(tmp_path / "paired", runs)
    (first, second), (pair,) = result["against_backbone"], result["pairs"]
    results = [json.loads((analyze.Path(r) / "results.json").read_text()) for r in runs]
    for c, r in zip((first, second), results, strict=True):
        assert c["accuracy_a"] == pytest.approx(r["test_accuracy"])
        assert c["accuracy_b"] == pytest.approx(r["backbone_test_accuracy"])
    assert (pair["a"], pair["b"]) == tuple(runs) and result["test_examples"] == 96
    assert pair["accuracy_a"] - pair["accuracy_b"] == pytest.approx(pair["difference"])
    assert (pair["only_a"] - pair["only_b"]) / 96 == pytest.approx(pair["difference"])
    counts = ("both_right", "only_a", "only_b", "both_wrong")
    assert sum(pair[k] for k in counts) == 96
    assert pair["mcnemar_p"] == analyze.mcnemar_p(pair["only_a"], pair["only_b"])
    saved = json.loads((tmp_path / "paired" / "paired.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert len((tmp_path / "paired" / "paired.md").read_text().splitlines()) == 4 + 3
    with pytest.raises(UserError, match="two or more attention or add-on workdirs"):
        analyze.paired(tmp_path, runs[:1])


def test_paired_takes_an_addon_of_train_compare(trained, tmp_path):
    """An SE add-on on the same frozen backbone: its test logits and its backbone's, read back
    from its best checkpoint, give the accuracy and loss its training measured."""
    import optax

    from train.tools import compare
    from train.tools import trained as trained_tools

    config = compare.run_config("se", str(trained.parent / "backbone"), 0, "smoke")
    tiny = tiny_config("attention", epochs=1)
    config.dataset, config.model, config.eval_batch_size = tiny.dataset, tiny.model, 50
    config.dataset.max_test_examples = 96
    config.attention_training.update(batch_size=32, num_epochs=1, learning_rate=0.05)
    _, results = train.train_and_evaluate(config, str(tmp_path / "se"))
    labels, logits, base = trained_tools.addon_logits(str(tmp_path / "se"))
    loss = optax.softmax_cross_entropy_with_integer_labels
    assert float(np.mean(loss(logits, labels))) == pytest.approx(results["test_loss"], rel=1e-5)
    assert float(np.mean(loss(base, labels))) == pytest.approx(
        results["backbone_test_loss"], rel=1e-5
    )
    result = analyze.paired(tmp_path / "p", [str(trained), str(tmp_path / "se")])
    se = result["against_backbone"][1]
    assert se["accuracy_a"] == pytest.approx(results["test_accuracy"])
    assert se["accuracy_b"] == pytest.approx(results["backbone_test_accuracy"])
    assert result["pairs"][0]["accuracy_b"] == se["accuracy_a"]


def test_paired_counts_from_known_predictions(trained, cued, tmp_path, monkeypatch):
    runs = [str(trained), str(cued.workdir)]
    labels = np.asarray(cued.test.labels)
    right = {  # per run: (attention right, frozen backbone right), over the 96 test images
        runs[0]: (np.arange(96) < 60, np.arange(96) < 50),
        runs[1]: (np.arange(96) >= 40, np.arange(96) < 50),
    }

    def fake_outputs(m, images):
        def logits(ok):
            return np.eye(10)[np.where(ok, labels, (labels + 1) % 10)]

        att, base = right[str(m.workdir)]
        return logits(att), logits(base), None

    monkeypatch.setattr(paired_analysis, "outputs", fake_outputs)
    result = analyze.paired(tmp_path, runs)
    first, second = result["against_backbone"]
    assert (first["only_a"], first["only_b"], first["both_right"]) == (10, 0, 50)
    assert (second["only_a"], second["only_b"], second["both_right"]) == (46, 40, 10)
    pair = result["pairs"][0]  # 0..59 against 40..95
    assert (pair["both_right"], pair["only_a"], pair["only_b"], pair["both_wrong"]) == (
        20,
        40,
        36,
        0,
    )
    assert pair["difference"] == pytest.approx(4 / 96) and pair["mcnemar_p"] == pytest.approx(
        analyze.mcnemar_p(40, 36)
    )
    diff = right[runs[0]][0].astype(float) - right[runs[1]][0].astype(float)
    assert pair["difference_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(96))


def test_shifted_global_query_at_test_time(model):
    import dataclasses

    import gattanet_jax as gj

    # strong modulation, so that whose global query an image gets changes its prediction
    params = dict(model.variables["params"])
    for site in model.attention.sites:
        name = gj.attention.param_name(site.name)
        params[name] = dict(params[name], alpha=jax.numpy.float32(20.0))
    m = dataclasses.replace(model, variables=dict(model.variables, params=params))
    result = analyze.shifted(m)
    x, labels = np.asarray(m.test.images, np.float32) / 255.0, np.asarray(m.test.labels)

    def acc(attention):  # all 96 test images in one batch: image 0 takes image 95's query
        out = gj.two_pass(m.backbone, attention, m.variables, m.backbone_vars, x)
        return np.argmax(out.logits, -1)

    own, moved = acc(m.attention), acc(m.attention.clone(q_avg_source="shifted"))
    assert result["own_accuracy"] == pytest.approx(np.mean(own == labels))
    assert result["shifted_accuracy"] == pytest.approx(np.mean(moved == labels))
    assert result["changed_predictions"] == pytest.approx(np.mean(own != moved))
    assert result["changed_predictions"] > 0
    assert json.loads((m.out / "shifted.json").read_text())["shifted_accuracy"] == pytest.approx(
        result["shifted_accuracy"]
    )


def test_noise_figure_of_the_clean_accuracy_alone_warns_of_nothing():
    import warnings

    from train.tools import plots

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.close(plots.noise([0.0], np.array([[0.7]]), np.array([[0.8]]), "clean only"))


def test_pooled_matches_models_across_seeds_and_pools_their_differences(tmp_path):
    def write(name, against, pairs):
        d = tmp_path / name
        d.mkdir()
        saved = {
            "against_backbone": [
                {"run": r, "difference": v, "difference_se": se} for r, v, se in against
            ],
            "pairs": [
                {"a": a, "b": b, "difference": v, "difference_se": se} for a, b, v, se in pairs
            ],
        }
        (d / "paired.json").write_text(json.dumps(saved))
        return str(d)

    s0 = write(
        "s0",
        [("pre/s0/gattanet", 0.02, 0.003), ("work/converged/gala/0", 0.01, 0.004)],
        [("pre/s0/gattanet", "work/converged/gala/0", 0.01, 0.003)],
    )
    s1 = write(  # the same models in the other order, and one that seed 0 lacks
        "s1",
        [("pre/s1/gala", 0.03, 0.004), ("pre/s1/gattanet", 0.01, 0.004), ("x/se", 0.0, 0.001)],
        [("pre/s1/gala", "pre/s1/gattanet", 0.02, 0.004)],
    )
    result = analyze.pooled(tmp_path / "out", [s0, s1])
    rows = {(r["a"], r["b"]): r for r in result["rows"]}
    assert list(rows) == [
        ("gattanet", "its frozen backbone"),
        ("gala", "its frozen backbone"),
        ("gattanet", "gala"),
    ]
    pair = rows["gattanet", "gala"]
    assert pair["differences"] == [0.01, -0.02]  # seed 1's gala - gattanet, turned round
    assert pair["mean"] == pytest.approx(-0.005)
    assert pair["se"] == pytest.approx(0.0025)  # sqrt(0.003^2 + 0.004^2) / 2
    assert pair["sd_over_seeds"] == pytest.approx(0.03 / np.sqrt(2))
    md = (tmp_path / "out" / "pooled.md").read_text()
    assert "| gattanet | gala | +1.00 | -2.00 | -0.50 ± 0.25 | 2.12 |" in md
    with pytest.raises(UserError, match="does not exist"):
        analyze.pooled(tmp_path / "out", [s0, str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="two or more"):
        analyze.pooled(tmp_path / "out", [s0])
