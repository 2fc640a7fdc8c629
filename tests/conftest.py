"""Shared fixtures: tiny random base models (no downloads) and small multi-domain data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    # Trainings that leave bf16 unset follow $MOA_BF16 (auto|1|0); `make test` passes under each.
    from moa.trainer import BF16_ENV, resolve_bf16

    policy = os.environ.get(BF16_ENV, "auto")
    return f"moa: {BF16_ENV}={policy} (trainings without --bf16/--no-bf16 use bf16: {resolve_bf16(None)})"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a ChatML byte-level tokenizer, saved as a local checkpoint."""
    from moa.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny_base") / "base")


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def synthetic_records(n_per_domain: int = 8, seed: int = 0) -> list[dict]:
    """Three easily separable toy domains with distinct prompt and answer shapes."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n_per_domain):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({"domain": "math", "prompt": f"Add {a} and {b}.", "response": str(a + b)})
        w = rng.choice(["apple", "river", "stone", "cloud", "tiger", "maple"])
        rows.append({"domain": "echo", "prompt": f"REPEAT: {w} {w}", "response": f"{w} {w} {w}"})
        k = rng.randint(0, 9)
        rows.append({"domain": "json", "messages": [
            {"role": "user", "content": f"json key=k{k}"},
            {"role": "assistant", "content": json.dumps({"key": f"k{k}", "n": k})}]})
    return rows


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", synthetic_records())
