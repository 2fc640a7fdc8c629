"""The per-domain PPL of a `moa fit` run's seeded experts written back toward their seed (the
mixed-data LoRA), for the recipe search of `--seed-interpolate` (docs/RESULTS.md, round 3).

    python scripts/seed_interpolation.py RUN VALID.jsonl [--per-domain N] [--t 1 0.5]

For each domain d of VALID (its first N records): the PPL of RUN/baselines/mixed_lora, and of
`seed + t x (trained - seed)` for each t, every LoRA matrix averaged, where the trained weights are
RUN/experts/d/trained (a run written with interpolation) or else RUN/experts/d. Each through PEFT,
in float32, so that an expert that kept the seed scores exactly as the mixed LoRA. Prints one line
per domain and writes RUN/seed_interpolation.json.
"""

import argparse
import json
from pathlib import Path

from moa.base import load_base
from moa.checkpoint import read_adapter
from moa.data import encode_records, read_records
from moa.evaluate import first_per_domain
from moa.scoring import causal_lm_forward, load_peft_adapter, score_examples, summarize
from moa.stages import interpolate_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("valid")
    ap.add_argument("--per-domain", type=int, default=None, help="first N records per domain (default: all)")
    ap.add_argument("--t", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--base", default=None, help="default: the run's base")
    args = ap.parse_args()
    records, _ = read_records(args.valid)
    records = [records[i] for i in first_per_domain(records, args.per_domain)]
    base = args.base or json.loads((args.run / "fit.json").read_text())["plan"]["base"]
    seed = args.run / "baselines" / "mixed_lora"
    seed_weights = read_adapter(seed)

    def ppl(adapter: Path, domain: str, t: float | None = None) -> float:
        """`adapter`'s PPL on `domain`, or (t) that of seed + t x (adapter - seed), as fit writes it."""
        model, tok = load_base(base, dtype="float32")
        model = load_peft_adapter(model, adapter)
        if t is not None:
            interpolate_lora(model, seed_weights, t)
        examples, _ = encode_records(tok, [r for r in records if r.domain == domain])
        rows = score_examples(causal_lm_forward(model), examples, tok.pad_token_id, 8, False)
        return summarize(rows)[domain]["ppl"]

    out = {}
    for d in dict.fromkeys(r.domain for r in records):
        expert = args.run / "experts" / d
        trained = expert / "trained" if (expert / "trained").is_dir() else expert
        row = {"mixed_lora": ppl(seed, d)}
        for t in args.t:
            row[f"t={t:g}"] = ppl(trained, d, t)
        out[d] = row
        print(d, " ".join(f"{k} {v:.4f} ({v / row['mixed_lora']:.3f})" for k, v in row.items()), flush=True)
    (args.run / "seed_interpolation.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
