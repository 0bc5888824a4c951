"""A trained model tested with another image's global query: what it draws from an image's
agreement with its own queries."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from train.errors import UserError
from train.tools.analyses.common import accuracy, outputs
from train.tools.analyses.paired import compare_correct
from train.tools.trained import Trained


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
