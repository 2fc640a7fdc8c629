"""moa.data: parsing/validation, response-only labels, padding, samplers."""

from __future__ import annotations

import json

import pytest
import torch

from moa.data import (
    IGNORE_INDEX, DomainBalancedSampler, ShuffledSampler, collate, encode_record, parse_record, read_records,
    select_domains,
)
from moa.errors import DataError
from moa.testing import make_tokenizer
from conftest import write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def labelled_text(tok, ex):
    return tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX])


def test_labels_cover_exactly_the_assistant_turn(tok):
    r = parse_record({"domain": "d", "prompt": "What is 2+2?", "response": "4, of course."}, "f:1")
    ex = encode_record(tok, r)
    assert labelled_text(tok, ex) == "4, of course.<|im_end|>"
    # Exact positions: labels equal input ids on the response, -100 before it.
    first = next(i for i, l in enumerate(ex.labels) if l != IGNORE_INDEX)
    assert first == ex.prompt_len
    assert all(l == IGNORE_INDEX for l in ex.labels[:first])
    n = sum(l != IGNORE_INDEX for l in ex.labels)
    assert ex.labels[first : first + n] == ex.input_ids[first : first + n]  # one contiguous run
    assert tok.decode(ex.input_ids[: ex.prompt_len]).endswith("<|im_start|>assistant\n")


def test_multi_turn_labels_every_assistant_turn_and_prompt_is_before_last(tok):
    r = parse_record({"domain": "d", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]}, "f:1")
    ex = encode_record(tok, r)
    assert labelled_text(tok, ex) == "a1<|im_end|>a2<|im_end|>"
    assert tok.decode(ex.input_ids[: ex.prompt_len]).endswith("q2<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_keeps_response_tokens(tok):
    r = parse_record({"domain": "d", "prompt": "x " * 200, "response": "the answer"}, "f:1")
    ex = encode_record(tok, r, max_length=64)
    assert len(ex.input_ids) == 64 and ex.truncated
    assert any(l != IGNORE_INDEX for l in ex.labels)
    assert 0 < ex.prompt_len < 64


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_padding_sides(tok, side):
    a = encode_record(tok, parse_record({"domain": "a", "prompt": "short", "response": "ok"}, "f:1"))
    b = encode_record(tok, parse_record({"domain": "b", "prompt": "a much longer prompt here", "response": "fine"}, "f:2"))
    batch = collate([a, b], tok.pad_token_id, ["a", "b"], padding_side=side)
    T = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, T)
    assert batch["domain_ids"].tolist() == [0, 1]
    for row, ex in zip(range(2), (a, b)):
        m = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][m].tolist() == ex.input_ids
        assert batch["labels"][row][m].tolist() == ex.labels
        assert (batch["labels"][row][~m] == IGNORE_INDEX).all()
        assert int(batch["prompt_mask"][row].sum()) == ex.prompt_len
        assert not (batch["prompt_mask"][row] & ~m).any()
    if side == "left":
        assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}), "missing field 'domain'"),
    (json.dumps({"domain": 3, "prompt": "q", "response": "a"}), "'domain' must be a non-empty string"),
    (json.dumps({"domain": "d"}), "missing field 'messages'"),
    (json.dumps({"domain": "d", "messages": "hi"}), "'messages' must be a non-empty list"),
    (json.dumps({"domain": "d", "messages": [{"role": "user", "content": "q"}]}), "no assistant turn"),
    (json.dumps({"domain": "d", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}), "empty assistant content"),
    (json.dumps({"domain": "d", "prompt": "q", "response": ""}), "empty assistant content"),
    (json.dumps({"domain": "d", "prompt": "q", "response": 5}), "'response' must be a string"),
    (json.dumps({"domain": "d", "messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}), "is not one of"),
    (json.dumps({"domain": "d", "messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}), "missing string field 'content'"),
]


@pytest.mark.parametrize("line,msg", BAD_LINES)
def test_bad_line_names_file_line_and_problem(tmp_path, line, msg):
    good = json.dumps({"domain": "d", "prompt": "q", "response": "a"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert f"{path}:2:" in str(e.value) and msg in str(e.value)
    records, skipped = read_records(path, skip_invalid=True)
    assert len(records) == 2 and skipped == 1


def test_invalid_utf8_and_empty_file(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"domain": "d", "prompt": "\xff\xfe", "response": "a"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:1: invalid UTF-8"):
        read_records(p)
    e = tmp_path / "empty.jsonl"
    e.write_text("\n\n")
    with pytest.raises(DataError, match="empty file"):
        read_records(e)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_unknown_domain_lists_present_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"domain": "a", "prompt": "q", "response": "r"}])
    records, _ = read_records(path)
    with pytest.raises(DataError, match=r"no record of domain 'zzz' \(domains present: a\)"):
        select_domains(records, ["zzz"], path)


def test_domain_balanced_sampler_is_balanced_deterministic_and_shards():
    domain_of = [0] * 50 + [1] * 5 + [2] * 10
    s = DomainBalancedSampler(domain_of, batch_size=6, seed=3)
    counts = torch.zeros(3)
    for step in range(20):
        batch = s.batch(step)
        assert len(batch) == 6
        for i in batch:
            counts[domain_of[i]] += 1
        # ranks take disjoint slices whose union is the global batch
        parts = [s.batch(step, r, 3) for r in range(3)]
        assert sorted(sum(parts, [])) == sorted(batch)
    assert counts.tolist() == [40.0, 40.0, 40.0]
    s2 = DomainBalancedSampler(domain_of, batch_size=6, seed=3)
    assert [s2.batch(k) for k in (7, 0, 19)] == [s.batch(k) for k in (7, 0, 19)]


def test_shuffled_sampler_covers_each_epoch():
    s = ShuffledSampler(10, batch_size=5, seed=1)
    seen = s.batch(0) + s.batch(1)
    assert sorted(seen) == list(range(10))
    assert s.batch(2) != s.batch(0) or s.batch(3) != s.batch(1)
