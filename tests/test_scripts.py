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


def test_recipe_datasets_are_fixed_disjoint_and_right():
    """scripts/recipe_data.py: the same files on every run, no prompt in two splits, the sizes it
    promises, and computed answers that are right (checked here by another route)."""
    import re

    recipe = load_script("recipe_data")
    for name in recipe.DATASETS:
        splits = recipe.build(name)
        assert splits == recipe.build(name)
        prompts = [[r["messages"][0]["content"] for r in rows] for rows in splits.values()]
        assert sum(map(len, prompts)) == len(set().union(*map(set, prompts)))
        n_valid, n_test = recipe.SPLIT_SIZES.get(name, (recipe.VALID, recipe.TEST))
        for domain, (_, n_train) in recipe.DATASETS[name].items():
            sizes = [sum(r["domain"] == domain for r in splits[s]) for s in ("train", "valid", "test")]
            assert sizes == [n_train, n_valid, n_test], (name, domain)
    answers = {}
    for r in recipe.build("confirm2")["test"]:
        answers.setdefault(r["domain"], []).append((r["messages"][0]["content"], r["messages"][1]["content"]))
    for q, a in answers["letters"]:
        c, w = re.fullmatch(r"How many times does the letter '(.)' appear in '(\w+)'\?", q).groups()
        assert int(a) == sum(ch == c for ch in w) >= 1
    for q, a in answers["capitals"] + answers["hyphens"]:
        ws = q.split(": ")[1].split()
        assert a in (" ".join(w.upper() for w in ws), "-".join(ws))
    past = {"walks": "walked", "carries": "carried", "fixes": "fixed", "washes": "washed", "carry": "carried",
            "finishes": "finished", "play": "played", "plays": "played", "watches": "watched"}
    checked = 0
    for q, a in answers["tense"]:
        sentence = q.split(": ")[1]
        for now, then in past.items():
            if f" {now} the " in sentence:
                assert a == sentence.replace(f" {now} the ", f" {then} the "), (q, a)
                checked += 1
    assert checked >= 5
