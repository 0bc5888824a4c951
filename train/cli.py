"""One error boundary for every command (``train.main``, ``train.compare``, ``train.protocol``,
``train.analyze``, ``train.summary``, ``train.prepare_data`` and the benchmarks): whatever the
user got wrong is one line on stderr, never a traceback.

- Flags: an unknown flag, a value of the wrong type, a missing required flag (absl's message),
  a misspelled config field in either form (``--config.attention.dd=16`` or
  ``--config.attention.dd 16``: the nearest field suggested): exit 2.
- The config file (``--config path[:variant]``): not found or unreadable, a syntax error (file
  and line), an exception while it loads (file and line), an unknown variant (the known ones
  listed): exit 2, before anything else runs.
- While the command runs: a ``UserError`` (its message), a failed read or write (the path and
  'not found', 'permission denied', 'no space left on the device', ...; for training, that the
  last complete checkpoint is kept), a usage mistake: exit 1.
- SIGTERM and Ctrl-C: ``train.signals``.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import importlib.util
import os
import sys
import traceback

from train import files, signals


def fail(message: str, code: int = 1):
    """``error: <message>`` on stderr (its first line only) and exit ``code``."""
    line = " ".join(str(message).split("\n")[0].split()) or "failed"
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


# --- the config file -------------------------------------------------------------------------


def config_spec(argv: list[str], name: str = "config") -> str | None:
    """The value of ``--<name>`` in either form, if given (the last one, as absl takes)."""
    found = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            found = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


class ConfigFileError(Exception):
    """A config file that cannot be loaded, stated in one line."""


def load_config_file(spec: str):
    """The ConfigDict of ``path[:variant]``, or ConfigFileError naming what is wrong (where in
    the file, for a syntax error or an exception while it loads; the known variants, for an
    unknown one)."""
    path, _, arg = spec.partition(":")
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        raise ConfigFileError(f"config file {path}: {files.reason(e)}") from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ConfigFileError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    module_spec = importlib.util.spec_from_file_location("_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        exec(code, module.__dict__)
    except Exception as e:
        raise ConfigFileError(f"config file {path}{_line_in(path, e)}: {_said(e)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigFileError(f"config file {path} defines no get_config()")
    try:
        return get_config(arg) if arg else get_config()
    except Exception as e:
        known = tuple(getattr(module, "VARIANTS", ()) or getattr(module, "ARGS", ()))
        if arg and (known or isinstance(e, ValueError | KeyError)):
            listed = f"; known: {', '.join(known)}" if known else f" ({_said(e)})"
            message = f"unknown variant {arg!r} of config file {path}{listed}"
            raise ConfigFileError(message) from None
        raise ConfigFileError(
            f"config file {path}: get_config({arg!r}) failed{_line_in(path, e)}: {_said(e)}"
        ) from None


def _line_in(path: str, e: BaseException) -> str:
    """', line N' of the deepest frame of ``e``'s traceback in the file ``path``."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if _same(f.filename, path)]
    return f", line {frames[-1].lineno}" if frames else ""


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _said(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _config_keys(config, prefix="") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys += _config_keys(v, prefix + k + ".")
    return keys


def override_names(argv: list[str], name: str = "config") -> list[str]:
    """The fields named by ``--<name>.<field>=<value>`` and ``--<name>.<field> <value>``."""
    found = []
    for a in argv:
        if a.startswith(f"--{name}."):
            found.append(a[len(name) + 3 :].split("=", 1)[0])
    return found


def unknown_field_message(argv: list[str], name: str = "config") -> str | None:
    """'unknown config field X; did you mean Y?' for the first override naming no field."""
    spec = config_spec(argv, name)
    if spec is None:
        return None
    try:
        config = load_config_file(spec)
    except ConfigFileError:
        return None
    known = _config_keys(config)
    for field in override_names(argv, name):
        if field not in known:
            close = difflib.get_close_matches(field, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"unknown config field {field!r}{hint}"
    return None


def overridden_fields(config, argv: list[str], name: str = "config") -> set[str]:
    """The fields the command line changed: those of the final ``config`` that differ from the
    config file's own values (``--<name>.<field>`` in either form)."""
    from train import pin

    spec = config_spec(argv, name)
    if spec is None:
        return set()
    base = pin.flat(load_config_file(spec).to_dict())
    final = pin.flat(config.to_dict())
    return {f for f in final if f not in base or base[f] != final[f]}


# --- flags -----------------------------------------------------------------------------------


def parse_flags(argv: list[str], config_flag: str | None = "config") -> list[str]:
    """absl's parser behind the checks above: a bad flag, config file or override exits with
    one line (status 2), no traceback."""
    from absl import flags

    if config_flag:
        spec = config_spec(argv, config_flag)
        if spec is not None:
            try:
                load_config_file(spec)
            except ConfigFileError as e:
                fail(str(e), 2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = unknown_field_message(argv) if config_flag else None
        fail(message or str(e), 2)
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        message = unknown_field_message(argv) if config_flag else None
        fail(message or f"bad config override: {_said(e)}", 2)


# --- while the command runs ------------------------------------------------------------------


@contextlib.contextmanager
def boundary(training: bool = False):
    """A command's body: a user's mistake, a failed read or write, or a usage error is one line
    on stderr and exit status 1 (2 for usage). ``training``: a failed write says that the last
    complete checkpoint is kept."""
    from absl import app

    from train.errors import UserError

    try:
        yield
    except UserError as e:
        fail(str(e))
    except app.UsageError as e:
        fail(str(e), 2)
    except OSError as e:
        fail(_os_error(e, training))
    except KeyboardInterrupt:  # where no handler was installed (train.signals)
        fail("interrupted", 130)


def _os_error(e: OSError, training: bool) -> str:
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    reason = files.reason(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or reason == files.REASONS[errno.ENOSPC]:
        then = "; the last complete checkpoint is kept: free space" if training else ": free space"
        return f"could not write {where or 'a file'}: {reason}{then} and rerun the same command"
    return f"{where}: {reason}" if where else reason


def run(main, define_flags=None, tool: str = "train", config_flag: str | None = None) -> None:
    """A command: signals (``train.signals``), the flags (``parse_flags``), then ``main(argv)``
    (or ``main(argv, defined)`` with the flags ``define_flags()`` returns) inside ``boundary``."""
    from absl import app

    if not signals.S.installed:
        signals.install(tool)
    defined = define_flags() if define_flags is not None else None

    def bounded(argv):
        from absl import flags, logging

        if not flags.FLAGS["verbosity"].present:  # libraries' info and warnings: not the user's
            logging.set_verbosity(logging.ERROR)
        with boundary(training=tool == "train"):
            return main(argv) if defined is None else main(argv, defined)

    parser = functools.partial(parse_flags, config_flag=config_flag)
    app.run(bounded, flags_parser=parser)


def run_tool(main, define_flags) -> None:
    """A ``train`` tool's ``main(argv, defined)`` with its flags (defined here, when run as a
    program): ``run`` with the config-aware parser."""
    run(main, define_flags, config_flag="config")
