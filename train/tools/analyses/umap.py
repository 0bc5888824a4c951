"""The global query in two dimensions (UMAP), and how much class information it carries
(leave-one-out nearest neighbours in its own d dimensions)."""

from __future__ import annotations

import warnings

import numpy as np

from train.errors import UserError
from train.tools import plots
from train.tools.analyses.common import figure_title, outputs, write_result
from train.tools.trained import Trained


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
    write_result(
        m, "umap", result, plots.umap(embedding, m.test.labels, m.class_names, figure_title(m))
    )
    return result
