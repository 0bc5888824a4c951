r"""The multi-seed Table-1 protocol in one command: backbones of N seeds, then each system on
every one of them, each stage one sweep (one compiled program for all seeds), then the table
and the paired statistics.

  python -m train.protocol --config configs/toy_cifar10.py --workdir W --seeds 5 \
      --systems gattanet,learned_q,shifted_q,gala,se,gsa \
      [--patience N] [--attention_patience N] [--epochs N] [--attention_epochs N] \
      [--config.<field>=<value> ...]

Into W:
  backbones/             the backbone stage as a sweep over seeds 0..N-1 (train/sweep.py);
                         backbones/members/<i> is seed i's backbone, a plain backbone workdir
  <system>/              the system as a sweep whose member i trains on backbone i (seed i)
  paired/<i>/            ``train.analyze paired`` over the systems of seed i (example by
                         example against each frozen backbone and against each other)
  pooled/                ``train.analyze pooled`` over the seeds
  protocol.md, .json     the table: test accuracy per seed and column, mean ± sd, and each
                         system's gain over its frozen backbone (mean ± sd over seeds)

Systems: the names of configs/compare_toy_cifar10.py (gattanet, learned_q, shifted_q, gala, se,
gsa), applied to the --config given (its own fields and overrides stay). --patience and
--epochs set backbone_training, --attention_patience and --attention_epochs
attention_training (the paper: 50; 500 with at most 1,000 epochs). Rerunning the same command
resumes where it stopped: a finished stage is only re-evaluated. For a CPU check:
``--config configs/toy_cifar10.py:smoke --seeds 2``.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from train.errors import UserError

SYSTEMS = ("gattanet", "learned_q", "shifted_q", "gala", "se", "gsa")


def define_flags() -> dict:
    """The CLI's flags; defined only when run as a program."""
    defined = {
        "config": config_flags.DEFINE_config_file("config", None, "Base config (path[:arg])."),
        "workdir": flags.DEFINE_string("workdir", None, "Directory for every stage and table."),
        "seeds": flags.DEFINE_integer("seeds", 5, "Seeds 0..N-1: one backbone each."),
        "systems": flags.DEFINE_list("systems", list(SYSTEMS), "Systems to train on them."),
        "patience": flags.DEFINE_integer("patience", None, "backbone_training.patience."),
        "attention_patience": flags.DEFINE_integer(
            "attention_patience", None, "attention_training.patience."
        ),
        "epochs": flags.DEFINE_integer("epochs", None, "backbone_training.num_epochs."),
        "attention_epochs": flags.DEFINE_integer(
            "attention_epochs", None, "attention_training.num_epochs."
        ),
    }
    flags.mark_flags_as_required(["config", "workdir"])
    return defined


def system_config(base: ml_collections.ConfigDict, system: str) -> ml_collections.ConfigDict:
    """``base`` with the fields that make ``system`` (configs/compare_toy_cifar10.py: the stage,
    the global query's source, the add-on) set as that config sets them."""
    from configs import compare_toy_cifar10, toy_cifar10
    from train.pin import flat

    if system not in SYSTEMS:
        raise UserError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    plain = flat(toy_cifar10.get_config().to_dict())
    variant = flat(compare_toy_cifar10.get_config(system).to_dict())
    config = ml_collections.ConfigDict(base.to_dict())
    for field, value in variant.items():
        if plain.get(field) != value or field == "stage":
            section, _, name = field.rpartition(".")
            target = config
            for part in section.split(".") if section else ():
                target = target[part]
            target[name] = value
    return config


def stage_configs(base, workdir: Path, seeds: int, systems: list[str], **overrides) -> dict:
    """{stage directory name: its sweep config}: 'backbones', then each system."""
    from train import defaults

    if seeds < 2:
        raise UserError(f"--seeds must be 2 or more (mean ± sd over seeds), got {seeds}")
    base = defaults.complete(base)
    for key, field in (
        ("patience", "backbone_training.patience"),
        ("epochs", "backbone_training.num_epochs"),
        ("attention_patience", "attention_training.patience"),
        ("attention_epochs", "attention_training.num_epochs"),
    ):
        if overrides.get(key) is not None:
            section, name = field.split(".")
            base[section][name] = overrides[key]
    base.sweep.seeds = tuple(range(seeds))
    backbones = ml_collections.ConfigDict(base.to_dict())
    backbones.stage = "backbone"
    stages = {"backbones": backbones}
    members = tuple(str(workdir / "backbones" / "members" / str(i)) for i in range(seeds))
    for system in systems:
        config = system_config(base, system)
        config.sweep.backbones = members
        stages[system] = config
    return stages


def run(base, workdir: str, seeds: int, systems: list[str], **overrides) -> dict:
    """Every stage (each resumed where it stopped), then the table and the paired statistics."""
    from train import progress, train

    path = Path(workdir)
    stages = stage_configs(base, path, seeds, systems, **overrides)
    results = {}
    for name, config in stages.items():
        progress.log(f"[protocol] {name}: {seeds} seeds in one sweep -> {path / name}")
        _, results[name] = train.train_and_evaluate(config, str(path / name))
    table = write_table(path, results, systems)
    statistics(path, seeds, systems)
    return table


def write_table(path: Path, results: dict, systems: list[str]) -> dict:
    """protocol.json and protocol.md from the sweeps' results: per seed and column, mean ± sd,
    and each system's gain over the frozen backbone of its seed."""
    from train.selection import recorded as selected_on
    from train.tools.analyses.seeds import percent_stats as stats

    backbone = [r["test_accuracy"] for r in results["backbones"]["members"]]
    columns = {"backbone": backbone}
    gains = {}
    for system in systems:
        rows = results[system]["members"]
        columns[system] = [r["test_accuracy"] for r in rows]
        gains[system] = [r["test_accuracy"] - r["backbone_test_accuracy"] for r in rows]

    table = {
        "seeds": len(backbone),
        "test_accuracy": {k: [float(x) for x in v] for k, v in columns.items()},
        "mean_sd": {k: stats(v) for k, v in columns.items()},
        "gain": {k: stats(v) for k, v in gains.items()},
        "selected_on": ", ".join(
            dict.fromkeys(selected_on(r) for r in _member_records(path, systems))
        ),
    }
    (path / "protocol.json").write_text(json.dumps(table, indent=2))
    names = list(columns)

    def cell(stat, sign=""):
        return f"{stat['mean']:{sign}.2f} ± {stat['sd']:.2f}"

    lines = [
        f"Test accuracy (%) over {table['seeds']} seeds; mean ± sd; gain: a system's accuracy "
        "minus its seed's frozen backbone's.",
        "",
        "| seed | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *(
            f"| {i} | " + " | ".join(f"{100 * columns[n][i]:.2f}" for n in names) + " |"
            for i in range(table["seeds"])
        ),
        "| mean ± sd | " + " | ".join(cell(table["mean_sd"][n]) for n in names) + " |",
        "| gain | - | " + " | ".join(cell(table["gain"][n], "+") for n in systems) + " |",
    ]
    lines += ["", f"Each run's epoch was selected (and its early stopping watched) on: "
              f"{table['selected_on']}."]  # fmt: skip
    if "test" in table["selected_on"]:
        lines += ["", "Selected on the test set: these are not held-out figures."]
    text = "\n".join(lines) + "\n"
    (path / "protocol.md").write_text(text)
    print(text, end="")
    return table


def _member_records(path: Path, systems: list[str]):
    for name in ("backbones", *systems):
        for record in sorted((path / name / "members").glob("*/results.json")):
            yield json.loads(record.read_text())


def statistics(path: Path, seeds: int, systems: list[str]) -> None:
    """``paired`` per seed over its systems, then ``pooled`` over the seeds (at float32, as
    ``train.analyze`` evaluates)."""
    from train import precision
    from train.tools.analyses.paired import paired, pooled

    runs_of = [[str(path / s / "members" / str(i)) for s in systems] for i in range(seeds)]
    if len(systems) < 2:  # paired compares two or more runs (each also against its backbone)
        return
    with precision.scope_for("float32"):
        for i, runs in enumerate(runs_of):
            paired(path / "paired" / str(i), runs)
    pooled(path / "pooled", [str(path / "paired" / str(i)) for i in range(seeds)])


def main(argv, defined: dict):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from train import compilation

    f = {k: v.value for k, v in defined.items()}
    with compilation.cache():
        run(
            f["config"], f["workdir"], f["seeds"], f["systems"], patience=f["patience"],
            attention_patience=f["attention_patience"], epochs=f["epochs"],
            attention_epochs=f["attention_epochs"],
        )  # fmt: skip


def run_cli():
    """``python -m train.protocol``."""
    from train import cli

    cli.run_tool(main, define_flags)


if __name__ == "__main__":
    run_cli()
