"""Every shipped YAML config parses for the command its first line names (torchtune's habit)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from moa.cli import build_parser
from moa.cli.options import apply_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _command_parser(parser, words):
    """The subparser of `moa WORDS...` (e.g. ['baseline', 'mixed-lora'])."""
    import argparse

    p = parser
    for w in words:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        if w not in sub.choices:
            return p
        p = sub.choices[w]
    return p


def test_there_are_shipped_configs():
    assert {c.name for c in CONFIGS} >= {"train-expert.yaml", "train.yaml", "baseline-mixed-lora.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_for_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# moa "), f"{path.name}: the first line must be the command that uses it"
    argv = shlex.split(first[2:])[1:]  # without the leading 'moa'
    assert "--config" in argv
    parser = build_parser()
    words = [w for w in argv[: argv.index("--config")]]
    apply_config(_command_parser(parser, words), path)  # unknown keys or bad values raise here
    args = parser.parse_args(argv)
    for key, value in _yaml(path).items():
        got = getattr(args, key.replace("-", "_"))
        assert got == value or str(got) == str(value), (key, got, value)


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())
