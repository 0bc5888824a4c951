r"""Every performance question in one command: the measurements a GPU run should answer.

  python -m benchmarks.suite --out DIR [--quick] [--data_dir data/tfds]

Writes DIR/suite.json and DIR/suite.md with:
  toy        GAttANet's two-pass attention training step and the backbone's own training step,
             images/s at batch 128, 1024 and 8192, float32 and bfloat16 (and their ratio);
  sweep      a vmap sweep of 1, 16 and 64 attention systems on one frozen toy backbone,
             images/s per member (batch 128 each);
  resnet50   224 px, bfloat16, batch 256: the two-pass attention step and the backbone's
             training step (random weights, synthetic data), XLA's FLOPs per step and the
             achieved fraction of the device's peak where the device is known;
  protocol   the paper's toy CIFAR-10 protocol end to end (the CIFAR-10 JPEG copy when it is
             prepared in --data_dir, else the embedded dataset): the backbone with early
             stopping (patience 50, at most 500 epochs), then GAttANet (patience 500, at most
             1000 epochs), each stage's wall time and test accuracy;
  machine    device, driver, software versions and the git commit.

``--quick`` runs every part at toy sizes (small batches, a small ResNet50-like network at 32 px,
a two-epoch protocol on part of the embedded data) so that the suite is known to work on a CPU
before a GPU sees it (tests/test_suite.py runs it). How to run it on a fresh GPU machine:
benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags

from benchmarks import step as step_bench
from benchmarks import sweep as sweep_bench

if __name__ == "__main__":  # flags only when run as a program (tests import this)
    _OUT = flags.DEFINE_string("out", None, "Directory for suite.json and suite.md.", required=True)
    _QUICK = flags.DEFINE_bool("quick", False, "Every part at toy sizes (a CPU check).")
    _DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "Where local_cifar10 may be prepared.")

# Dense bfloat16 / float32 peak FLOP/s (vendor data sheets, without sparsity), by device kind.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}

FULL = {
    "toy_batches": (128, 1024, 8192),
    "members": (1, 16, 64),
    "member_batch": 128,
    "resnet": {"batch": 256, "image_size": 224, "arch": {}},
    "repeats": 20,
}
QUICK = {
    "toy_batches": (8,),
    "members": (1, 2),
    "member_batch": 8,
    "resnet": {"batch": 2, "image_size": 32, "arch": {"stage_sizes": (1, 1, 1, 1), "width": 8}},
    "repeats": 2,
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, peaks in PEAK_FLOPS.items():
        if name in device_kind:
            return peaks[dtype]
    return None


def toy(sizes: dict) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for batch in sizes["toy_batches"]:
            r, _ = step_bench.train_steps(batch, dtype, 16, sizes["repeats"], 1)
            rows.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    "attention_images_per_s": batch / r["attention_step_s"],
                    "backbone_train_images_per_s": batch / r["backbone_train_step_s"],
                    "attention_over_backbone_train": r["attention_step_s"]
                    / r["backbone_train_step_s"],
                }
            )
            progress(f"toy {dtype} batch {batch}: {rows[-1]['attention_images_per_s']:,.0f} img/s")
    return rows


def sweep(sizes: dict) -> list[dict]:
    rows, batch = [], sizes["member_batch"]
    for n in sizes["members"]:
        seconds = sweep_bench.time_members(n, batch, "float32", sizes["repeats"], 1)
        rows.append(
            {
                "members": n,
                "batch_per_member": batch,
                "step_s": seconds,
                "images_per_s_per_member": batch / seconds,
            }
        )
        progress(f"sweep {n} members: {rows[-1]['images_per_s_per_member']:,.0f} img/s each")
    return rows


def resnet50(sizes: dict) -> dict:
    rn = sizes["resnet"]
    r, _ = step_bench.train_steps(
        rn["batch"], "bfloat16", 16, sizes["repeats"], 1, "resnet50", rn["image_size"], **rn["arch"]
    )
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind, "bfloat16")
    out = {"batch": rn["batch"], "image_size": rn["image_size"], "dtype": "bfloat16"}
    if rn["arch"]:
        out["architecture"] = dict(rn["arch"], note="reduced (--quick)")
    for name in ("attention_step", "backbone_train_step"):
        seconds, flops = r[f"{name}_s"], r[name]["flops"]
        out[name] = {
            "s": seconds,
            "images_per_s": rn["batch"] / seconds,
            "flops": flops,
            "flops_per_s": flops / seconds,
            "fraction_of_peak": flops / seconds / peak if peak else None,
        }
    progress(f"resnet50 attention step: {out['attention_step']['images_per_s']:,.0f} img/s")
    return out


def protocol(quick: bool, data_dir: str) -> dict:
    from configs import toy_cifar10
    from train import train

    config = toy_cifar10.get_config()
    config.stage = "both"
    real = (Path(data_dir) / "local_cifar10").is_dir()
    if real and not quick:
        config.dataset.name, config.dataset.data_dir = "local_cifar10", data_dir
    else:
        config.dataset.name = "embedded"
    if quick:
        config.dataset.max_train_examples, config.dataset.max_test_examples = 512, 256
        config.model.features, config.model.hidden = (8, 16, 16), 32
        for t in (config.backbone_training, config.attention_training):
            t.batch_size, t.num_epochs, t.patience = 64, 2, 1
        config.eval_batch_size = 256
    stages = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("backbone", "attention"):
            t0 = time.time()
            part = config.copy_and_resolve_references()
            part.stage = stage
            if stage == "attention":
                part.backbone_checkpoint = str(Path(tmp) / "backbone")
            _, results = train.train_and_evaluate(part, str(Path(tmp) / stage))
            stages[stage] = {
                "wall_s": time.time() - t0,
                "epochs": results["epochs"],
                "best_epoch": results["best_epoch"],
                "early_stopped": results["early_stopped"],
                "test_accuracy": results["test_accuracy"],
            }
            progress(f"protocol {stage}: {stages[stage]['wall_s']:.0f} s")
    recipe = {
        k: {"patience": t.patience, "max_epochs": t.num_epochs}
        for k, t in (
            ("backbone", config.backbone_training),
            ("attention", config.attention_training),
        )
    }
    return {"dataset": config.dataset.name, "recipe": recipe, **stages}


def machine() -> dict:
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    out = {
        "device": str(device),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "platform": device.platform,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "cpu_count": os.cpu_count(),
        "commit": _command(["git", "rev-parse", "HEAD"]),
        "driver": _command(
            ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]
        ),
    }
    return out


def _command(argv) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def progress(line: str) -> None:
    print(f"[suite] {line}", file=sys.stderr, flush=True)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Benchmark suite{' (--quick: toy sizes)' if r['quick'] else ''}",
        "",
        f"{m['device_kind']} x {m['device_count']} ({m['platform']}), driver {m['driver']}; "
        f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, optax {m['optax']}, "
        f"Python {m['python']}; commit {m['commit']}. Total {r['total_s']:.0f} s.",
        "",
        "## Toy model: two-pass attention training vs the backbone's own training",
        "",
        "| dtype | batch | attention images/s | backbone train images/s | attention / backbone |",
        "|---|---|---|---|---|",
    ]
    for t in r["toy"]:
        lines.append(
            f"| {t['dtype']} | {t['batch']} | {t['attention_images_per_s']:,.0f} | "
            f"{t['backbone_train_images_per_s']:,.0f} | {t['attention_over_backbone_train']:.2f} |"
        )
    lines += [
        "",
        "## vmap sweep on one frozen toy backbone",
        "",
        "| members | batch each | step | images/s per member |",
        "|---|---|---|---|",
    ]
    for s in r["sweep"]:
        lines.append(
            f"| {s['members']} | {s['batch_per_member']} | {s['step_s']:.4f} s | "
            f"{s['images_per_s_per_member']:,.0f} |"
        )
    rn = r["resnet50"]
    lines += [
        "",
        f"## ResNet50, {rn['image_size']} px, bfloat16, batch {rn['batch']}"
        + (" (reduced network)" if "architecture" in rn else ""),
        "",
        "| step | images/s | XLA GFLOP per step | TFLOP/s | fraction of peak |",
        "|---|---|---|---|---|",
    ]
    for name in ("attention_step", "backbone_train_step"):
        s = rn[name]
        frac = "n/a" if s["fraction_of_peak"] is None else f"{s['fraction_of_peak']:.3f}"
        lines.append(
            f"| {name} | {s['images_per_s']:,.0f} | {s['flops'] / 1e9:.1f} | "
            f"{s['flops_per_s'] / 1e12:.2f} | {frac} |"
        )
    p = r["protocol"]
    lines += [
        "",
        f"## Toy protocol end to end ({p['dataset']})",
        "",
        "| stage | patience / max epochs | epochs run | best epoch | test accuracy | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for stage in ("backbone", "attention"):
        s, rec = p[stage], p["recipe"][stage]
        lines.append(
            f"| {stage} | {rec['patience']} / {rec['max_epochs']} | {s['epochs']} | "
            f"{s['best_epoch']} | {s['test_accuracy']:.4f} | {s['wall_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def run_suite(out: str, quick: bool, data_dir: str) -> dict:
    sizes = QUICK if quick else FULL
    t0 = time.time()
    results = {"quick": quick, "machine": machine()}
    results["toy"] = toy(sizes)
    results["sweep"] = sweep(sizes)
    results["resnet50"] = resnet50(sizes)
    results["protocol"] = protocol(quick, data_dir)
    results["total_s"] = time.time() - t0
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "suite.json").write_text(json.dumps(results, indent=1))
    (path / "suite.md").write_text(markdown(results))
    return results


def main(argv):
    del argv
    run_suite(_OUT.value, _QUICK.value, _DATA_DIR.value)
    print((Path(_OUT.value) / "suite.md").read_text())


if __name__ == "__main__":
    app.run(main)
