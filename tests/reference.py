"""Independent loop-based NumPy references of GAttANet and the toy model, in float64.

Written straight from the paper's equations, one position or unit at a time, sharing no code
with the library.
"""

from __future__ import annotations

import numpy as np


def conv_keys(acts, kernel, bias):
    """Eq. 1 by loops: acts (B, H, W, C), kernel (C, d) -> (B, H, W, d)."""
    b, h, w, c = acts.shape
    d = kernel.shape[1]
    out = np.zeros((b, h, w, d))
    for n in range(b):
        for x in range(h):
            for y in range(w):
                for m in range(d):
                    out[n, x, y, m] = sum(acts[n, x, y, ch] * kernel[ch, m] for ch in range(c))
                    out[n, x, y, m] += bias[m]
    return out


def dense_keys(acts, kernel, bias):
    """Eq. 2 by loops: acts (B, C), kernel (C, d) -> (B, C, d)."""
    b, c = acts.shape
    d = kernel.shape[1]
    out = np.zeros((b, c, d))
    for n in range(b):
        for u in range(c):
            for m in range(d):
                out[n, u, m] = acts[n, u] * kernel[u, m] + bias[m]
    return out


def global_query(queries):
    """Eq. 3 by loops over sites and positions."""
    b, d = queries[0].shape[0], queries[0].shape[-1]
    q = np.zeros((b, d))
    for n in range(b):
        for m in range(d):
            total = 0.0
            for site in queries:
                positions = site[n].reshape(-1, d)
                total += sum(positions[p, m] for p in range(positions.shape[0])) / len(positions)
            q[n, m] = total / len(queries)
    return q


def agreement(keys, q_avg):
    """Eq. 4 by loops: keys (B, *positions, d), q_avg (B, d) -> (B, *positions)."""
    b, d = q_avg.shape
    flat = keys.reshape(b, -1, d)
    out = np.zeros(flat.shape[:2])
    for n in range(b):
        for p in range(flat.shape[1]):
            out[n, p] = sum(flat[n, p, m] * q_avg[n, m] for m in range(d))
    return out.reshape(keys.shape[:-1])


def modulate(acts, gatta, alpha):
    """Eq. 5 by loops; conv sites share a factor across channels, dense sites have one per unit."""
    out = np.array(acts, dtype=np.float64)
    for idx in np.ndindex(*gatta.shape):
        out[idx] = out[idx] * (1.0 + alpha * gatta[idx])
    return out


# --- the toy backbone, step by step ---------------------------------------------------------


def conv3x3_same(x, kernel, bias):
    """x (B, H, W, Cin), kernel (3, 3, Cin, Cout): cross-correlation with zero 'same' padding."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1])) + bias
    for dx in range(3):
        for dy in range(3):
            out += padded[:, dx : dx + h, dy : dy + w, :] @ kernel[dx, dy]
    return out


def max_pool(x):
    b, h, w, c = x.shape
    out = np.zeros((b, h // 2, w // 2, c))
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, i, j, :] = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].max(axis=(1, 2))
    return out


def toy_forward(params, images, site_hook=None):
    """The toy model; ``site_hook(name, activation)`` may replace each site's output."""
    hook = site_hook or (lambda name, a: a)
    x = np.asarray(images, np.float64)
    for name in ("conv1", "conv2", "conv3"):
        p = params[name]
        x = hook(name, np.maximum(conv3x3_same(x, p["kernel"], p["bias"]), 0.0))
        x = max_pool(x)
    x = x.reshape(x.shape[0], -1)
    p = params["dense1"]
    x = hook("dense1", np.maximum(x @ p["kernel"] + p["bias"], 0.0))
    p = params["logits"]
    return hook("logits", x @ p["kernel"] + p["bias"])


def gattanet_toy(
    params, att, images, sites, lesion=None, iterations=1, cue=None, cue_weight=0.0, bounded=False
):
    """GAttANet on the toy model: pass 1, attention, pass 2, all in NumPy. ``iterations`` T:
    T modulated passes, each agreement from the previous pass's modulated site outputs;
    ``cue`` (B, d) mixed into q_avg with ``cue_weight``; ``bounded``: tanh of the agreement."""
    acts = {}

    def keep(name, a):
        acts[name] = a
        return a

    toy_forward(params, images, keep)
    on = {n: lesion is None or lesion[i] != "." for i, (n, _) in enumerate(sites)}
    for _ in range(iterations):
        keys, queries = {}, {}
        for name, kind in sites:
            p = att[name]
            project = conv_keys if kind == "conv" else dense_keys
            keys[name] = project(acts[name], p["K"], p["K_bias"])
            queries[name] = project(acts[name], p["Q"], p["Q_bias"])
        q_avg = global_query([queries[n] for n, _ in sites])
        if cue is not None:
            w = np.reshape(np.asarray(cue_weight, np.float64), (-1, 1))
            q_avg = (1 - w) * q_avg + w * np.asarray(cue, np.float64)
        gatta = {n: agreement(keys[n], q_avg) for n, _ in sites}
        if bounded:
            gatta = {n: np.tanh(g) for n, g in gatta.items()}
        acts = {}

        def mod(name, a, gatta=gatta, acts=acts):
            if name in gatta and on[name]:
                a = modulate(a, gatta[name], att[name]["alpha"])
            acts[name] = a
            return a

        logits = toy_forward(params, images, mod)
    return logits, q_avg, gatta
