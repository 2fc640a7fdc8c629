"""Check the MoA core on four domains the project never saw, on the embedded model.

    python scripts/verify_moa.py --out runs/verify_moa [--expert-steps 40] [--stage2-steps 60]

Generates four small domains (unit conversion, SQL, sentiment, date reformatting), trains
one expert per domain, assembles, runs stage 2, then measures: held-out routing accuracy
(vote); each expert directory loaded by PEFT itself vs explicit routing; a mixed-domain batch
vs the per-domain batches; vote-routed generation vs explicit generation with the chosen domain.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
GOOD = ["loved it", "works perfectly", "great value", "would buy again", "excellent quality", "fast delivery"]
BAD = ["broke after a day", "waste of money", "arrived damaged", "never again", "poor quality", "very slow"]
ITEMS = ["blender", "lamp", "backpack", "kettle", "headphones", "chair", "phone case", "tent"]
TABLES = [("employees", "name", "age"), ("products", "title", "price"), ("students", "name", "grade"),
          ("orders", "id", "total"), ("books", "title", "pages")]
UNITS = [("km", "m", 1000), ("kg", "g", 1000), ("L", "mL", 1000), ("m", "cm", 100), ("h", "min", 60)]


def make(domain: str, rng: random.Random) -> dict:
    if domain == "units":
        a, b, f = rng.choice(UNITS)
        x = rng.randint(2, 99)
        return {"prompt": f"Convert {x} {a} to {b}.", "response": f"{x} {a} = {x * f} {b}"}
    if domain == "sql":
        t, col, num = rng.choice(TABLES)
        v = rng.randint(5, 500)
        op, word = rng.choice([(">", "more than"), ("<", "less than"), ("=", "exactly")])
        return {"prompt": f"Write an SQL query: list the {col} of all {t} with {num} {word} {v}.",
                "response": f"SELECT {col} FROM {t} WHERE {num} {op} {v};"}
    if domain == "sentiment":
        pos = rng.random() < 0.5
        who, item = rng.choice(NAMES), rng.choice(ITEMS)
        phrase = rng.choice(GOOD if pos else BAD)
        return {"prompt": f"Classify the sentiment of this review as positive or negative.\nReview: {who} says the "
                          f"{item} {phrase}.", "response": "positive" if pos else "negative"}
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return {"prompt": f"Reformat the date {y:04d}-{m:02d}-{d:02d} as DD/MM/YYYY.", "response": f"{d:02d}/{m:02d}/{y:04d}"}


DOMAINS = ["units", "sql", "sentiment", "dates"]


def write(path: Path, n_per: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [{"domain": d, **make(d, rng)} for _ in range(n_per) for d in DOMAINS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/verify_moa")
    ap.add_argument("--expert-steps", type=int, default=40)
    ap.add_argument("--stage2-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    write(train, 120, 1)
    write(held, 25, 2)
    moa = [sys.executable, "-m", "moa.cli"]
    bs = ["--batch-size", str(args.batch_size)]
    for d in DOMAINS:
        subprocess.run(moa + ["train-expert", "--data", str(train), "--domain", d, "--out", str(out / "experts" / d),
                              "--max-steps", str(args.expert_steps), "--overwrite", *bs], check=True)
    subprocess.run(moa + ["assemble", "--experts", *[str(out / "experts" / d) for d in DOMAINS], "--out",
                          str(out / "moa0"), "--overwrite"], check=True)
    subprocess.run(moa + ["train", "--moa", str(out / "moa0"), "--data", str(train), "--out", str(out / "moa"),
                          "--max-steps", str(args.stage2_steps), "--overwrite", *bs], check=True)
    subprocess.run(moa + ["route", "--moa", str(out / "moa"), "--data", str(held), "--out", str(out / "route.json")],
                   check=True)
    route = json.loads((out / "route.json").read_text())

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moa import MoAModel

    model = MoAModel.from_pretrained(out / "moa").eval()
    base_dir = subprocess.run(moa + ["base-path"], check=True, capture_output=True, text=True).stdout.split()[-1]
    tok = model.tokenizer
    rows = [json.loads(l) for l in held.read_text().splitlines()]
    picks = [next(r for r in rows if r["domain"] == d) for d in DOMAINS]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}, {"role": "assistant",
             "content": r["response"]}], tokenize=False) for r in picks]
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    peft_diff, mixed_diff = {}, 0.0
    with torch.no_grad():
        mixed = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], domains=DOMAINS).logits
        for i, d in enumerate(DOMAINS):
            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                             str(out / "moa" / "experts" / d)).eval()
            single = model(input_ids=enc["input_ids"][i:i + 1], attention_mask=enc["attention_mask"][i:i + 1],
                           domains=[d]).logits
            ref = peft(input_ids=enc["input_ids"][i:i + 1], attention_mask=enc["attention_mask"][i:i + 1]).logits
            m = enc["attention_mask"][i].bool()
            peft_diff[d] = float((single[0][m] - ref[0][m]).abs().max())
            mixed_diff = max(mixed_diff, float((mixed[i][m] - single[0][m]).abs().max()))
    prompts = [r["prompt"] for r in picks]
    voted = model.generate(prompts, routing="vote", max_new_tokens=24)
    explicit = model.generate(prompts, routing="explicit", domains=[v.domain for v in voted], max_new_tokens=24)
    same = all(a.text == b.text for a, b in zip(voted, explicit))
    result = {"routing_accuracy_vote": route["accuracy"], "per_domain": route["per_domain"],
              "peft_vs_explicit_max_abs_logit_diff": peft_diff, "mixed_vs_single_max_abs_logit_diff": mixed_diff,
              "vote_generation_equals_explicit": same,
              "samples": [{"prompt": p, "domain": v.domain, "text": v.text} for p, v in zip(prompts, voted)]}
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    ok = route["accuracy"] >= 0.95 and max(peft_diff.values()) < 1e-4 and mixed_diff < 1e-4 and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
