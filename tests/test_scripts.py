"""The diagnostic scripts under scripts/ agree with the package's own scoring."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import synthetic_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_gap_per_token_nll_sums_to_moa_score(tiny_base, tmp_path):
    from moa.base import load_base
    from moa.data import IGNORE_INDEX, encode_records, read_records
    from moa.scoring import causal_lm_forward, score_examples

    token_gap = load_script("token_gap")
    model, tok = load_base(tiny_base)
    records, _ = read_records(write_jsonl(tmp_path / "d.jsonl", synthetic_records(3)))
    examples, _ = encode_records(tok, records)
    fwd = causal_lm_forward(model)
    per_token = token_gap.token_nll(fwd, examples, tok.pad_token_id, batch_size=4)
    rows = score_examples(fwd, examples, tok.pad_token_id, batch_size=3, progress=False)
    assert [len(t) for t in per_token] == [r["tokens"] for r in rows]
    assert [sum(n for _, n in t) for t in per_token] == pytest.approx([-r["logprob"] for r in rows], abs=1e-4)
    # the token ids are the response tokens, in order
    for t, e in zip(per_token, examples):
        assert [i for i, _ in t] == [y for y in e.labels if y != IGNORE_INDEX]
