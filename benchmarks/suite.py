r"""Every performance question in one command, within a time budget: what a GPU job should answer.

  python -m benchmarks.suite --out DIR [--budget_s 480] [--quick] [--data_dir data/tfds] \
      [--parts toy_float32,protocol,...]

Parts, in priority order, each in a process of its own with its own time cap (a share of the
budget; a part past its cap is stopped and keeps the rows it finished):
  toy_float32   GAttANet's two-pass attention training step and the backbone's own training
                step at batch 128, 1024 and 8192, float32 at the default precision policy:
                images/s and each step's compile seconds;
  protocol      the paper's toy CIFAR-10 protocol for a fixed number of epochs (3 backbone, 3
                attention; the CIFAR-10 JPEG copy when it is prepared in --data_dir, else the
                embedded dataset): time to the first step, seconds per epoch, test accuracy;
  resnet50      224 px, bfloat16, batch 256: both steps, XLA's FLOPs per step, the fraction of
                the device's peak where the device is known, compile seconds;
  precision     the toy two-pass forward in float32 against float64 at each precision policy
                (float32, tensorfloat32, XLA's default): relative error of the logits
                (norm of the difference over norm of the float64 logits);
  toy_bfloat16  the toy steps in bfloat16 (as toy_float32);
  seeds         N seeds in one program against N single runs (the seeds protocol's stages):
                the backbone stage at N = 1 and 5, the attention stage on a frozen backbone
                per member at N = 1 and 16, each in both layouts (vmap, loop): step seconds,
                the cost ratio step / (N x the plain run's step), compile seconds;
  sweep         a vmap sweep of 1, 16 and 64 attention systems on one frozen toy backbone.
The machine (device, driver, versions, the package's own commit or 'unknown') comes first.

A line says when each part starts and ends; DIR/suite.json and DIR/suite.md are rewritten after
every part, and DIR/suite.log keeps the parts' own output: three files. Compiled programs go to
the persistent compilation cache (train/compilation.py), so a second suite compiles little.

``--quick`` runs every part at toy sizes (small batches, a small ResNet50-like network at 32
px, one epoch of each stage on part of the embedded data) so that the suite is known to work on
a CPU before a GPU sees it (tests/test_suite.py runs it). How to run it on a fresh GPU machine:
benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
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

from train import cli

if __name__ == "__main__":  # flags only when run as a program (tests import this)
    _OUT = flags.DEFINE_string("out", None, "Directory for suite.json, suite.md, suite.log.")
    _BUDGET = flags.DEFINE_float("budget_s", 480.0, "Seconds for the whole suite.")
    _QUICK = flags.DEFINE_bool("quick", False, "Every part at toy sizes (a CPU check).")
    _DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "Where local_cifar10 may be prepared.")
    _PARTS = flags.DEFINE_list("parts", [], "Only these parts (default: all, in priority order).")
    _PART = flags.DEFINE_string("part", None, "(internal) run this part, rows to --rows.")
    _ROWS = flags.DEFINE_string("rows", None, "(internal) JSON-lines file of the part's rows.")

# The parts in priority order, each with its share of the budget: its time cap.
PARTS = (
    ("toy_float32", 0.16),
    ("protocol", 0.18),
    ("resnet50", 0.20),
    ("seeds", 0.20),
    ("precision", 0.05),
    ("toy_bfloat16", 0.10),
    ("sweep", 0.11),
)
MIN_PART_S = 10.0  # a part is not started with less time than this left
RESERVE_S = 3.0  # kept back from every cap for writing the results

# Dense bfloat16 / float32 peak FLOP/s (vendor data sheets, without sparsity), by device kind.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}

FULL = {
    "toy_batches": (128, 1024, 8192),
    "members": (1, 16, 64),
    "seeds": {"backbone": (1, 5), "attention": (1, 16)},
    "member_batch": 128,
    "resnet": {"batch": 256, "image_size": 224, "arch": {}},
    "repeats": 20,
    "protocol_epochs": 3,
    "precision_batch": 64,
}
QUICK = {
    "toy_batches": (8,),
    "members": (1, 2),
    "seeds": {"backbone": (2,), "attention": (2,)},
    "member_batch": 8,
    "resnet": {"batch": 2, "image_size": 32, "arch": {"stage_sizes": (1, 1, 1, 1), "width": 8}},
    "repeats": 2,
    "protocol_epochs": 1,
    "precision_batch": 4,
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, peaks in PEAK_FLOPS.items():
        if name in device_kind:
            return peaks[dtype]
    return None


# --- the parts: each emits its rows one by one (kept if the part is stopped at its cap) -------


def toy(sizes: dict, emit, dtype: str) -> None:
    from benchmarks import step as step_bench
    from train import precision

    for batch in sizes["toy_batches"]:
        with precision.scope_for(dtype):
            r, _ = step_bench.train_steps(batch, dtype, 16, sizes["repeats"], 1)
        emit(
            {
                "dtype": dtype,
                "batch": batch,
                "attention_images_per_s": batch / r["attention_step_s"],
                "backbone_train_images_per_s": batch / r["backbone_train_step_s"],
                "attention_over_backbone_train": r["attention_step_s"] / r["backbone_train_step_s"],
                "attention_compile_s": r["attention_step"]["compile_s"],
                "backbone_train_compile_s": r["backbone_train_step"]["compile_s"],
            }
        )


def sweep(sizes: dict, emit) -> None:
    from benchmarks import sweep as sweep_bench
    from train import precision

    batch = sizes["member_batch"]
    for n in sizes["members"]:
        with precision.scope_for("float32"):
            seconds, compile_s = sweep_bench.time_members(n, batch, "float32", sizes["repeats"], 1)
        emit(
            {
                "members": n,
                "batch_per_member": batch,
                "step_s": seconds,
                "images_per_s_per_member": batch / seconds,
                "compile_s": compile_s,
            }
        )


def seeds(sizes: dict, emit) -> None:
    from benchmarks import sweep as sweep_bench
    from train import precision

    batch, repeats = sizes["member_batch"], sizes["repeats"]
    with precision.scope_for("float32"):
        for stage, counts in sizes["seeds"].items():
            single, _ = sweep_bench.time_single(batch, "float32", repeats, 1, stage)
            for layout in ("vmap", "loop"):
                for n in counts:
                    seconds, compile_s = sweep_bench.time_members(
                        n, batch, "float32", repeats, 1, stage, layout, own_backbones=True
                    )
                    emit(
                        {
                            "stage": stage,
                            "layout": layout,
                            "members": n,
                            "batch_per_member": batch,
                            "step_s": seconds,
                            "single_step_s": single,
                            "cost_ratio": seconds / (n * single),
                            "compile_s": compile_s,
                        }
                    )


def resnet50(sizes: dict, emit) -> None:
    from benchmarks import step as step_bench

    rn = sizes["resnet"]
    r, _ = step_bench.train_steps(
        rn["batch"], "bfloat16", 16, sizes["repeats"], 1, "resnet50", rn["image_size"], **rn["arch"]
    )
    peak = peak_flops(jax.devices()[0].device_kind, "bfloat16")
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
            "compile_s": r[name]["compile_s"],
        }
    emit(out)


def protocol(sizes: dict, emit, quick: bool, data_dir: str) -> None:
    """Both stages of the toy recipe for a fixed number of epochs each: real epoch times and the
    accuracy they reach (a converged run is the protocol's own command, not a benchmark)."""
    from configs import toy_cifar10
    from train import train

    config = toy_cifar10.get_config()
    real = (Path(data_dir) / "local_cifar10").is_dir()
    if real and not quick:
        config.dataset.name, config.dataset.data_dir = "local_cifar10", data_dir
    else:
        config.dataset.name = "embedded"
    for t in (config.backbone_training, config.attention_training):
        t.num_epochs = sizes["protocol_epochs"]
    if quick:
        config.dataset.max_train_examples, config.dataset.max_test_examples = 512, 256
        config.model.features, config.model.hidden = (8, 16, 16), 32
        for t in (config.backbone_training, config.attention_training):
            t.batch_size = 64
        config.eval_batch_size = 256
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("backbone", "attention"):
            part = config.copy_and_resolve_references()
            part.stage = stage
            if stage == "attention":
                part.backbone_checkpoint = str(Path(tmp) / "backbone")
            t0 = time.time()
            _, results = train.train_and_evaluate(part, str(Path(tmp) / stage))
            wall = time.time() - t0
            first = results["processes"][-1]["first_step_s"]
            emit(
                {
                    "stage": stage,
                    "dataset": config.dataset.name,
                    "epochs": results["epochs"],
                    "wall_s": wall,
                    "first_step_s": first,
                    "epoch_s": (wall - first) / results["epochs"],
                    "compile_s": results["processes"][-1]["compile"]["seconds"],
                    "test_accuracy": results["test_accuracy"],
                }
            )


def precision_check(sizes: dict, emit) -> None:
    """The toy two-pass forward (mixed-sign alphas, non-zero biases) in float32 at each policy
    against the same in float64: the relative error of the logits (difference's norm over the
    float64 logits' norm)."""
    import jax.numpy as jnp
    import numpy as np

    import gattanet_jax as gj
    from benchmarks.common import build

    jax.config.update("jax_enable_x64", True)
    backbone, bv, attention, av, images, _ = build(sizes["precision_batch"], "float32", 16)
    rng = np.random.default_rng(0)
    av = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), av)
    bv = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), bv)
    x = images.astype(jnp.float32) / 255.0

    def logits(av, bv, x, dtype):
        model = backbone.clone(dtype=dtype)
        cast = jax.tree.map(lambda a: a.astype(dtype), (av, bv, x))
        return gj.two_pass(model, attention, *cast).logits

    reference = np.asarray(jax.jit(logits, static_argnums=3)(av, bv, x, jnp.float64))
    for name in ("float32", "tensorfloat32", None):
        with jax.default_matmul_precision(name) if name else contextlib.nullcontext():
            got = np.asarray(jax.jit(logits, static_argnums=3)(av, bv, x, jnp.float32))
        error = np.linalg.norm(got - reference) / np.linalg.norm(reference)
        emit({"policy": name or "xla default", "relative_error": float(error)})


def run_part(name: str, rows_path: str, quick: bool, data_dir: str) -> None:
    """One part, in this process: its rows appended to ``rows_path`` as they are measured."""
    from train import compilation

    compilation.enable_cache()
    sizes = QUICK if quick else FULL

    def emit(row: dict) -> None:
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        progress(f"{name}: {row}")

    parts = {
        "toy_float32": lambda: toy(sizes, emit, "float32"),
        "toy_bfloat16": lambda: toy(sizes, emit, "bfloat16"),
        "sweep": lambda: sweep(sizes, emit),
        "seeds": lambda: seeds(sizes, emit),
        "resnet50": lambda: resnet50(sizes, emit),
        "protocol": lambda: protocol(sizes, emit, quick, data_dir),
        "precision": lambda: precision_check(sizes, emit),
    }
    parts[name]()


# --- the suite: parts in processes of their own, within the budget ---------------------------


def start_part(argv: list[str], cap_s: float, log) -> tuple[str, float]:
    """Runs a part's process for at most ``cap_s`` seconds, its output to ``log``: (status
    'done' | 'failed' | 'timed out', wall seconds)."""
    t0 = time.time()
    try:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=cap_s)
        status = "done" if done.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        status = "timed out"
    return status, time.time() - t0


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by the cap
            break
    return rows


def run_suite(out: str, quick: bool, data_dir: str, budget_s: float = 480.0, parts=None) -> dict:
    t0 = time.time()
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    results = {"quick": quick, "budget_s": budget_s, "machine": machine(), "parts": {}}
    chosen = [(n, share) for n, share in PARTS if not parts or n in parts]
    unknown = set(parts or ()) - {n for n, _ in PARTS}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {[n for n, _ in PARTS]}")
    with tempfile.TemporaryDirectory() as tmp, open(path / "suite.log", "w") as log:
        for name, share in chosen:
            left = budget_s - (time.time() - t0)
            cap = min(share * budget_s, left) - RESERVE_S
            if cap < MIN_PART_S:
                results["parts"][name] = {"status": "skipped: budget spent", "wall_s": 0.0}
                progress(f"{name}: skipped ({left:.0f} s of the budget left)")
                _write(path, results, t0)
                continue
            progress(f"{name}: started (cap {cap:.0f} s, {left:.0f} s of the budget left)")
            rows_path = Path(tmp) / f"{name}.jsonl"
            log.write(f"--- {name}\n")  # the part's own output follows
            log.flush()
            argv = [sys.executable, "-m", "benchmarks.suite", f"--part={name}", f"--quick={quick}",
                    f"--rows={rows_path}", f"--data_dir={data_dir}"]  # fmt: skip
            status, wall = start_part(argv, cap, log)
            results[name] = read_rows(rows_path)
            results["parts"][name] = {"status": status, "wall_s": wall, "cap_s": cap}
            progress(f"{name}: {status} in {wall:.0f} s, {len(results[name])} rows")
            _write(path, results, t0)
    return results


def _write(path: Path, results: dict, t0: float) -> None:
    results["total_s"] = time.time() - t0
    (path / "suite.json").write_text(json.dumps(results, indent=1))
    (path / "suite.md").write_text(markdown(results))


def machine() -> dict:
    import flax
    import jaxlib
    import optax

    from train import progress as train_progress

    device = jax.devices()[0]
    return {
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
        "commit": train_progress.git_commit() or "unknown",
        "driver": _command(
            ["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"]
        ),
    }


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
        f"Python {m['python']}; commit {m['commit']}. Budget {r['budget_s']:.0f} s, "
        f"used {r.get('total_s', 0):.0f} s.",
        "",
        "| part | status | seconds | cap |",
        "|---|---|---|---|",
    ]
    for name, p in r["parts"].items():
        cap = f"{p['cap_s']:.0f}" if "cap_s" in p else "-"
        lines.append(f"| {name} | {p['status']} | {p['wall_s']:.0f} | {cap} |")
    toy_rows = r.get("toy_float32", []) + r.get("toy_bfloat16", [])
    if toy_rows:
        lines += [
            "",
            "## Toy model: two-pass attention training vs the backbone's own training",
            "",
            "| dtype | batch | attention images/s | backbone train images/s | attention / "
            "backbone | compile s (attention, backbone) |",
            "|---|---|---|---|---|---|",
        ]
        for t in toy_rows:
            lines.append(
                f"| {t['dtype']} | {t['batch']} | {t['attention_images_per_s']:,.0f} | "
                f"{t['backbone_train_images_per_s']:,.0f} | "
                f"{t['attention_over_backbone_train']:.2f} | {t['attention_compile_s']:.1f}, "
                f"{t['backbone_train_compile_s']:.1f} |"
            )
    if r.get("protocol"):
        lines += [
            "",
            "## Toy protocol, fixed epochs",
            "",
            "| stage | data | epochs | first step | s per epoch | compile s | test accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in r["protocol"]:
            lines.append(
                f"| {s['stage']} | {s['dataset']} | {s['epochs']} | {s['first_step_s']:.1f} s | "
                f"{s['epoch_s']:.2f} | {s['compile_s']:.1f} | {s['test_accuracy']:.4f} |"
            )
    for rn in r.get("resnet50", []):
        lines += [
            "",
            f"## ResNet50, {rn['image_size']} px, bfloat16, batch {rn['batch']}"
            + (" (reduced network)" if "architecture" in rn else ""),
            "",
            "| step | images/s | XLA GFLOP per step | TFLOP/s | fraction of peak | compile s |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("attention_step", "backbone_train_step"):
            s = rn[name]
            frac = "n/a" if s["fraction_of_peak"] is None else f"{s['fraction_of_peak']:.3f}"
            lines.append(
                f"| {name} | {s['images_per_s']:,.0f} | {s['flops'] / 1e9:.1f} | "
                f"{s['flops_per_s'] / 1e12:.2f} | {frac} | {s['compile_s']:.1f} |"
            )
    if r.get("precision"):
        lines += ["", "## float32 against float64 (toy two-pass logits)", "",
                  "| policy | relative error |", "|---|---|"]  # fmt: skip
        for p in r["precision"]:
            lines.append(f"| {p['policy']} | {p['relative_error']:.2e} |")
    if r.get("seeds"):
        lines += [
            "",
            "## Seeds in one program (a frozen backbone per member)",
            "",
            "| stage | layout | members | batch each | step | per member | cost ratio "
            "| compile s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in r["seeds"]:
            lines.append(
                f"| {s['stage']} | {s['layout']} | {s['members']} | {s['batch_per_member']} | "
                f"{s['step_s']:.4f} s | {s['step_s'] / s['members']:.4f} s | "
                f"{s['cost_ratio']:.2f} | {s['compile_s']:.1f} |"
            )
    if r.get("sweep"):
        lines += [
            "",
            "## vmap sweep on one frozen toy backbone",
            "",
            "| members | batch each | step | images/s per member | compile s |",
            "|---|---|---|---|---|",
        ]
        for s in r["sweep"]:
            lines.append(
                f"| {s['members']} | {s['batch_per_member']} | {s['step_s']:.4f} s | "
                f"{s['images_per_s_per_member']:,.0f} | {s['compile_s']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if _PART.value:
        run_part(_PART.value, _ROWS.value, _QUICK.value, _DATA_DIR.value)
        return
    if not _OUT.value:
        raise app.UsageError("--out is required")
    run_suite(_OUT.value, _QUICK.value, _DATA_DIR.value, _BUDGET.value, _PARTS.value or None)
    print((Path(_OUT.value) / "suite.md").read_text())


if __name__ == "__main__":
    cli.run(main, tool="tool")
