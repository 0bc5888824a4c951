r"""The fault sweep: a small run interrupted at every phase of its life, then rerun.

  python -m tests.fault_sweep [--scenarios both,sweep] [--faults TERM,KILL,INT2] [--timed 4]
      [--jobs 1] [--table docs/fault_sweep.md]

Two scenarios, each a tiny run of ``python -m train.main`` on the embedded data: ``both`` (the
backbone stage, then GAttANet on it: ``stage=both``, within-epoch checkpoints, keep-1 pruning)
and ``sweep`` (a two-member backbone sweep). Each is first run without a fault: its phase log
(``GATTANET_PHASE_LOG``, written by ``train.signals.phase``) lists every phase it passes
through, and its records (every results.json's numbers, every history.jsonl) are the reference.
Then, for every phase, at its first and its last occurrence (start-up, compilation, the first
step, training, each checkpoint save and its two instants after the write, evaluation, the
final evaluation, the switch between the stages, the end), and for every fault (SIGTERM,
SIGKILL, two SIGINTs 0.3 s apart), the run starts afresh with ``GATTANET_FAULT`` set, so that
the process delivers the fault to itself when it enters that phase; ``--timed N`` adds N
moments per fault chosen at random over the reference run's duration (sent from outside; the
phase they hit is read from the log). After each interruption the same command is rerun.

A case passes when the interrupted process printed no traceback, the rerun exits 0 without
one, and the rerun's records equal the reference's (every number of every results.json but
times and processes, and every history.jsonl line). The table lists each case: the phase the
fault was aimed at, the phase the process was in when it ended (from its log), its exit status
and last line, and the verdict; the command exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--config=configs/toy_cifar10.py:smoke",
    "--config.dataset.name=embedded",
    "--config.dataset.max_train_examples=160",
    "--config.dataset.max_test_examples=64",
    "--config.model.features=(4, 8, 8)",
    "--config.model.hidden=16",
    "--config.eval_batch_size=50",
    "--config.keep_checkpoints=1",
]
BACKBONE = [  # each stage's recipe: options a stage does not read are refused
    "--config.backbone_training.num_epochs=2",
    "--config.backbone_training.patience=2",
    "--config.backbone_training.learning_rate=3e-3",
]
ATTENTION = [
    "--config.attention_training.num_epochs=2",
    "--config.attention_training.patience=2",
    "--config.attention_training.learning_rate=3e-3",
]
SCENARIOS = {
    "both": [*TINY, *BACKBONE, *ATTENTION, "--config.stage=both",
             "--config.checkpoint_every_steps=2"],
    "sweep": [*TINY, *BACKBONE, "--config.stage=backbone", "--config.sweep.seeds=(0, 1)"],
    # the suite's fast subset (tests/test_faults.py): one stage
    "backbone": [*TINY, *BACKBONE, "--config.stage=backbone",
                 "--config.checkpoint_every_steps=2"],
}  # fmt: skip
FAULTS = ("TERM", "KILL", "INT2")
# results.json fields that differ between runs of the same command by design (the checkpoint
# files' sha256: orbax's metadata holds the time of the save)
UNSTABLE = {
    "wall_time_s", "processes", "environment", "compile", "first_step_s",
    "backbone_checkpoint_sha256",
}  # fmt: skip


def command(scenario: str, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "train.main", f"--workdir={workdir}", *SCENARIOS[scenario]]


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATTANET_")}
    env.update(PYTHONUNBUFFERED="1", JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), **extra)
    return env


def run(cmd, env, timeout=900, kill_after=None, fault=None):
    """Runs ``cmd``; with ``kill_after`` seconds, sends ``fault`` from outside then."""
    start = time.time()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            if fault == "KILL":
                proc.send_signal(signal.SIGKILL)
            elif fault == "TERM":
                proc.send_signal(signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGINT)
                time.sleep(0.3)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.time() - start


def records(workdir: Path) -> dict:
    """Every results.json's numbers (times and processes aside) and every history.jsonl, by
    path inside the workdir."""
    found = {}
    for path in sorted(workdir.rglob("results.json")):
        found[str(path.relative_to(workdir))] = _stable(json.loads(path.read_text()))
    for path in sorted(workdir.rglob("history.jsonl")):
        found[str(path.relative_to(workdir))] = path.read_text().splitlines()
    return found


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in UNSTABLE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return "<path>"  # absolute paths name the case's own workdir
    return value


def phases(log: Path) -> list[tuple[float, str, int]]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        t, name, n = line.split()
        rows.append((float(t), name, int(n)))
    return rows


def reference(scenario: str, root: Path) -> dict:
    workdir, log = root / f"{scenario}_reference", root / f"{scenario}_reference.phases"
    rc, _, err, seconds = run(command(scenario, workdir), environment(GATTANET_PHASE_LOG=log))
    if rc != 0:
        raise SystemExit(f"the uninterrupted {scenario} run failed ({rc}):\n{err[-3000:]}")
    return {"records": records(workdir), "phases": phases(log), "seconds": seconds}


def moments(ref: dict) -> list[tuple[str, int]]:
    """Every phase at its first and last occurrence in the reference run."""
    last = {}
    for _, name, n in ref["phases"]:
        last[name] = max(last.get(name, 0), n)
    picked = []
    for name, n in last.items():
        picked += [(name, 1)] + ([(name, n)] if n > 1 else [])
    return picked


def case(scenario: str, ref: dict, root: Path, fault: str, moment=None, delay=None) -> dict:
    """One interruption and its rerun."""
    tag = f"{moment[0]}.{moment[1]}" if moment else f"t{delay:.2f}"
    workdir = root / f"{scenario}_{tag}_{fault}".replace(":", "-")
    log = workdir.parent / (workdir.name + ".phases")
    extra = {"GATTANET_PHASE_LOG": str(log)}
    if moment:
        extra["GATTANET_FAULT"] = f"{moment[0]}:{moment[1]}:{fault}"
    rc, out, err, _ = run(
        command(scenario, workdir), environment(**extra), kill_after=delay, fault=fault
    )
    hit = phases(log)
    rerun_rc, rerun_out, rerun_err, _ = run(command(scenario, workdir), environment())
    text = out + err
    last_line = next((ln for ln in reversed(text.strip().splitlines()) if ln.strip()), "")
    problems = []
    if "Traceback" in text:
        problems.append("traceback when interrupted")
    if rerun_rc != 0:
        problems.append(f"rerun exit {rerun_rc}: {rerun_err.strip().splitlines()[-1:]}")
    if "Traceback" in rerun_out + rerun_err:
        problems.append("traceback in the rerun")
    if rerun_rc == 0 and records(workdir) != ref["records"]:
        problems.append("records differ from the uninterrupted run's")
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "scenario": scenario,
        "fault": fault,
        "aimed": f"{moment[0]} #{moment[1]}" if moment else f"at {delay:.2f} s",
        "hit": f"{hit[-1][1]} #{hit[-1][2]}" if hit else "(before the first phase)",
        "phase": (moment[0] if moment else (hit[-1][1] if hit else "imports")).split(":")[0],
        "exit": rc,
        "last_line": last_line[:150],
        "ok": not problems,
        "problems": problems,
    }


def sweep(scenarios, faults, timed: int, jobs: int, root: Path, subset=None) -> list[dict]:
    cases = []
    refs = {}
    for scenario in scenarios:
        refs[scenario] = ref = reference(scenario, root)
        print(
            f"[fault_sweep] {scenario}: reference run {ref['seconds']:.0f} s, "
            f"{len(ref['phases'])} phase entries",
            flush=True,
        )
        chosen = subset.get(scenario, []) if subset is not None else moments(ref)
        for moment in chosen:
            for fault in faults:
                cases.append((scenario, fault, moment, None))
        rng = random.Random(0)
        for fault in faults:
            for _ in range(timed):
                cases.append((scenario, fault, None, rng.uniform(0.5, ref["seconds"])))
    rows = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [
            pool.submit(case, s, refs[s], root, f, moment=m, delay=d) for s, f, m, d in cases
        ]
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            row = future.result()
            rows.append(row)
            verdict = "ok" if row["ok"] else "FAILED: " + "; ".join(row["problems"])
            print(
                f"[fault_sweep] {i}/{len(cases)} {row['scenario']} {row['fault']} "
                f"{row['aimed']} (hit {row['hit']}, exit {row['exit']}): {verdict}",
                flush=True,
            )
    order = {c: i for i, c in enumerate(PHASE_ORDER)}
    rows.sort(key=lambda r: (r["scenario"], order.get(r["phase"], 99), r["aimed"], r["fault"]))
    return rows


PHASE_ORDER = (
    "imports", "config", "restore", "data", "compile", "first_step", "step", "save_mid",
    "eval", "save_best", "save_periodic", "results", "switch", "end",
)  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| scenario | phase | fault aimed at | fault | phase at the end (log) | exit | the "
        "interrupted process's last line | rerun: exit 0, same records, no traceback |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        line = r["last_line"].replace("|", "\\|") or "(nothing)"
        verdict = "yes" if r["ok"] else "**no**: " + "; ".join(r["problems"])
        lines.append(
            f"| {r['scenario']} | {r['phase']} | {r['aimed']} | {r['fault']} | {r['hit']} | "
            f"{r['exit']} | `{line}` | {verdict} |"
        )
    covered = {}
    for r in rows:
        covered.setdefault((r["scenario"], r["phase"]), []).append(r["ok"])
    lines += ["", "| scenario | phase | cases | passed |", "|---|---|---|---|"]
    for (scenario, phase), oks in covered.items():
        lines.append(f"| {scenario} | {phase} | {len(oks)} | {sum(oks)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="both,sweep")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--timed", type=int, default=0, help="random moments per fault")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table", default="", help="write the markdown table here")
    parser.add_argument(
        "--cases",
        default="",
        help="only these, e.g. 'both:save_best:written:1:KILL,sweep:eval:2:TERM'",
    )
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    faults = [f for f in args.faults.split(",") if f]
    unknown = [s for s in scenarios if s not in SCENARIOS] + [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown scenario or fault: {', '.join(unknown)}")
    start = time.time()
    subset = None
    if args.cases:
        subset, faults = {}, []
        for spec in args.cases.split(","):
            scenario, rest = spec.split(":", 1)
            phase, n, fault = rest.rsplit(":", 2)
            subset.setdefault(scenario, []).append((phase, int(n)))
            faults.append(fault)
        scenarios, faults = list(subset), sorted(set(faults))
    with tempfile.TemporaryDirectory(prefix="fault_sweep_") as tmp:
        rows = sweep(scenarios, faults, args.timed, args.jobs, Path(tmp), subset)
    text = table(rows)
    failed = [r for r in rows if not r["ok"]]
    summary = (
        f"{len(rows)} cases, {len(rows) - len(failed)} passed, {len(failed)} failed "
        f"({time.time() - start:.0f} s)"
    )
    if args.table:
        Path(args.table).write_text(text + "\n" + summary + "\n")
    print(text + "\n" + summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
