"""The `moa` command: thin subcommands over the library (argparse lives only in this package).

Each module here registers its subcommands through `register(subparsers)` and turns parsed
arguments into one library call. This file dispatches, applies `--config FILE.yaml` (values
from the file, flags on the command line override them) and turns errors into one-line
messages: exit 2 for user mistakes, 1 for internal errors (tracebacks under --debug).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define subcommands (each has `register(subparsers)`), in `moa --help` order.
COMMAND_MODULES = [
    "moa.cli.base",
    "moa.cli.train",
    "moa.cli.model",
    "moa.cli.score",
    "moa.cli.eval",
    "moa.cli.judge",
    "moa.cli.experts",
    "moa.cli.serve",
    "moa.cli.gateway",
    "moa.cli.export",
    "moa.cli.demo",
]


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or "default" in text.lower() or action.required
                or not action.option_strings or action.nargs == 0):
            return text  # flags (store_true/false) are off unless given; positionals have none
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {'none' if default is None else default})".lstrip()


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"moa: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moa",
        description="Mixture-of-LoRAs: one frozen base LLM, one LoRA expert per domain, learned routers.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    from moa.errors import MoAError

    try:
        args = _parse(parser, argv)
    except MoAError as e:
        print(f"moa: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    _quiet_libraries()
    try:
        with _placement(args):
            rc = args.func(args)
        return int(rc or 0)
    except MoAError as e:
        print(f"moa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moa: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: short message, traceback only under --debug
        if debug:
            raise
        print(f"moa: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; with `--config FILE.yaml` the file's values become the defaults and the flags
    given override them. Options required on the command line may come from the file instead, so
    the first pass (which only finds the command and the file) requires nothing."""
    if not any(_is_config_flag(a) for a in argv):
        return parser.parse_args(argv)
    relaxed = [x for p in _all_parsers(parser) for x in (*p._actions, *p._mutually_exclusive_groups) if x.required]
    for x in relaxed:
        x.required = False
    try:
        args = parser.parse_args(argv)
    finally:
        for x in relaxed:
            x.required = True
    if getattr(args, "config", None):
        from moa.cli.options import apply_config

        apply_config(args._parser, args.config)  # the file's values become the defaults
    return parser.parse_args(argv)  # so the flags given override them


def _is_config_flag(arg: str) -> bool:
    flag = arg.split("=", 1)[0]
    return len(flag) > 3 and "--config".startswith(flag)  # argparse accepts unambiguous prefixes


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                yield from _all_parsers(p)


def _placement(args):
    """The command's --device / --dtype (moa.cli.options.add_device_args) for every model it loads."""
    import contextlib

    if not hasattr(args, "device"):
        return contextlib.nullcontext()
    from moa.device import placement

    dtype = getattr(args, "base_dtype", "auto")
    if dtype == "auto" and getattr(args, "bf16", None) is not None:
        # A training's --bf16 / --no-bf16 is its precision: the base weights agree with it.
        dtype = "bfloat16" if args.bf16 else "float32"
    return placement(args.device, dtype)


def _quiet_libraries() -> None:
    """Our own progress bars and messages are enough; silence the libraries' per-load noise."""
    import os
    import warnings

    # Set by the command for its own process (never by `import moa`); the user's values win.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file in")  # peft, alias base names
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
