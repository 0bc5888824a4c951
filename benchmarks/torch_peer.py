"""The toy model's training steps as a researcher would write them in plain PyTorch (eager,
CPU): GAttANet's attention step (the same model, batch, dropout, optimizer and two passes as
ours) and the backbone's own training step (all parameters, dropout 0.2, Adam).

Optional: needs ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import time

import numpy as np


def _toy(torch, nn):
    class Toy(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.convs = nn.ModuleList(
                [
                    nn.Conv2d(3, 32, 3, padding=1),
                    nn.Conv2d(32, 64, 3, padding=1),
                    nn.Conv2d(64, 128, 3, padding=1),
                ]
            )
            self.dense1 = nn.Linear(2048, 256)
            self.logits = nn.Linear(256, classes)
            self.drop = nn.Dropout(0.2)  # after each pooling, active in train() mode

        def forward(self, x, factors=None, record=None):
            def site(i, a):
                if record is not None:
                    record.append(a)
                return a if factors is None else a * factors[i]

            for i, conv in enumerate(self.convs):
                x = site(i, torch.relu(conv(x)))
                x = self.drop(nn.functional.max_pool2d(x, 2))
            x = site(3, torch.relu(self.dense1(x.permute(0, 2, 3, 1).flatten(1))))
            return site(4, self.logits(x))

    return Toy()


def _median_step_seconds(step, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def backbone_train_step_seconds(batch: int, repeats: int, warmup: int, threads: int) -> float:
    """The backbone's own training step: forward in train mode, cross-entropy, backward
    through every parameter, an Adam update."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _toy(torch, nn).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _median_step_seconds(step, repeats, warmup)


def attention_step_seconds(batch: int, d: int, repeats: int, warmup: int, threads: int) -> float:
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    channels = [32, 64, 128, 256, 10]
    kinds = ["conv", "conv", "conv", "dense", "dense"]
    model = _toy(torch, nn).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    K = [nn.Parameter(torch.randn(c, d) * 0.1) for c in channels]
    Q = [nn.Parameter(torch.randn(c, d) * 0.1) for c in channels]
    bk = [nn.Parameter(torch.zeros(d)) for _ in channels]
    bq = [nn.Parameter(torch.zeros(d)) for _ in channels]
    alpha = nn.Parameter(torch.full((5,), 0.01))
    params = [*K, *Q, *bk, *bq, alpha]
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-7)
    drop = nn.Dropout(0.25)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        acts = []
        with torch.no_grad():
            model(x, record=acts)
        keys, queries = [], []
        for a, kind, k, q, b1, b2 in zip(acts, kinds, K, Q, bk, bq, strict=True):
            if kind == "conv":
                a = a.permute(0, 2, 3, 1)  # (B, H, W, C)
                keys.append(drop(a @ k + b1))
                queries.append(drop(a @ q + b2))
            else:
                keys.append(drop(a[..., None] * k + b1))
                queries.append(drop(a[..., None] * q + b2))
        q_avg = torch.stack([q.flatten(1, -2).mean(1) for q in queries]).mean(0)
        factors = []
        for i, (k, kind) in enumerate(zip(keys, kinds, strict=True)):
            gatta = torch.einsum("b...d,bd->b...", k, q_avg)
            factors.append(1 + alpha[i] * (gatta[:, None] if kind == "conv" else gatta))
        logits = model(x, factors=factors)
        loss = nn.functional.cross_entropy(logits, y)
        loss = loss + 1e-5 * sum((w**2).sum() for w in [*K, *Q])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _median_step_seconds(step, repeats, warmup)
