"""Check stage 1 on a domain the project never saw, measuring with PEFT alone.

    python scripts/verify_stage1.py --out runs/verify_stage1 [--steps 40]

Generates a small unit-conversion domain (train 200 / held-out 40 records), trains an expert
with `moa train-expert`, then loads base and adapter with transformers + PEFT only and
compares the held-out NLL per response token; finally runs `moa score` on the same records.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

UNITS = [("km", "m", 1000), ("kg", "g", 1000), ("L", "mL", 1000), ("m", "cm", 100), ("h", "min", 60),
         ("min", "s", 60), ("ft", "in", 12), ("yd", "ft", 3), ("day", "h", 24), ("GB", "MB", 1024)]


def records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, f = rng.choice(UNITS)
        x = rng.randint(2, 99)
        out.append({"domain": "units", "prompt": f"Convert {x} {a} to {b}.",
                    "response": f"{x} {a} = {x * f} {b}"})
    return out


def nll_per_token(model, tok, recs) -> float:
    import torch

    total, n = 0.0, 0
    for r in recs:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)
        full = prompt + r["response"] + "<|im_end|>"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        tgt = ids[0, 1:]
        sel = torch.arange(len(p_ids) - 1, ids.shape[1] - 1)
        total -= lp[sel, tgt[sel]].sum().item()
        n += len(sel)
    return total / n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/verify_stage1")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records(200, 1)))
    held.write_text("".join(json.dumps(r) + "\n" for r in records(40, 2)))
    moa = [sys.executable, "-m", "moa.cli"]
    subprocess.run(moa + ["train-expert", "--data", str(train), "--domain", "units", "--out", str(out / "expert"),
                          "--max-steps", str(args.steps), "--overwrite"], check=True)
    # Measured with transformers + PEFT only.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = subprocess.run(moa + ["base-path"], check=True, capture_output=True, text=True).stdout.split()[-1]
    tok = AutoTokenizer.from_pretrained(base_dir)
    held_recs = [json.loads(l) for l in held.read_text().splitlines()]
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    nll_base = nll_per_token(base, tok, held_recs)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out / "expert")).eval()
    nll_tuned = nll_per_token(tuned, tok, held_recs)
    score = subprocess.run(moa + ["score", "--data", str(held), "--out", str(out / "scores.jsonl"), "--adapter",
                                  str(out / "expert")], check=True, capture_output=True, text=True)
    summary = json.loads(score.stdout.strip().splitlines()[-1])
    result = {"steps": args.steps, "heldout_nll_base": round(nll_base, 4), "heldout_nll_expert": round(nll_tuned, 4),
              "ratio": round(nll_tuned / nll_base, 4), "moa_score_ppl": summary["units"]["ppl"],
              "moa_score_nll": round(math.log(summary["units"]["ppl"]), 4)}
    print(json.dumps(result))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ratio"] <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
