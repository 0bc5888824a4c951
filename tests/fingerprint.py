r"""What one environment computes, to compare two (Python, JAX, XLA, NumPy versions):

  .venv/bin/python -m tests.fingerprint --out /tmp/a.json          # in each environment
  .venv-latest/bin/python -m tests.fingerprint --out /tmp/b.json
  python -m tests.fingerprint --compare /tmp/a.json /tmp/b.json    # the table

Each item is computed the same way in both, from the same seeds, on the CPU: JAX's random bits
(threefry), its normal draws (bits through erf_inv), NumPy's generator and the embedded
dataset, the toy CNN's initial parameters, a forward pass and the GAttANet two-pass logits with
fixed parameters made by NumPy (XLA's arithmetic alone), and 300 steps of SGD training (how
far float-level differences grow). The comparison says for each: bit-identical, or the largest
difference relative to the largest value.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _pack(x) -> dict:
    x = np.ascontiguousarray(np.asarray(x))
    return {"dtype": str(x.dtype), "shape": list(x.shape), "b64": base64.b64encode(x).decode()}


def _unpack(d) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), d["dtype"]).reshape(d["shape"])


def measure() -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import gattanet_jax as gj
    from train.data.input_pipeline import embedded_split

    key = jax.random.key(0)
    data = embedded_split(512, 1)
    images = data.images[:256].astype(np.float32) / 255.0
    labels = data.labels[:256]
    model = gj.ToyCNN(num_classes=10, dropout_rate=0.0)
    init = model.init(key, images[:1])
    # fixed parameters made by NumPy, the same in both: XLA's arithmetic alone differs
    rng = np.random.default_rng(0)
    fixed = jax.tree.map(
        lambda a: rng.normal(0, 1 / np.sqrt(max(1, np.prod(a.shape[:-1]))), a.shape).astype(
            np.float32
        ),
        init,
    )
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    sites = gj.resolve_sites(model, fixed, (32, 32, 3), gj.TOY_SITES)
    attention = gj.AttentionSystem(sites, d=16)
    att = jax.tree.map(
        lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
        gj.init_attention(attention, jax.random.key(1)),
    )
    two_pass = jax.jit(lambda a, x: gj.two_pass(model, attention, a, fixed, x).logits)

    opt = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            logits = model.apply(p, x, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params, state, losses = init, opt.init(init), []
    for i in range(300):
        j = (i * 32) % 256
        params, state, value = step(params, state, images[j : j + 32], labels[j : j + 32])
        losses.append(float(value))
    return {
        "python": platform.python_version(),
        "versions": {p: metadata.version(p) for p in PACKAGES},
        "items": {
            "random bits (threefry)": _pack(jax.random.bits(key, (4096,), jnp.uint32)),
            "random normal": _pack(jax.random.normal(key, (4096,))),
            "NumPy generator": _pack(np.random.default_rng(0).normal(size=4096)),
            "embedded dataset": _pack(data.images),
            "toy CNN initial parameters": _pack(
                np.concatenate([np.ravel(x) for x in jax.tree.leaves(init)])
            ),
            "toy CNN logits, fixed parameters": _pack(forward(fixed, images)),
            "GAttANet two-pass logits, fixed parameters": _pack(two_pass(att, images)),
            "training loss, step 1": _pack(np.float32(losses[0])),
            "training loss, step 30": _pack(np.float32(losses[29])),
            "training loss, step 300": _pack(np.float32(losses[-1])),
            "parameters after 300 steps": _pack(
                np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
            ),
        },
    }


def compare(a: dict, b: dict) -> str:
    head = [
        f"{e['python']}, " + ", ".join(f"{k} {v}" for k, v in e["versions"].items()) for e in (a, b)
    ]
    lines = [
        f"- A: Python {head[0]}",
        f"- B: Python {head[1]}",
        "",
        "| computed in both | A and B |",
        "|---|---|",
    ]
    for name, packed in a["items"].items():
        x, y = _unpack(packed), _unpack(b["items"][name])
        if x.tobytes() == y.tobytes():
            verdict = "bit-identical"
        else:
            diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
            scale = float(np.max(np.abs(x))) or 1.0
            share = float(np.mean(x != y))
            verdict = f"differ: {share:.1%} of values, largest {np.max(diff) / scale:.1e} relative"
            if x.size == 1:
                verdict = f"differ: {x.item(0):.6f} against {y.item(0):.6f}"
        lines.append(f"| {name} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write this environment's fingerprint here (JSON)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two fingerprints")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print(compare(a, b))
        return 0
    if not args.out:
        parser.error("give --out FILE or --compare A B")
    found = measure()
    with open(args.out, "w") as f:
        json.dump(found, f)
    digest = hashlib.sha256(json.dumps(found["items"], sort_keys=True).encode()).hexdigest()
    print(f"{args.out}: Python {found['python']}, jax {found['versions']['jax']} ({digest[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
