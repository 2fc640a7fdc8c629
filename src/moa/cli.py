"""The `moa` command. Each subcommand lives in the module that owns its concept and registers
itself through `register(subparsers)`; this file only dispatches and turns errors into
one-line messages (exit 2 for user mistakes, 1 for internal errors; tracebacks under --debug).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define subcommands (each has `register(subparsers)`).
COMMAND_MODULES = [
    "moa.base_cli",
    "moa.train",
    "moa.scoring",
    "moa.model_cli",
    "moa.evaluate",
    "moa.demo_data",
    "moa.demo",
    "moa.incremental",
    "moa.serve",
    "moa.export",
    "moa.judge_cli",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"moa: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moa",
        description="Mixture-of-LoRAs: one frozen base LLM, one LoRA expert per domain, learned routers.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from moa.errors import MoAError

    _quiet_libraries()
    try:
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


def _quiet_libraries() -> None:
    """Our own progress bars and messages are enough; silence the libraries' per-load noise."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file in")  # peft, alias base names
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
