r"""Where two-pass inference spends its time: each part compiled alone, then the whole.

  python -m benchmarks.eval_parts [--batch 128] [--repeats 15]

Prints JSON with medians (seconds) of: the plain backbone forward; pass 1 recording the sites;
the attention math on recorded activations; pass 2 with precomputed modulation factors; and the
whole ``two_pass`` in one compiled program. On the 2-core CPU the whole costs more than the sum
of its parts (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json

import jax
from absl import flags

import gattanet_jax as gj
from benchmarks.common import build, median_seconds
from gattanet_jax import agreement as agr
from gattanet_jax import sites as sites_lib
from train import cli

_BATCH = flags.DEFINE_integer("batch", 128, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed calls per part.")


def main(argv):
    del argv
    backbone, bv, attention, av, images, _ = build(_BATCH.value, "float32", 16)
    x = images.astype("float32") / 255.0
    names = [s.name for s in attention.sites]

    def pass1(bv, x):
        return sites_lib.record(lambda: backbone.apply(bv, x, train=False), names)[1]

    def attend(av, acts):
        out = attention.apply(av, acts, train=False, internals=False)
        return {
            s.name: agr.modulation(out.gatta[s.name], out.alpha[s.name], s.kind)
            for s in attention.sites
        }

    def pass2(bv, x, factors):
        with sites_lib.intercept_sites(names, lambda n, y: y * factors[n].astype(y.dtype)):
            return backbone.apply(bv, x, train=False)

    acts = jax.jit(pass1)(bv, x)
    factors = jax.jit(attend)(av, acts)
    parts = {
        "backbone_forward_s": (jax.jit(lambda bv, x: backbone.apply(bv, x)), (bv, x)),
        "pass1_record_s": (jax.jit(pass1), (bv, x)),
        "attention_math_s": (jax.jit(attend), (av, acts)),
        "pass2_given_factors_s": (jax.jit(pass2), (bv, x, factors)),
        "two_pass_whole_s": (
            jax.jit(lambda av, bv, x: gj.two_pass(backbone, attention, av, bv, x).logits),
            (av, bv, x),
        ),
    }
    r = {k: median_seconds(f, *a, repeats=_REPEATS.value, warmup=2) for k, (f, a) in parts.items()}
    r["sum_of_parts_s"] = r["pass1_record_s"] + r["attention_math_s"] + r["pass2_given_factors_s"]
    r["whole_over_sum_of_parts"] = r["two_pass_whole_s"] / r["sum_of_parts_s"]
    r["batch"] = _BATCH.value
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    cli.run(main, tool="tool")
