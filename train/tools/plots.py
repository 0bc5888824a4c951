"""Figures of the analyses (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

BASELINE, ATTENTION = "#7f7f7f", "#d62728"


def close(figure) -> None:
    plt.close(figure)


def _sigma_axis(ax, sigmas):
    ax.set_xscale("symlog", linthresh=1e-3, linscale=0.5)
    ax.set_xlim(0, max(max(sigmas) * 1.1, 1e-3))  # the clean accuracy alone: a narrow axis
    ax.set_xlabel("Gaussian noise σ (images in [0, 1], symlog scale)")
    ax.grid(True, alpha=0.3)


def _mean_sd(values: np.ndarray):
    """Mean over runs (axis 0) and the sample standard deviation (None for one run)."""
    return values.mean(0), (values.std(0, ddof=1) if len(values) > 1 else None)


def _curve(ax, x, values: np.ndarray, color: str, label: str) -> None:
    """One curve: the run's values, or the mean over runs with its sd and each run faintly."""
    mean, sd = _mean_sd(values)
    if sd is None:
        ax.plot(x, mean, "o-", color=color, label=label)
        return
    for run in values:
        ax.plot(x, run, "-", color=color, alpha=0.25, lw=0.8)
    ax.errorbar(x, mean, yerr=sd, fmt="o-", color=color, capsize=3, label=f"{label} (mean ± sd)")


def noise(sigmas, baseline: np.ndarray, attention: np.ndarray, title: str):
    """Figure 2a / 4a (accuracy against noise) and 4b (the gain). ``baseline`` and
    ``attention``: accuracies (0-1) of shape (runs, sigmas); several runs are drawn as their
    mean with the standard deviation over runs, and each run faintly."""
    base, att = np.asarray(baseline) * 100, np.asarray(attention) * 100
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    _curve(a, sigmas, base, BASELINE, "frozen baseline")
    _curve(a, sigmas, att, ATTENTION, "with GAttANet")
    a.set_ylabel("test accuracy (%)")
    a.set_title("accuracy against input noise")
    a.legend()
    _sigma_axis(a, sigmas)
    _curve(b, sigmas, att - base, ATTENTION, "GAttANet − baseline")
    b.axhline(0, color="black", lw=0.8)
    b.set_ylabel("accuracy gain (percentage points)")
    b.set_title("gain from attention")
    b.legend()
    _sigma_axis(b, sigmas)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cues(rows: list[dict], baseline: float, title: str):
    """Top-down cues: accuracy against the cue weight, true class cued, a wrong class cued."""
    w = [r["weight"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        w,
        [100 * r["true_cue_accuracy"] for r in rows],
        "o-",
        color="#2ca02c",
        label="true class cued",
    )
    ax.plot(
        w,
        [100 * r["wrong_cue_accuracy"] for r in rows],
        "o-",
        color=ATTENTION,
        label="wrong class cued",
    )
    ax.axhline(100 * rows[0]["uncued_accuracy"], color="black", lw=1, label="uncued")
    ax.axhline(100 * baseline, color=BASELINE, ls="--", lw=1, label="frozen baseline")
    ax.set_xlabel("cue weight w in q_avg := (1 - w) q_avg + w e[class]")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"top-down cues — {title}")
    fig.tight_layout()
    return fig


def lesion(names, accuracies: np.ndarray, baseline: np.ndarray, title: str):
    """Figure 4c: accuracy of the model with some sites receiving no modulation.
    ``accuracies``: (runs, lesions), ``baseline``: (runs,), both 0-1; several runs are drawn as
    mean bars with the standard deviation over runs and each run as a dot."""
    acc, base = np.asarray(accuracies) * 100, np.asarray(baseline) * 100
    mean, sd = _mean_sd(acc)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4))
    colors = [ATTENTION if set(n) != {"."} else BASELINE for n in names]
    x = np.arange(len(names))
    bars = ax.bar(x, mean, color=colors, yerr=sd, capsize=3 if sd is not None else 0)
    if sd is None:
        labels = [f"{m:.1f}" for m in mean]
    else:
        labels = [f"{m:.1f}±{e:.1f}" for m, e in zip(mean, sd, strict=True)]
    ax.bar_label(bars, labels, fontsize=7, padding=2)
    if sd is not None:
        for run in acc:
            ax.plot(x, run, ".", color="black", ms=3, alpha=0.6)
    label = "frozen baseline" if len(base) == 1 else "frozen baselines (mean)"
    ax.axhline(base.mean(), color="black", ls="--", lw=1, label=label)
    ax.set_xticks(x, names, family="monospace", fontsize=9)
    ax.set_xlabel("modulated sites ('.' = no modulation at that site)")
    ax.set_ylabel("test accuracy (%)")
    high = max(acc.max(), base.max())
    ax.set_ylim(0, min(100, high + 8))  # bars from zero; the labels carry the differences
    ax.legend(loc="lower right")  # over the bars' bodies, clear of their labels
    ax.set_title(f"lesions — {title}")
    fig.tight_layout()
    return fig


def umap(embedding: np.ndarray, labels: np.ndarray, class_names, title: str):
    """Figure 2b: UMAP of q_avg over the test set, coloured by class."""
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c, name in enumerate(class_names):
        pts = embedding[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=3, color=cmap(c % cmap.N), label=f"{c} {name}")
    if len(class_names) <= 20:
        ax.legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(f"UMAP of the global query q_avg — {title}")
    fig.tight_layout()
    return fig


def maps(images, labels, predicted, gatta: dict, sites, class_names, title: str):
    """Figure 3: each image, its agreement maps at conv sites and bars at dense sites."""
    n, cols = len(images), 1 + len(sites)
    fig, axes = plt.subplots(n, cols, figsize=(2.3 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(images[i])
        truth, guess = class_names[labels[i]], class_names[predicted[i]]
        ax.set_title(f"true: {truth}\npredicted: {guess}", fontsize=8)
        ax.axis("off")
        for j, site in enumerate(sites, start=1):
            ax, g = axes[i, j], gatta[site.name][i]
            if site.kind == "conv":
                im = ax.imshow(g, cmap="magma")
                ax.set_xticks([])
                ax.set_yticks([])
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            else:
                colors = ["#1f77b4"] * len(g)
                if len(g) == len(class_names):
                    colors[labels[i]] = ATTENTION
                ax.bar(range(len(g)), g, color=colors, width=1.0)
                ax.tick_params(labelsize=6)
                if len(g) == len(class_names):
                    ax.set_xlabel("class (red: true)", fontsize=7)
                else:
                    ax.set_xlabel("unit", fontsize=7)
            if i == 0:
                ax.set_title(f"{site.name} ({site.kind})\nagreement", fontsize=8)
    fig.suptitle(f"agreement maps (key · q_avg) — {title}", fontsize=10)
    fig.tight_layout()
    return fig
