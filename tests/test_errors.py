"""One error boundary for every command: each command, run with each kind of bad input, exits
non-zero with exactly one line on stderr (``error: ...``) saying what is wrong, and no
traceback."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data import write_tree

ROOT = Path(__file__).resolve().parent.parent
SETPRIV = shutil.which("setpriv")
# root reads and writes everything; without these capabilities it meets file modes as others do
NO_OVERRIDE = [SETPRIV or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _files(tmp: Path) -> dict:
    """The bad inputs the cases use, made in ``tmp``."""
    (tmp / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp / "raises.py").write_text("import ml_collections\n\nVALUE = 1 / 0\n")
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o555)
    (tmp / "unreadable.tar").write_bytes(b"x")
    (tmp / "unreadable.tar").chmod(0o000)
    (tmp / "not_an_archive.tar.gz").write_bytes(b"hello")
    (tmp / "a_file").write_text("x")
    return _names(tmp)


FILES = ("syntax.py", "raises.py", "locked", "unreadable.tar", "not_an_archive.tar.gz", "a_file")


def _names(tmp: Path) -> dict:
    return {k.split(".")[0]: str(tmp / k) for k in FILES}


MAIN = ["train.main", "--config=configs/demo.py:smoke"]
# (command, arguments, exit status, what the line says); {name} is a file of _files, {tmp} the
# test's folder. 'deny': run without the capability to override file modes.
CASES = [
    # a config file that is missing, does not compile, fails while it loads, has no such variant
    (["train.main", "--config=configs/nope.py", "--workdir={tmp}/w"], 2,
     "config file configs/nope.py: not found"),
    (["train.main", "--config={syntax}", "--workdir={tmp}/w"], 2,
     "syntax.py, line 1: invalid syntax"),
    (["train.main", "--config={raises}", "--workdir={tmp}/w"], 2,
     "raises.py, line 3: ZeroDivisionError: division by zero"),
    (["train.main", "--config", "configs/demo.py:smok", "--workdir={tmp}/w"], 2,
     "unknown variant 'smok' of config file configs/demo.py; known: smoke"),
    (["train.protocol", "--config=configs/toy_cifar10.py:smok", "--workdir={tmp}/w"], 2,
     "unknown variant 'smok' of config file configs/toy_cifar10.py; known: smoke"),
    (["train.summary", "--config={syntax}"], 2, "syntax.py, line 1: invalid syntax"),
    (["train.summary", "--config=configs/nope.py"], 2, "config file configs/nope.py: not found"),
    # a misspelled field, in either flag form; a misspelled flag
    ([*MAIN, "--workdir={tmp}/w", "--config.attention.dd=16"], 2,
     "unknown config field 'attention.dd'; did you mean 'attention.d'?"),
    ([*MAIN, "--workdir={tmp}/w", "--config.attention.dd", "16"], 2,
     "unknown config field 'attention.dd'; did you mean 'attention.d'?"),
    (["train.protocol", "--config=configs/toy_cifar10.py", "--workdir={tmp}/w",
      "--config.seeed", "2"], 2, "unknown config field 'seeed'; did you mean 'seed'?"),
    (["train.summary", "--config=configs/toy_cifar10.py", "--config.attention.dd=16"], 2,
     "did you mean 'attention.d'?"),
    (["train.compare", "--workdr={tmp}/w", "--backbones=x"], 2,
     "Unknown command line flag 'workdr'. Did you mean: workdir ?"),
    (["train.analyze", "noise", "--workdri={tmp}"], 2, "Unknown command line flag 'workdri'"),
    (["train.prepare_data", "--sourc=x"], 2, "Unknown command line flag 'sourc'"),
    (["benchmarks.epoch", "--data_dri=x"], 2, "Unknown command line flag 'data_dri'"),
    # an option the stage does not read; unknown names of systems, arguments, analyses
    ([*MAIN, "--workdir={tmp}/w", "--config.stage=backbone", "--config.backbone_checkpoint=/x"],
     1, "config.backbone_checkpoint is not used by stage='backbone'"),
    (["train.compare", "--workdir={tmp}/w", "--backbones={tmp}", "--systems=sa"], 1,
     "unknown system 'sa'"),
    (["train.compare", "--workdir={tmp}/w", "--backbones={tmp}", "--arg=smok"], 1,
     "--arg: unknown config argument 'smok'; known: smoke, scratch"),
    (["train.analyze", "nois", "--workdir={tmp}"], 2, "unknown analysis 'nois'"),
    # paths: not found
    (["train.compare", "--workdir={tmp}/w", "--backbones={tmp}/missing"], 1,
     "backbone checkpoint '{tmp}/missing' not found"),
    (["train.analyze", "noise", "--workdir={tmp}/missing"], 1,
     "{tmp}/missing is not a training workdir (no config.json)"),
    (["train.prepare_data", "--source={tmp}/missing"], 1,
     "data source {tmp}/missing does not exist"),
    ([*MAIN, "--workdir={tmp}/w", "--config.dataset.name=local_cifar10",
      "--config.dataset.data_dir={tmp}/missing"], 1,
     "is not prepared in {tmp}/missing (not found)"),
    (["benchmarks.epoch", "--data_dir={tmp}/missing"], 1,
     "is not prepared in {tmp}/missing (not found)"),
    # paths: not a directory, not what they claim
    ([*MAIN, "--workdir={a_file}/w"], 1, "a_file/w/backbone is not writable: Not a directory"),
    (["benchmarks.suite", "--quick", "--out={a_file}/x"], 1,
     "a_file/x: a part of the path is not a directory"),
    (["train.prepare_data", "--source={not_an_archive}", "--data_dir={tmp}/d"], 1,
     "is not a readable tar archive"),
    # paths: permission denied
    ("deny", [*MAIN, "--workdir={locked}/w"], 1,
     "locked/w/backbone is not writable: Permission denied"),
    ("deny", ["train.prepare_data", "--source={unreadable}", "--data_dir={tmp}/d"], 1,
     "unreadable.tar: permission denied"),
    ("deny", ["train.compare", "--workdir={locked}/w", "--backbones={tmp}", "--systems=se"], 1,
     "permission denied"),
]  # fmt: skip


def _run(args, tmp, deny=False, prefix=()):
    names = _names(tmp) if (tmp / "syntax.py").exists() else _files(tmp)
    filled = [a.format(tmp=tmp, **names) for a in args]
    command = [*prefix, *(NO_OVERRIDE if deny else []), sys.executable, "-m", *filled]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def _ids():
    out = []
    for case in CASES:
        args = case[1] if case[0] == "deny" else case[0]
        out.append(f"{args[0]}-{len(out)}")
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_each_bad_input_is_one_line(tmp_path, case):
    deny = case[0] == "deny"
    args, status, says = case[1:] if deny else case
    if deny and (SETPRIV is None or _run(["train.signals"], tmp_path, deny=True).returncode):
        pytest.skip("cannot drop the capability to override file modes here")
    r = _run(args, tmp_path, deny=deny)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == status, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert says.format(tmp=tmp_path) in lines[0], lines[0]
    assert "Traceback" not in r.stdout


def test_no_space_left_is_said_as_such(tmp_path):
    """A data directory and a workdir on a full filesystem (a small tmpfs in a private mount
    namespace, filled): one line that says there is no space."""
    full = tmp_path / "full"
    full.mkdir()
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {full} || exit 77; "
        f'dd if=/dev/zero of={full}/fill bs=1k count=1000 2>/dev/null; exec "$@"'
    )
    prefix = ["unshare", "-m", "sh", "-c", script, "sh"]
    tree = write_tree(tmp_path / "tree", per_class=1)
    for args, says in [
        (["train.prepare_data", f"--source={tree}", f"--data_dir={full}/d"], "no space"),
        ([*MAIN, f"--workdir={full}/w"], "No space left on device"),
    ]:
        r = _run(args, tmp_path, prefix=prefix)
        if r.returncode == 77 or "unshare failed" in r.stderr:
            pytest.skip(f"cannot mount a small filesystem here: {r.stderr.strip()[:200]}")
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith("error: ") and says in lines[0], lines[0]
