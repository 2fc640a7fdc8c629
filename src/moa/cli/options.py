"""Options shared by several commands: device and dtype, the training options and `--config FILE.yaml`."""

from __future__ import annotations

import argparse
from pathlib import Path

from moa.errors import MoAError
from moa.trainer import REPORT_TO, TrainConfig


def add_device_args(p, *, dtype: bool = True) -> None:
    """--device and --dtype of every command that loads a model; `moa.cli.main` runs the command
    inside `moa.device.placement(args.device, args.base_dtype)`. dtype=False: the command has a
    --dtype of its own (export: the written weights) and gets --device only."""
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where the model runs: auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")
    if dtype:
        g.add_argument("--dtype", dest="base_dtype", default="auto", choices=["auto", "float32", "bfloat16",
                                                                              "float16"],
                       help="dtype of the frozen base weights; auto = bfloat16 where the device computes it "
                            "natively (CUDA with bf16, a CPU with AVX-512 bf16 or AMX), else float32 "
                            "($MOA_BF16=1/0 forces bfloat16/float32; in training commands --bf16/--no-bf16 "
                            "decide). Experts, routers and optimizer state stay float32")


def add_fallback_arg(p) -> None:
    """--fallback of every command that routes (moa.fallback.set_fallback applies it)."""
    from moa.fallback import parse_fallback

    p.add_argument("--fallback", type=parse_fallback, default="auto", metavar="off|auto|P",
                   help="out-of-domain fallback under vote/last routing: a prompt far from every domain goes to the "
                        "base model with no expert (domain null). auto: the checkpoint's calibrated threshold (off "
                        "if it has none; see `moa calibrate`); off: never; P, a number in (0, 1]: the threshold that "
                        "keeps the fraction P of the calibration's in-domain validation prompts (lower P: more "
                        "fallbacks). A forced domain never falls back (default: auto)")


def check_server_args(args, counts: tuple[str, ...]) -> None:
    """`moa serve` / `moa gateway`: the count options in `counts` are >= 1 and --port is a port."""
    from moa.errors import MoAError

    for name in counts:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MoAError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise MoAError(f"--port must be in 0..65535, got {args.port}")


def warn_if_open(prog: str, args) -> None:
    """A server bound beyond this machine with no --api-key answers anyone: say so."""
    import sys

    from moa.serve import _LOOPBACK

    if args.host not in _LOOPBACK and not args.api_key:
        print(f"{prog}: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)


def add_train_args(p, *, lr: float = 2e-4, batch_size: int = 8, steps_help: str = "optimizer steps",
                   default_steps: int | None = None) -> None:
    """The options every training command shares, --device / --dtype, and `--config`."""
    add_config_arg(p)
    add_device_args(p)
    g = p.add_argument_group("training")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=default_steps,
                       help=steps_help + ("" if default_steps is not None else " (default: 1 epoch)"))
    steps.add_argument("--epochs", type=float, default=None, help="passes over the data (instead of --max-steps)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="global batch size in records")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each process")
    g.add_argument("--length-split", type=int, default=None, metavar="N",
                   help="run each micro-batch, sorted by length, as at most N passes padded to their own longest "
                        "row, cut where that saves tokens; same gradient (default: 8 on a CPU, 1 elsewhere)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--max-length", type=int, default=512, help="truncate records to this many tokens")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and dropout")
    g.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                   help="bf16 autocast (default: $MOA_BF16 = auto|1|0, auto = on where the CPU/GPU computes "
                        "bf16 natively)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps under OUT/checkpoints "
                   "(0: only at the end and on Ctrl-C)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    g.add_argument("--overwrite", action="store_true", help="replace an OUT that holds a different run")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (large bases)")
    g.add_argument("--skip-invalid", action="store_true", help="skip bad JSONL lines instead of stopping")
    add_validation_args(p)


def config_from_args(args, **overrides) -> TrainConfig:
    values = dict(
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        length_split=args.length_split,
        lr=args.lr, max_length=args.max_length, seed=args.seed, bf16=args.bf16, save_every=args.save_every,
        gradient_checkpointing=args.gradient_checkpointing, **validation_from_args(args),
    )
    values.update(overrides)
    return TrainConfig(**values)


def add_validation_args(p) -> None:
    """Validation while training and experiment tracking (every training command has them)."""
    g = p.add_argument_group("validation and tracking")
    g.add_argument("--eval-data", default=None, metavar="FILE",
                   help="validation JSONL: mean NLL per label token logged as val_loss in train_log.jsonl "
                        "(and val_router_acc in stage 2)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="validate every N steps (default 0: only after the last step)")
    g.add_argument("--keep-best", action="store_true",
                   help="write the weights of the validation with the lowest val_loss instead of the last step's "
                        "(the step is recorded in OUT/val_best.json)")
    g.add_argument("--early-stopping-patience", type=int, default=0, metavar="K",
                   help="stop after K validations without a lower val_loss (default 0: never)")
    g.add_argument("--report-to", choices=list(REPORT_TO), default="none",
                   help="log scalars (losses, lr, router accuracy, tokens/s, validation) to TensorBoard "
                        "under OUT/tensorboard")


def validation_from_args(args) -> dict:
    """The TrainConfig fields of add_validation_args."""
    return {"eval_data": args.eval_data, "eval_every": args.eval_every, "keep_best": args.keep_best,
            "early_stopping_patience": args.early_stopping_patience, "report_to": args.report_to}


# --------------------------------------------------------------------------- --config


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="read option values from a YAML mapping (keys: option names, e.g. max_steps or "
                        "max-steps); options given on the command line override the file (default: none)")
    p.set_defaults(_parser=p)


def apply_config(parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Make the YAML file's values the parser's defaults, checked and converted like flags.

    Unknown keys, wrong types and values outside an option's choices are MoAErrors naming the key.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MoAError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise MoAError(f"--config {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise MoAError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    actions = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in ("help", "config"):
            continue
        actions.setdefault(a.dest, a)
        for s in a.option_strings:
            actions.setdefault(s.lstrip("-").replace("-", "_"), a)
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        action = actions.get(name)
        if action is None:
            known = sorted({a.option_strings[0].lstrip("-") for a in actions.values()})
            raise MoAError(f"--config {path}: unknown key '{key}' (this command's options: {', '.join(known)})")
        if name != action.dest and action.nargs == 0:  # e.g. no_bf16: true is bf16: false
            if not _flag(path, key, value):
                continue  # no_bf16: false asks for nothing
            value = action.const
        values[action.dest] = _convert(path, key, action, value)
        action.required = False  # given by the file
    for group in parser._mutually_exclusive_groups:  # e.g. add-expert's --adapter | --train-data
        if group.required and any(a.dest in values for a in group._group_actions):
            group.required = False
    parser.set_defaults(**values)


def _flag(path, key, value) -> bool:
    if not isinstance(value, bool):
        raise MoAError(f"--config {path}: '{key}' is a flag: use true or false, got {value!r}")
    return value


def _convert(path, key, action: argparse.Action, value):
    if action.nargs == 0:  # store_true / store_false
        if value is None:
            return None
        return _flag(path, key, value)
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_one(path, key, action, v) for v in items]
    return None if value is None else _one(path, key, action, value)


def _one(path, key, action: argparse.Action, value):
    if isinstance(value, (dict, list)):
        raise MoAError(f"--config {path}: '{key}' takes one value, got {value!r}")
    kind = action.type
    if kind is not None:
        try:
            # YAML reads 1e-3 as a string and 8 as an int: convert as the flag would.
            value = kind(value) if not isinstance(value, bool) else kind(str(value))
        except (TypeError, ValueError):
            raise MoAError(f"--config {path}: '{key}' must be {getattr(kind, '__name__', kind)}, "
                           f"got {value!r}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise MoAError(f"--config {path}: '{key}' must be one of {', '.join(map(str, action.choices))}, "
                       f"got {value!r}")
    return value
