"""Faults at the moments that lost runs before, each a case of the fault sweep
(``python -m tests.fault_sweep``, whose whole table is in docs/RELIABILITY.md): the interrupted
process prints no traceback, and the rerun of the same command exits 0 with the records of an
uninterrupted run."""

import pytest

from tests import fault_sweep

# (phase, occurrence, fault): a preemption during compilation, before any step (the workdir
# used to be left unresumable); a kill after a periodic checkpoint was complete but before the
# pruning of the one before (the epoch's record used to be written after it, and was lost); a
# kill just before the last epoch's checkpoint, its record written (the rerun drops it and
# replays the epoch); a kill after a within-epoch checkpoint was renamed into place but before
# its digest (the rerun took an older one for it and failed); two Ctrl-C during an evaluation
# (the second one used to raise inside whatever ran then).
CASES = [
    ("compile", 1, "TERM"),
    ("save_periodic:digest", 1, "KILL"),
    ("save_periodic", 2, "KILL"),
    ("save_mid:written", 2, "KILL"),
    ("eval", 2, "INT2"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, fault_sweep.reference("backbone", root)


@pytest.mark.parametrize("phase, n, fault", CASES, ids=[f"{p}-{f}" for p, _, f in CASES])
def test_a_fault_at_this_moment_loses_nothing(reference, phase, n, fault):
    root, ref = reference
    assert any(name == phase and k == n for _, name, k in ref["phases"]), "moment not reached"
    row = fault_sweep.case("backbone", ref, root, fault, moment=(phase, n))
    if fault != "INT2":  # (the second SIGINT comes 0.3 s later, wherever the run is then)
        assert row["hit"].startswith(f"{phase} #{n}"), row
    assert row["ok"], row["problems"]
    if fault != "KILL":
        assert row["exit"] in (130, 143) and "Traceback" not in row["last_line"], row
