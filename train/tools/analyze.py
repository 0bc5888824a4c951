r"""The paper's analyses of a trained GAttANet, one command each.

  python -m train.analyze noise  --workdir DIR [--sigmas 0,0.01,0.1]
  python -m train.analyze lesion --workdir DIR [--lesions cccdd,.ccdd,c.cdd]
  python -m train.analyze umap   --workdir DIR
  python -m train.analyze maps   --workdir DIR [--images 0,1,2]
  python -m train.analyze cues   --workdir DIR [--cue_weights 0,0.25,0.5,0.75,1]
  python -m train.analyze shifted --workdir DIR
  python -m train.analyze table  --workdir OUT --runs DIR1,DIR2,...
  python -m train.analyze seeds  --workdir OUT --runs DIR1,DIR2,... [--sigmas ...] [--lesions ...]
  python -m train.analyze paired --workdir OUT --runs DIR1,DIR2,...
  python -m train.analyze pooled --workdir OUT --runs PAIRED1,PAIRED2,...

DIR is an attention-stage workdir (what ``--config.stage=attention`` wrote, or <dir>/attention of
``stage=both``): its config.json, best/ checkpoint and the frozen backbone it names are loaded,
and the test split is evaluated. Figures (PNG) and numbers (JSON, markdown for the table) go to
DIR/analysis/. ``--max_examples N`` evaluates the first N test images only (default: the test
split the workdir was evaluated on). ``seeds`` runs ``noise`` and ``lesion`` on each of several
attention workdirs (one per seed or backbone) and draws their mean and standard deviation into
OUT (noise.png, lesion.png, seeds.json, seeds.md). ``paired`` compares runs on the same test
images, example by example: each against its frozen backbone and each pair with each other
(McNemar's exact test on the examples one gets right and the other wrong; OUT/paired.json and
paired.md; a run may also be a GALA, SE or GSA add-on of ``train.compare``). ``pooled`` reads
several ``paired`` outputs (one per seed, the same models on each) and pools each difference over
them (OUT/pooled.json and pooled.md). ``shifted`` tests a
trained GAttANet with each test image's global query taken from the previous test image (its
agreement with another image's queries), without retraining.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from gattanet_jax import two_pass
from gattanet_jax.attention import param_name
from gattanet_jax.sites import lesion_mask, lesion_string
from train import compilation, precision
from train.data.augment import to_float
from train.errors import UserError
from train.tools import plots
from train.tools.trained import Trained, addon_logits, load, read_config

ANALYSES = (
    "noise",
    "lesion",
    "umap",
    "maps",
    "cues",
    "table",
    "seeds",
    "paired",
    "pooled",
    "shifted",
)
DEFAULT_CUE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# 0, then a log grid up to 0.25 (images in [0, 1]), as in Figures 2a and 4a.
DEFAULT_SIGMAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.25)


# --- evaluation ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batch_outputs(
    backbone, attention, internals, variables, bvars, base_vars, images, mask, sigma, key
):
    x = to_float(images)
    x = x + sigma * jax.random.normal(key, x.shape, x.dtype)  # additive, not clipped
    out = two_pass(
        backbone, attention, variables, bvars, x, lesion=mask, return_internals=internals
    )
    base = backbone.apply(base_vars, x, train=False)
    extra = (out.attention.q_avg, out.attention.gatta) if internals else None
    return out.logits, base, extra


def outputs(m: Trained, images, *, sigma=0.0, mask=None, seed=0, internals=False, batch=500):
    """(attention logits, baseline logits[, (q_avg, gatta)]) over ``images``, in batches padded to
    one shape (one compilation). The noise of image i depends on (seed, i) only, and the two
    models see the same noisy image."""
    n = len(images)
    mask = jnp.ones(len(m.attention.sites)) if mask is None else jnp.asarray(mask, jnp.float32)
    pieces = []
    for start in range(0, n, batch):
        chunk = images[start : start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        key = jax.random.fold_in(jax.random.key(seed), start)
        res = _batch_outputs(
            m.backbone,
            m.attention,
            internals,
            m.variables,
            m.backbone_vars,
            m.baseline_vars,
            chunk,
            mask,
            jnp.float32(sigma),
            key,
        )
        pieces.append(jax.tree.map(lambda a, k=batch - pad: np.asarray(a)[:k], res))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == labels))


# --- the analyses ---------------------------------------------------------------------------------


def noise(m: Trained, sigmas=DEFAULT_SIGMAS, seed: int = 0) -> dict:
    rows = []
    for sigma in sigmas:
        att, base, _ = outputs(m, m.test.images, sigma=sigma, seed=seed)
        rows.append(
            {
                "sigma": float(sigma),
                "baseline_accuracy": accuracy(base, m.test.labels),
                "attention_accuracy": accuracy(att, m.test.labels),
            }
        )
        print(
            f"sigma {sigma:<6g} baseline {rows[-1]['baseline_accuracy']:.4f} "
            f"attention {rows[-1]['attention_accuracy']:.4f}",
            flush=True,
        )
    result = {"test_examples": len(m.test), "noise_seed": seed, "rows": rows}
    base, att = ([[r[k] for r in rows]] for k in ("baseline_accuracy", "attention_accuracy"))
    _write(m, "noise", result, plots.noise(list(sigmas), base, att, _title(m)))
    return result


@functools.partial(jax.jit, static_argnums=(0, 1))
def _cued_logits(backbone, attention, variables, bvars, images, cue, weight):
    out = two_pass(
        backbone, attention, variables, bvars, to_float(images), cue=cue, cue_weight=weight
    )
    return out.logits


def wrong_classes(labels: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """A uniformly drawn class other than the true one, per example (fixed by ``seed``)."""
    shift = np.random.default_rng(seed).integers(1, num_classes, size=len(labels))
    return (labels + shift) % num_classes


def cues(m: Trained, weights=DEFAULT_CUE_WEIGHTS, seed: int = 0, batch: int = 500) -> dict:
    """Test accuracy with the true class cued, a wrong class cued, and uncued, per cue weight."""
    if not m.attention.cue_classes:
        raise UserError(
            f"{m.workdir} was trained without top-down cues (config.attention.cue_classes=False)"
        )
    labels = np.asarray(m.test.labels)
    wrong = wrong_classes(labels, m.attention.cue_classes, seed)
    att, base, _ = outputs(m, m.test.images)
    uncued, base_acc = accuracy(att, labels), accuracy(base, labels)

    def acc(cue, w):
        pieces = []
        for start in range(0, len(labels), batch):
            chunk, c = m.test.images[start : start + batch], cue[start : start + batch]
            pad = batch - len(chunk)
            if pad:  # one shape, one compilation
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                c = np.concatenate([c, np.repeat(c[-1:], pad)])
            logits = _cued_logits(
                m.backbone, m.attention, m.variables, m.backbone_vars, chunk, c, jnp.float32(w)
            )
            pieces.append(np.asarray(logits)[: batch - pad])
        return accuracy(np.concatenate(pieces), labels)

    rows = []
    for w in weights:
        rows.append(
            {
                "weight": float(w),
                "true_cue_accuracy": acc(labels, w),
                "wrong_cue_accuracy": acc(wrong, w),
                "uncued_accuracy": uncued,
            }
        )
        r = rows[-1]
        print(
            f"weight {w:<5g} true cue {r['true_cue_accuracy']:.4f} wrong cue "
            f"{r['wrong_cue_accuracy']:.4f} uncued {uncued:.4f}",
            flush=True,
        )
    result = {"test_examples": len(labels), "baseline_accuracy": base_acc, "rows": rows}
    _write(m, "cues", result, plots.cues(rows, base_acc, _title(m)))
    return result


def default_lesions(sites) -> list[str]:
    """The full model, every single-site removal, every single-site-only model, no site."""
    n = len(sites)
    masks = [[True] * n]
    masks += [[j != i for j in range(n)] for i in range(n)]
    masks += [[j == i for j in range(n)] for i in range(n)]
    masks.append([False] * n)
    return [lesion_string(mk, sites) for mk in masks]


def lesion(m: Trained, lesions=None) -> dict:
    sites = m.attention.sites
    lesions = list(lesions or default_lesions(sites))
    base_acc = None
    rows = []
    for name in lesions:
        try:
            mask = np.asarray(lesion_mask(name, sites), np.float32)
        except ValueError as e:
            raise UserError(str(e)) from None
        att, base, _ = outputs(m, m.test.images, mask=mask)
        base_acc = accuracy(base, m.test.labels)
        rows.append({"lesion": name, "accuracy": accuracy(att, m.test.labels)})
        print(f"{name}  {rows[-1]['accuracy']:.4f}", flush=True)
    result = {"test_examples": len(m.test), "baseline_accuracy": base_acc, "rows": rows}
    accs = [[r["accuracy"] for r in rows]]
    _write(m, "lesion", result, plots.lesion(lesions, accs, [base_acc], _title(m)))
    return result


def knn_accuracy(x: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (Euclidean; a tied vote goes to the lowest
    class index): how well the rows of ``x`` alone tell the labels apart."""
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    if not 0 < k < len(x):
        raise UserError(f"k-nearest neighbours needs 0 < k < {len(x)} examples, got k = {k}")
    sq = np.sum(x * x, axis=1)
    hits = 0
    for start in range(0, len(x), 1024):
        rows = np.arange(start, min(start + 1024, len(x)))
        dist = sq[rows, None] - 2.0 * x[rows] @ x.T + sq[None, :]
        dist[np.arange(len(rows)), rows] = np.inf  # leave the example itself out
        nearest = np.argpartition(dist, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(rows), int(labels.max()) + 1), np.int64)
        np.add.at(votes, (np.arange(len(rows))[:, None], labels[nearest]), 1)
        hits += int(np.sum(votes.argmax(1) == labels[rows]))
    return hits / len(x)


def umap(m: Trained, seed: int = 0) -> dict:
    try:
        import umap as umap_learn
    except ImportError:
        raise UserError(
            "the UMAP analysis needs umap-learn: pip install 'gattanet-jax[analysis]'"
        ) from None

    _, _, (q_avg, _) = outputs(m, m.test.images, internals=True)
    with warnings.catch_warnings():  # a fixed random_state runs single-threaded: said above
        warnings.simplefilter("ignore", UserWarning)
        reducer = umap_learn.UMAP(n_components=2, random_state=seed, n_jobs=1)
        embedding = reducer.fit_transform(q_avg)
    np.savez_compressed(m.out / "umap.npz", embedding=embedding, labels=m.test.labels, q_avg=q_avg)
    # how much class information q_avg itself carries (in its d dimensions, not the picture's 2)
    knn = knn_accuracy(q_avg, m.test.labels, k=10)
    print(f"q_avg: leave-one-out 10-nearest-neighbour class accuracy {knn:.4f} "
          f"(chance {1.0 / len(m.class_names):.2f})", flush=True)  # fmt: skip
    result = {
        "test_examples": len(m.test),
        "d": int(q_avg.shape[1]),
        "umap_seed": seed,
        "q_avg_10nn_accuracy": knn,
    }
    _write(m, "umap", result, plots.umap(embedding, m.test.labels, m.class_names, _title(m)))
    return result


def maps(m: Trained, indices=(0, 1, 2, 3)) -> dict:
    indices = [int(i) for i in indices]
    if not indices or max(indices) >= len(m.test) or min(indices) < 0:
        raise UserError(f"--images must be test indices in [0, {len(m.test)}), got {indices}")
    att, _, (_, gatta) = outputs(m, m.test.images, internals=True)
    logits_site = m.attention.sites[-1]
    result = {"test_examples": len(m.test), "images": indices}
    if logits_site.kind == "dense" and logits_site.channels == len(m.class_names):
        g = gatta[logits_site.name]
        alpha = float(m.variables["params"][param_name(logits_site.name)]["alpha"])
        result["logits_site"] = logits_site.name
        result["logits_site_alpha"] = alpha
        result["true_class_has_highest_agreement"] = float(np.mean(g.argmax(-1) == m.test.labels))
        result["true_class_has_lowest_agreement"] = float(np.mean(g.argmin(-1) == m.test.labels))
        # whatever alpha's sign: the unit whose logit modulation scales most, 1 + alpha * agreement
        factor = 1.0 + alpha * g
        result["true_class_has_largest_factor"] = float(np.mean(factor.argmax(-1) == m.test.labels))
        result["chance"] = 1.0 / len(m.class_names)
        print(
            f"at '{logits_site.name}' (alpha {alpha:+.4f}: agreement "
            f"{'boosts' if alpha >= 0 else 'damps'} a unit) the true class has the highest "
            f"agreement for {result['true_class_has_highest_agreement']:.4f} and the lowest for "
            f"{result['true_class_has_lowest_agreement']:.4f} of test images; its logit gets "
            f"the largest factor 1 + alpha * agreement for "
            f"{result['true_class_has_largest_factor']:.4f} (chance {result['chance']:.2f})"
        )
    figure = plots.maps(
        m.test.images[indices],
        m.test.labels[indices],
        np.argmax(att[indices], -1),
        {s.name: gatta[s.name][indices] for s in m.attention.sites},
        m.attention.sites,
        m.class_names,
        _title(m),
    )
    _write(m, "maps", result, figure)
    return result


def table(out: Path, runs: list[str]) -> str:
    """Table 1's columns from the results of a list of attention workdirs."""
    header = (
        "| backbone | data | base params | base acc. | d | attention params | acc. | gain |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for run in runs:
        path = Path(run)
        config = read_config(path)
        results_path = path / "results.json"
        if config.stage != "attention" or not results_path.is_file():
            raise UserError(f"{path} is not a finished attention workdir (no results.json)")
        r = json.loads(results_path.read_text())
        base, acc = r["backbone_test_accuracy"], r["test_accuracy"]
        lines.append(
            f"| {config.model.backbone} | {config.dataset.name} | {r['frozen_params']:,} | "
            f"{100 * base:.2f} | {config.attention.d} | {r['trainable_params']:,} | "
            f"{100 * acc:.2f} | {100 * (acc - base):+.2f} |"
        )
    text = header + "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    print(text, end="")
    return text


def seeds(out: Path, runs: list[str], sigmas=DEFAULT_SIGMAS, lesions=None, **load_args) -> dict:
    """``noise`` and ``lesion`` on each run (written into its own analysis/ as usual), then
    their mean and sample standard deviation over the runs, in ``out``."""
    if len(runs) < 2:
        raise UserError("seeds needs --runs with two or more attention workdirs")
    per_run, title = [], None
    for run in runs:
        m = load(run, **load_args)
        title = title or _title(m)
        per_run.append({"workdir": run, "noise": noise(m, sigmas), "lesion": lesion(m, lesions)})
    names = [r["lesion"] for r in per_run[0]["lesion"]["rows"]]
    if any([r["lesion"] for r in p["lesion"]["rows"]] != names for p in per_run):
        raise UserError("seeds needs runs with the same sites (their lesions differ)")

    def array(part, key):
        return np.array([[r[key] for r in p[part]["rows"]] for p in per_run])

    base, att = array("noise", "baseline_accuracy"), array("noise", "attention_accuracy")
    acc = array("lesion", "accuracy")
    lesion_base = np.array([p["lesion"]["baseline_accuracy"] for p in per_run])
    title = f"{title}, {len(runs)} runs"
    out.mkdir(parents=True, exist_ok=True)
    for name, figure in (
        ("noise", plots.noise(list(sigmas), base, att, title)),
        ("lesion", plots.lesion(names, acc, lesion_base, title)),
    ):
        figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        plots.close(figure)

    def stats(values):  # percent: mean, sd
        values = 100 * np.asarray(values)
        return {"mean": float(values.mean()), "sd": float(values.std(ddof=1))}

    result = {
        "runs": list(runs),
        "noise": [
            {
                "sigma": float(sigma),
                "baseline_accuracy": stats(base[:, i]),
                "attention_accuracy": stats(att[:, i]),
                "gain": stats(att[:, i] - base[:, i]),
            }
            for i, sigma in enumerate(sigmas)
        ],
        "lesion": [
            {"lesion": n, "accuracy": stats(acc[:, i]), "gain": stats(acc[:, i] - lesion_base)}
            for i, n in enumerate(names)
        ],
        "per_run": per_run,
    }
    (out / "seeds.json").write_text(json.dumps(result, indent=2))

    def cell(x):
        return f"{x['mean']:.2f} ± {x['sd']:.2f}"

    lines = [
        f"Mean ± sd over {len(runs)} runs, test accuracy (%).",
        "",
        "| noise σ | frozen baseline | GAttANet | gain |",
        "|---|---|---|---|",
        *(
            f"| {r['sigma']:g} | {cell(r['baseline_accuracy'])} | "
            f"{cell(r['attention_accuracy'])} | {cell(r['gain'])} |"
            for r in result["noise"]
        ),
        "",
        "| lesion | accuracy | gain over the frozen baseline |",
        "|---|---|---|",
        *(
            f"| `{r['lesion']}` | {cell(r['accuracy'])} | {cell(r['gain'])} |"
            for r in result["lesion"]
        ),
    ]
    text = "\n".join(lines) + "\n"
    (out / "seeds.md").write_text(text)
    print(text, end="")
    print(f"wrote {out}/noise.png, lesion.png, seeds.json and seeds.md")
    return result


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: under 'the two are equally accurate' each example that
    exactly one of them gets right is that one's with probability 1/2."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    log_norm = math.lgamma(n + 1) - n * math.log(2.0)  # log(n! / 2^n), in logs: n is large
    tail = sum(
        math.exp(log_norm - math.lgamma(i + 1) - math.lgamma(n - i + 1)) for i in range(k + 1)
    )
    return min(1.0, 2.0 * tail)


def compare_correct(a: np.ndarray, b: np.ndarray) -> dict:
    """Two models' per-example correctness (booleans over the same examples), compared."""
    n = len(a)
    diff = a.astype(np.float64) - b.astype(np.float64)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    return {
        "accuracy_a": float(a.mean()),
        "accuracy_b": float(b.mean()),
        "difference": float(diff.mean()),
        "difference_se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "both_right": int(np.sum(a & b)),
        "only_a": only_a,
        "only_b": only_b,
        "both_wrong": int(np.sum(~a & ~b)),
        "mcnemar_p": mcnemar_p(only_a, only_b),
    }


def paired(out: Path, runs: list[str], **load_args) -> dict:
    """Every run against its frozen backbone, and every pair of runs against each other, example
    by example on the same test images (accuracies in [0, 1], the paired standard error of their
    difference, McNemar's exact p)."""
    if len(runs) < 2:
        raise UserError("paired needs --runs with two or more attention or add-on workdirs")
    correct, labels = {}, None
    for run in runs:
        if read_config(Path(run)).stage == "addon":  # GALA, SE or GSA from train.compare
            y, att, base = addon_logits(run, **load_args)
        else:
            m = load(run, **load_args)
            y = np.asarray(m.test.labels)
            att, base, _ = outputs(m, m.test.images)
        if labels is not None and not np.array_equal(y, labels):
            raise UserError(
                f"{run} was tested on other images than {runs[0]}; paired needs one test set"
            )
        labels = y
        correct[run] = (np.argmax(att, -1) == y, np.argmax(base, -1) == y)
    result = {
        "runs": list(runs),
        "test_examples": len(labels),
        "against_backbone": [dict(compare_correct(*correct[r]), run=r) for r in runs],
        "pairs": [
            dict(compare_correct(correct[a][0], correct[b][0]), a=a, b=b)
            for a, b in itertools.combinations(runs, 2)
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired.json").write_text(json.dumps(result, indent=2))

    def row(first, second, c):
        return (
            f"| {first} | {second} | {100 * c['accuracy_a']:.2f} | {100 * c['accuracy_b']:.2f} | "
            f"{100 * c['difference']:+.2f} ± {100 * c['difference_se']:.2f} | {c['only_a']} | "
            f"{c['only_b']} | {c['mcnemar_p']:.3g} |"
        )

    lines = [
        f"{len(labels)} test images; difference ± its paired standard error, in points; 'only a': "
        "images a gets right and b wrong.",
        "",
        "| a | b | accuracy a | accuracy b | a - b | only a | only b | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
        *(row(c["run"], "its frozen backbone", c) for c in result["against_backbone"]),
        *(row(c["a"], c["b"], c) for c in result["pairs"]),
    ]
    text = "\n".join(lines) + "\n"
    (out / "paired.md").write_text(text)
    print(text, end="")
    print(f"wrote {out}/paired.json and paired.md")
    return result


def shifted(m: Trained) -> dict:
    """Test accuracy with every image's global query replaced by the previous test image's (in
    batches of 500, the first taking the last's): the ``shifted_q`` control applied at test time to
    a model trained with its own. What drops is what the model draws from an image's agreement
    with its own queries."""
    if m.config.attention.q_avg_source != "own":
        raise UserError(
            f"{m.workdir} was trained with q_avg_source={m.config.attention.q_avg_source!r}; "
            "shifted tests a model trained with each image's own global query"
        )
    labels = np.asarray(m.test.labels)
    own, base, _ = outputs(m, m.test.images)
    other = dataclasses.replace(m, attention=m.attention.clone(q_avg_source="shifted"))
    moved, _, _ = outputs(other, m.test.images)
    right = np.argmax(own, -1) == labels, np.argmax(moved, -1) == labels
    result = {
        "test_examples": len(labels),
        "baseline_accuracy": accuracy(base, labels),
        "own_accuracy": float(right[0].mean()),
        "shifted_accuracy": float(right[1].mean()),
        "changed_predictions": float(np.mean(np.argmax(own, -1) != np.argmax(moved, -1))),
        "own_against_shifted": compare_correct(*right),
    }
    c = result["own_against_shifted"]
    print(
        f"test accuracy with each image's own global query {result['own_accuracy']:.4f}, with the "
        f"previous image's {result['shifted_accuracy']:.4f} (frozen backbone "
        f"{result['baseline_accuracy']:.4f}); predictions changed on "
        f"{result['changed_predictions']:.4f} of images; own - shifted "
        f"{100 * c['difference']:+.2f} ± {100 * c['difference_se']:.2f} points, McNemar p "
        f"{c['mcnemar_p']:.3g}"
    )
    (m.out / "shifted.json").write_text(json.dumps(dict(result, workdir=str(m.workdir)), indent=2))
    print(f"wrote {m.out / 'shifted.json'}")
    return result


def _title(m: Trained) -> str:
    """What the figures show: the model and the data, never a workdir's name."""
    c = m.config
    backbone = "toy CNN" if c.model.backbone == "toy" else c.model.backbone
    return f"GAttANet d={c.attention.d} on a frozen {backbone}, {c.dataset.name} test set"


def _write(m: Trained, name: str, result: dict, figure) -> None:
    result = dict(result, workdir=str(m.workdir), figure=f"{name}.png")
    (m.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    figure.savefig(m.out / f"{name}.png", dpi=110, bbox_inches="tight")
    plots.close(figure)
    print(f"wrote {m.out / name}.png and {name}.json")


# --- command line ---------------------------------------------------------------------------------


def model_name(run: str) -> str:
    """A run's model, as pooling matches it across seeds: its directory's name, or its parent's
    where the name is a seed (``workdirs/converged/gala/1`` and ``pretrained/s1/gala``: gala)."""
    parts = Path(run).parts
    return parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def pooled(out: Path, paired_dirs: list[str]) -> dict:
    """Each difference of several ``paired`` outputs (one per seed), pooled: its value on each,
    their mean, the mean's standard error sqrt(sum se_i^2) / n (the seeds' differences taken as
    independent; they share the test images, so a correlation between them would make it
    larger) and the sd over seeds. Models are matched by ``model_name``; a difference enters
    when every output has it."""
    if len(paired_dirs) < 2:
        raise UserError("pooled needs --runs with two or more output directories of paired")
    tables = []
    for d in paired_dirs:
        path = Path(d) / "paired.json"
        if not path.exists():
            raise UserError(f"{path} does not exist: run `train.analyze paired` into {d} first")
        try:
            saved = json.loads(path.read_text())
            diffs = {
                (model_name(c["run"]), "its frozen backbone"): c for c in saved["against_backbone"]
            }
            diffs.update({(model_name(c["a"]), model_name(c["b"])): c for c in saved["pairs"]})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not an output of `train.analyze paired` ({e})") from None
        tables.append(diffs)

    def lookup(diffs, a, b):  # (difference, se), with the sign of a - b
        if (a, b) in diffs:
            return diffs[a, b]["difference"], diffs[a, b]["difference_se"]
        if (b, a) in diffs:
            return -diffs[b, a]["difference"], diffs[b, a]["difference_se"]
        return None

    rows = []
    for a, b in tables[0]:
        found = [lookup(diffs, a, b) for diffs in tables]
        if any(f is None for f in found):
            continue
        values = [v for v, _ in found]
        n = len(values)
        rows.append(
            {
                "a": a,
                "b": b,
                "differences": values,
                "mean": float(np.mean(values)),
                "se": math.sqrt(sum(se * se for _, se in found)) / n,
                "sd_over_seeds": float(np.std(values, ddof=1)),
            }
        )
    if not rows:
        raise UserError(f"{', '.join(paired_dirs)} have no models in common")
    result = {"paired": list(paired_dirs), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pooled.json").write_text(json.dumps(result, indent=2))
    heads = " | ".join(Path(d).name for d in paired_dirs)
    lines = [
        f"Differences a - b of {len(paired_dirs)} paired comparisons, in points; their mean ± its "
        "standard error, and their sd.",
        "",
        f"| a | b | {heads} | mean ± se | sd |",
        "|---|---|" + "---|" * len(paired_dirs) + "---|---|",
        *(
            f"| {r['a']} | {r['b']} | "
            + " | ".join(f"{100 * v:+.2f}" for v in r["differences"])
            + f" | {100 * r['mean']:+.2f} ± {100 * r['se']:.2f} | {100 * r['sd_over_seeds']:.2f} |"
            for r in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    (out / "pooled.md").write_text(text)
    print(text, end="")
    print(f"wrote {out}/pooled.json and pooled.md")
    return result


def define_flags() -> dict:
    """The CLI's flags; defined only when run as a program, so importing this module (tests,
    notebooks) never clashes with other modules' absl flags."""
    return {
        "workdir": flags.DEFINE_string(
            "workdir", None, "Attention workdir ('table', 'seeds', 'paired', 'pooled': output)."
        ),
        "runs": flags.DEFINE_list(
            "runs", [], "table, seeds, paired: attention workdirs; pooled: paired outputs."
        ),
        "sigmas": flags.DEFINE_list("sigmas", [str(s) for s in DEFAULT_SIGMAS], "noise levels."),
        "lesions": flags.DEFINE_list("lesions", [], "lesion strings (default: single sites)."),
        "images": flags.DEFINE_list("images", ["0", "1", "2", "3"], "maps: test indices."),
        "cue_weights": flags.DEFINE_list(
            "cue_weights", [str(w) for w in DEFAULT_CUE_WEIGHTS], "cues: weights of the cue."
        ),
        "max_examples": flags.DEFINE_integer("max_examples", 0, "First N test images (0: all)."),
        "data_dir": flags.DEFINE_string("data_dir", "", "Override the tfds data directory."),
    }


def run(analysis: str, f: dict) -> None:
    if not f["workdir"]:
        raise UserError("--workdir is required")
    if analysis == "table":
        if not f["runs"]:
            raise UserError("table needs --runs DIR1,DIR2,... (attention workdirs)")
        table(Path(f["workdir"]), f["runs"])
        return
    if analysis == "seeds":
        sigmas = _parse(f["sigmas"], float, "--sigmas must be numbers")
        load_args = {"data_dir": f["data_dir"], "max_examples": f["max_examples"]}
        seeds(Path(f["workdir"]), f["runs"], sigmas, f["lesions"], **load_args)
        return
    if analysis == "pooled":
        pooled(Path(f["workdir"]), f["runs"])
        return
    if analysis == "paired":
        load_args = {"data_dir": f["data_dir"], "max_examples": f["max_examples"]}
        paired(Path(f["workdir"]), f["runs"], **load_args)
        return
    m = load(f["workdir"], f["data_dir"], f["max_examples"])
    with precision.scope(m.config):  # the precision the workdir trained at
        _single(analysis, m, f)


def _single(analysis: str, m, f: dict) -> None:
    """An analysis of one attention workdir."""
    if analysis == "noise":
        noise(m, _parse(f["sigmas"], float, "--sigmas must be numbers"))
    elif analysis == "lesion":
        lesion(m, f["lesions"])
    elif analysis == "umap":
        umap(m)
    elif analysis == "maps":
        maps(m, _parse(f["images"], int, "--images must be test indices"))
    elif analysis == "cues":
        cues(m, _parse(f["cue_weights"], float, "--cue_weights must be numbers"))
    elif analysis == "shifted":
        shifted(m)


def _parse(values: list[str], kind, what: str) -> list:
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise UserError(f"{what}, got {values}") from None


def main(argv, defined: dict):
    if len(argv) != 2 or argv[1] not in ANALYSES:
        names = "|".join(ANALYSES)
        print(f"usage: python -m train.analyze {{{names}}} --workdir DIR [...]", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    try:
        with compilation.cache(), precision.scope_for("float32"):  # several runs: the default
            run(argv[1], {k: v.value for k, v in defined.items()})
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_cli():
    """``python -m train.analyze``."""
    from train import cli

    app.run(functools.partial(main, defined=define_flags()), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run_cli()
