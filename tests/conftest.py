"""Shared fixtures: tiny random base models (no downloads), small multi-domain data, and a
tiny MoA whose routers tell the synthetic domains apart, served over loopback HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moa.testing import serving  # noqa: F401 (the tests import it from here)

# Tests never touch the network: `import moa` no longer sets this (the user decides), so the
# suite does, before huggingface_hub is imported (it reads the variable once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    # Trainings that leave bf16 unset follow $MOA_BF16 (auto|1|0); `make test` passes under each.
    from moa.device import BF16_ENV, resolve_bf16

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


def two_expert_moa(root: Path, base, *, fast=("--batch-size", "4", "--no-bf16")) -> Path:
    """Train 1-step math and echo experts on the tiny base and assemble them: root/moa0."""
    from moa.cli import main

    train = write_jsonl(root / "train.jsonl", [r for r in synthetic_records(4, seed=1) if r["domain"] != "json"])
    for d in ("math", "echo"):
        assert main(["train-expert", "--data", str(train), "--domain", d, "--out", str(root / "experts" / d),
                     "--base", str(base), "--max-steps", "1", "--rank", "4", *fast]) == 0
    assert main(["assemble", "--experts", str(root / "experts" / "math"), str(root / "experts" / "echo"),
                 "--out", str(root / "moa0")]) == 0
    return train


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", synthetic_records())


# --------------------------------------------------------------------------- a routed MoA to serve

ROUTED_DOMAINS = ["math", "echo", "json"]
# Held out from the routers' training prompts (other numbers and words).
ROUTED_PROMPTS = {
    "math": ["Add 3 and 4.", "Add 17 and 29.", "Add 8 and 31."],
    "echo": ["REPEAT: apple apple", "REPEAT: tiger tiger", "REPEAT: cloud cloud"],
    "json": ["json key=k7", "json key=k2", "json key=k5"],
}


def fit_routers(model, steps: int = 10, lr: float = 0.2) -> None:
    """Train only the routers (router loss of explicit routing) on the synthetic prompt kinds."""
    import torch

    records = synthetic_records(16)
    prompts = [r.get("prompt") or r["messages"][0]["content"] for r in records]
    tok = model.tokenizer
    rows = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for p in prompts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)  # (B, T) left padded, as generate pads
    mask = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    model.set_trainable(experts=False, routers=True)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only spin against the other tests on the CPU
    try:
        for _ in range(steps):
            out = model(input_ids=ids, attention_mask=mask, domains=[r["domain"] for r in records],
                        return_router_logits=True)
            opt.zero_grad()
            out.router_loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.set_trainable(experts=False, routers=False)


@pytest.fixture(scope="session")
def routed_moa_dir(tmp_path_factory, tiny_base) -> Path:
    """A saved 3-expert MoA (random q/v LoRAs, routers fitted to ROUTED_DOMAINS) on the tiny base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from moa.base import load_base
    from moa.model import MoAModel

    root = tmp_path_factory.mktemp("routed_moa")
    dirs = []
    for seed, domain in enumerate(ROUTED_DOMAINS, start=1):
        base, _ = load_base(tiny_base)
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(root / domain)
        dirs.append(root / domain)
    model = MoAModel.from_adapters(dirs, domains=ROUTED_DOMAINS, base=tiny_base)
    fit_routers(model)
    return model.save_pretrained(root / "moa")
