r"""GAttANet against GALA, SE and GSA add-ons on the same frozen backbones, one table.

  python -m train.compare --workdir workdirs/compare \
      --backbones workdirs/b0,workdirs/b1,workdirs/b2 --systems gattanet,gala,se,gsa \
      [--seeds 0,1,2] [--epochs N] [--patience N] [--data_dir DIR] [--arg smoke]

For every backbone (a backbone-stage workdir or checkpoint) and every system of
configs/compare_toy_cifar10.py, trains the system on that frozen backbone into
``<workdir>/<system>/<seed>`` (the seeds, one per backbone, default 0, 1, ...: more seeds join
a comparison with ``--backbones B3,B4 --seeds 3,4``; a run finished with the same config is
read back, an interrupted one resumes), then writes ``compare.md`` (mean and
standard deviation over the backbones, the gain over each frozen backbone) and
``compare.json``. Several processes may run the same command on one workdir at once: each run is
trained by one of them, and each writes the whole table.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import numpy as np
from absl import app, flags

from train import compilation, defaults, progress, selection
from train.errors import UserError

LOCK = ".compare.lock"


def define_flags() -> dict:
    """The CLI's flags; defined only when run as a program, so importing this module (tests,
    notebooks) never clashes with other modules' absl flags."""
    defined = {
        "workdir": flags.DEFINE_string("workdir", None, "Directory for the runs and the table."),
        "backbones": flags.DEFINE_list("backbones", None, "Frozen backbone workdirs/checkpoints."),
        "systems": flags.DEFINE_list("systems", "gattanet,gala,se,gsa", "Systems to compare."),
        "seeds": flags.DEFINE_list("seeds", None, "One seed per backbone (default 0, 1, ...)."),
        "epochs": flags.DEFINE_integer("epochs", None, "attention_training.num_epochs."),
        "patience": flags.DEFINE_integer("patience", None, "attention_training.patience."),
        "data_dir": flags.DEFINE_string("data_dir", None, "dataset.data_dir."),
        "dataset": flags.DEFINE_string("dataset", None, "dataset.name."),
        "arg": flags.DEFINE_string("arg", "", "Config arguments for every run, e.g. 'smoke'."),
    }
    flags.mark_flags_as_required(["workdir", "backbones"])
    return defined


def run_config(system: str, backbone: str, seed: int, arg: str = "", **overrides):
    from configs import compare_toy_cifar10

    words = [w for w in arg.split(",") if w]
    known = ("smoke", "scratch")
    if unknown := [w for w in words if w not in known]:
        raise UserError(f"--arg: unknown config argument {unknown[0]!r}; known: {', '.join(known)}")
    try:
        config = compare_toy_cifar10.get_config(",".join([system, *words]))
    except ValueError as e:  # an unknown system
        raise UserError(f"{e}") from None
    config.backbone_checkpoint = backbone
    config.seed = seed
    t = config.attention_training
    if overrides.get("epochs") is not None:
        t.num_epochs = overrides["epochs"]
    if overrides.get("patience") is not None:
        t.patience = overrides["patience"]
    if overrides.get("data_dir") is not None:
        config.dataset.data_dir = overrides["data_dir"]
    if overrides.get("dataset") is not None:
        config.dataset.name = overrides["dataset"]
    return config


def _as_json(config) -> dict:
    """A config with its defaults, as JSON reads it back (tuples become lists)."""
    return json.loads(defaults.complete(config).to_json_best_effort())


PATHS = ("backbone_checkpoint", "dataset.data_dir")  # where things are, not what is trained


def _trained_alike(recorded: dict, config) -> bool:
    """A recorded config and this one are the same run, wherever its backbone and data are
    now (the backbone itself is checked by its sha256)."""
    from train import pin

    a, b = pin.flat(_as_json(recorded)), pin.flat(_as_json(config))
    return {k: v for k, v in a.items() if k not in PATHS} == {
        k: v for k, v in b.items() if k not in PATHS
    }


def _finished(run_dir: str, config) -> dict | None:
    """A finished run's results.json (its own wall time kept), if it ran this very config on the
    backbone that is there now."""
    from train import checkpoints

    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            same = _trained_alike(json.load(f), config)
        with open(os.path.join(run_dir, "results.json")) as f:
            results = json.load(f) if same else None
    except FileNotFoundError:
        return None
    if results and config.backbone_checkpoint:
        sha = checkpoints.source_digest(config.backbone_checkpoint)
        checkpoints.check_recorded_backbone(results, sha, run_dir)
    return results


@contextlib.contextmanager
def _claim(run_dir: str, wait: bool):
    """Holds ``<run_dir>/.compare.lock`` (an flock: the system drops it when its process ends,
    even by kill -9); yields False, without waiting, when another process holds it."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LOCK), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compare(
    workdir: str, backbones, systems, arg: str = "", configure=None, seeds=None, **overrides
) -> dict:
    """Trains what is missing and returns {'systems': {name: [results per backbone]}}.
    ``configure``: a function applied to every run's config last (e.g. a smaller model).
    ``seeds``: one per backbone, the runs' seeds and folder names (default 0, 1, ...).

    Several processes may run the same comparison in one workdir (two side by side train
    faster than one on a CPU whose cores one run does not fill): each run is claimed by one
    process; the others train the rest and then wait for it and read it back."""
    from train import train, validate

    backbones = list(backbones or ())
    if not backbones or any(not b.strip() for b in backbones):
        raise UserError(
            f"--backbones must name one or more backbone workdirs, comma-separated, got "
            f"{','.join(backbones)!r}"
        )
    if not systems or any(not s.strip() for s in systems):
        raise UserError(f"--systems must name one or more systems, got {','.join(systems)!r}")
    seeds = _seeds(seeds, len(backbones))
    for backbone in backbones:
        _check_finished(backbone)
    runs = {}
    for system in systems:
        for seed, backbone in zip(seeds, backbones, strict=True):
            config = run_config(system, backbone, seed, arg, **overrides)
            if configure is not None:
                configure(config)
            validate.check_before_work(defaults.complete(config))  # every run, before any trains
            runs[system, seed] = (config, os.path.join(workdir, system, str(seed)), backbone)

    done = sum(_finished(run_dir, config) is not None for config, run_dir, _ in runs.values())
    print(f"[compare] {done} of {len(runs)} runs finished in {workdir}", flush=True)

    def train_or_read(key, wait: bool):
        config, run_dir, backbone = runs[key]
        with _claim(run_dir, wait) as claimed:
            results = _finished(run_dir, config) if claimed else None
            if claimed and results is None:
                print(f"[compare] {key[0]} on backbone {key[1]} ({backbone}) -> {run_dir}",
                      flush=True)  # fmt: skip
                _, results = train.train_and_evaluate(config, run_dir)
            return results

    results = {key: train_or_read(key, wait=False) for key in runs}
    for key in [k for k, r in results.items() if r is None]:
        print(f"[compare] {key[0]} on backbone {key[1]}: another process is training it; "
              "waiting for it", flush=True)  # fmt: skip
        results[key] = train_or_read(key, wait=True)
    out = {"backbones": list(backbones), "seeds": seeds, "systems": {}}
    for (system, _), r in results.items():
        out["systems"].setdefault(system, []).append(r)
    return out


def _seeds(seeds, n: int) -> list[int]:
    """One seed per backbone: the given ones (distinct integers >= 0), else 0, 1, ..."""
    if seeds is None or list(seeds) == []:
        return list(range(n))
    try:
        values = [int(s) for s in seeds]
    except (TypeError, ValueError):
        values = []
    if len(values) != n or len(set(values)) != n or min(values) < 0:
        raise UserError(
            f"--seeds must give {n} distinct integers >= 0, one per backbone, got "
            f"{','.join(str(s) for s in seeds)!r}"
        )
    return values


def _check_finished(backbone: str) -> None:
    """A backbone workdir whose training has not ended is refused: the comparison is of add-ons
    on trained backbones, and a backbone still training would change under them. Its best/
    directory, passed as such, is taken as it is."""
    from train import checkpoints

    epoch = checkpoints.unfinished_training(backbone)
    if epoch is None:
        return
    raise UserError(
        f"backbone {backbone} has not finished training (no results.json; its last checkpoint "
        f"is of epoch {epoch}): rerun its training command to finish it, or pass "
        f"{os.path.join(backbone, 'best')} to use its best checkpoint as it is"
    )


def _mean_std(values) -> str:
    v = 100 * np.asarray(values, np.float64)
    if len(v) < 2:
        return f"{v.mean():.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def table(out: dict) -> str:
    """Markdown: one row per system (and the frozen backbones), one column per backbone."""
    runs = out["systems"]
    first = next(iter(runs.values()))
    n = len(first)
    head = " | ".join(f"seed {s}" for s in out.get("seeds") or range(n))
    lines = [
        f"| system | trainable params | {head} | mean ± sd | gain (mean ± sd) | epochs (best) | "
        "selected on |",
        "|---" * (n + 6) + "|",
    ]
    base = [r["backbone_test_accuracy"] for r in first]
    cells = " | ".join(f"{100 * b:.2f}" for b in base)
    lines.append(f"| frozen backbone | 0 | {cells} | {_mean_std(base)} | | | |")
    for system, results in runs.items():
        acc = [r["test_accuracy"] for r in results]
        gain = [r["test_accuracy"] - r["backbone_test_accuracy"] for r in results]
        cells = " | ".join(f"{100 * a:.2f}" for a in acc)
        epochs = ", ".join(f"{r['epochs']} ({r['best_epoch']})" for r in results)
        selected = ", ".join(dict.fromkeys(selection.recorded(r) for r in results))
        lines.append(
            f"| {system} | {results[0]['trainable_params']:,} | {cells} | {_mean_std(acc)} | "
            f"{_mean_std(gain)} | {epochs} | {selected} |"
        )
    return "\n".join(lines) + "\n"


def main(argv, defined: dict):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = {k: v.value for k, v in defined.items()}
    overrides = {k: f[k] for k in ("epochs", "patience", "data_dir", "dataset")}
    compilation.enable_cache()
    out = compare(
        f["workdir"], f["backbones"], f["systems"], f["arg"], seeds=f["seeds"], **overrides
    )
    text = table(out)
    progress.write_text(Path(f["workdir"]) / "compare.md", text)
    progress.write_text(Path(f["workdir"]) / "compare.json", json.dumps(out, indent=1, default=str))
    print(text)


def run_cli():
    """``python -m train.compare``."""
    from train import cli

    cli.run(main, define_flags)


if __name__ == "__main__":
    run_cli()
