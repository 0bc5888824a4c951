"""Agreement maps of a few test images at every site, and the agreement at the logits."""

from __future__ import annotations

import numpy as np

from gattanet_jax.attention import param_name
from train.errors import UserError
from train.tools import plots
from train.tools.analyses.common import figure_title, outputs, write_result
from train.tools.trained import Trained


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
        figure_title(m),
    )
    write_result(m, "maps", result, figure)
    return result
