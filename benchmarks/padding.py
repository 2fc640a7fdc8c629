"""Padding fraction of the quick demo's evaluation batches, in file order and length-sorted.

    python benchmarks/padding.py            # data/demo/test.jsonl, batch 8, max_length 192

Also stage 2's domain-balanced training batches of data/demo/train.jsonl, as `moa train` draws
them and regrouped by length (`--length-window W`: each batch keeps its domains).

Scoring batches whole records (prompt + response, right padded); the evaluation's greedy replies
batch the prompts of the first 10 records per domain (left padded). A padded token is one a
batch runs that belongs to no record.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Padded tokens / all tokens run, batching `lengths` in the order given."""
    real = run = 0
    for s in range(0, len(lengths), batch_size):
        chunk = lengths[s:s + batch_size]
        real += sum(chunk)
        run += len(chunk) * max(chunk)
    return (run - real) / max(1, run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "demo" / "test.jsonl"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--generate-per-domain", type=int, default=10)
    p.add_argument("--train", default=str(Path(__file__).resolve().parents[1] / "data" / "demo" / "train.jsonl"),
                   help="stage-2 training data")
    p.add_argument("--steps", type=int, default=400, help="stage-2 steps whose batches are measured")
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16], help="--length-window values")
    args = p.parse_args()
    from moa.base import load_tokenizer
    from moa.data import encode_records, read_records
    from moa.evaluate import first_per_domain

    records, _ = read_records(args.data)
    examples, _ = encode_records(load_tokenizer("smollm2-135m"), records, args.max_length)
    full = [len(e.input_ids) for e in examples]
    prompts = [examples[i].prompt_len for i in first_per_domain(records, args.generate_per_domain)]
    for what, lengths in (("scoring", full), ("generation prompts", prompts)):
        print(f"{what} ({len(lengths)} rows): file order {padding_fraction(lengths, args.batch_size):.3f}, "
              f"length-sorted {padding_fraction(sorted(lengths), args.batch_size):.3f}")
    # stage 2: domain-balanced batches of --train, plain and regrouped by length (moa train --length-window)
    from moa.data import DomainBalancedSampler, LengthGroupedSampler

    train, _ = read_records(args.train)
    ex, _ = encode_records(load_tokenizer("smollm2-135m"), train, args.max_length)
    names = sorted({e.domain for e in ex})
    dom = [names.index(e.domain) for e in ex]
    lengths = [len(e.input_ids) for e in ex]

    def sampler_padding(sampler) -> float:
        batch_lengths = []
        for step in range(args.steps):
            batch_lengths.append([lengths[i] for i in sampler.batch(step)])
        real = sum(sum(b) for b in batch_lengths)
        run = sum(len(b) * max(b) for b in batch_lengths)
        return (run - real) / run

    row = [f"stage-2 batches ({args.steps} steps of {args.batch_size} on {args.train}): balanced "
           f"{sampler_padding(DomainBalancedSampler(dom, args.batch_size)):.3f}"]
    for w in args.windows:
        grouped = LengthGroupedSampler(DomainBalancedSampler(dom, args.batch_size), lengths, w, domain_of=dom)
        pooled = LengthGroupedSampler(DomainBalancedSampler(dom, args.batch_size), lengths, w)
        row.append(f"--length-window {w} {sampler_padding(grouped):.3f} (batches free to mix domains: "
                   f"{sampler_padding(pooled):.3f})")
    print(", ".join(row))


if __name__ == "__main__":
    main()
