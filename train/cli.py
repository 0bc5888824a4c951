"""Flag parsing shared by the command-line tools: config mistakes become one clear line."""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import sys

from absl import flags


def _config_keys(config, prefix="") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if hasattr(v, "items"):
            keys += _config_keys(v, prefix + k + ".")
    return keys


def _load_config(argv: list[str]):
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
        spec = argv[argv.index("--config") + 1]
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_user_config", path)
    if module_spec is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_field_message(argv: list[str]) -> str | None:
    """'unknown config field X; did you mean Y?' for the first override naming no field."""
    try:
        config = _load_config(argv)
    except Exception:
        return None
    if config is None:
        return None
    known = _config_keys(config)
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            name = a[len("--config.") : a.index("=")]
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                return f"unknown config field {name!r}{hint}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag or config override exits with one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:
        message = unknown_field_message(argv) or f"bad config override: {e}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors():
    """A tool's UserError as one line on stderr (``error: ...``) and exit status 1."""
    from train.errors import UserError

    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run_tool(main, define_flags) -> None:
    """Runs a tool's ``main(argv, defined)`` with its flags (defined here, when run as a
    program) and the config-aware flag parser."""
    from absl import app

    app.run(functools.partial(main, defined=define_flags()), flags_parser=parse_flags)
