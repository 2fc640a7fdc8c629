"""Where does one system's perplexity lead over another come from? Scores every response token of
one domain under an MoA checkpoint (vote routing) and under a PEFT adapter (e.g. the mixed-data
LoRA), then prints the totals, the token kinds with the largest gap, and the records with the
largest gap.

    python scripts/token_gap.py --moa runs/demo/moa --adapter runs/demo/baselines/mixed_lora \
        --data data/demo/test.jsonl --domain json

The first response token of each record is counted as `<first>`, whatever it is (it carries the
answer's first decision); the other tokens are grouped by their text.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from moa.base import load_base
from moa.checkpoint import MoAConfig
from moa.data import collate, encode_records, read_records, select_domains
from moa.errors import MoAError
from moa.scoring import causal_lm_forward, load_peft_adapter, moa_forward, response_token_logprobs


def token_nll(forward, examples, pad_id: int, batch_size: int) -> list[list[tuple[int, float]]]:
    """Per example: (token id, negative log-likelihood) of each response token, in order."""
    rows = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = collate(chunk, pad_id, padding_side="right")
        batch["domain_names"] = [e.domain for e in chunk]
        with torch.no_grad():
            logits, _ = forward(batch)
        lp, mask = response_token_logprobs(logits, batch["labels"])  # (B, T-1) each
        labels = batch["labels"][:, 1:]
        for r in range(len(chunk)):
            rows.append(list(zip(labels[r][mask[r]].tolist(), (-lp[r][mask[r]]).tolist())))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moa", required=True, help="MoA checkpoint directory (system A, vote routing)")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory (system B)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--top", type=int, default=8, help="rows to print per table")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    records, _ = read_records(args.data)
    records = select_domains(records, [args.domain], args.data)
    fwd_a, tok = moa_forward(args.moa, "vote")
    base, _ = load_base(MoAConfig.read(args.moa).base)  # the adapter must fit the same base
    fwd_b = causal_lm_forward(load_peft_adapter(base, args.adapter))
    examples, _ = encode_records(tok, records, None)
    a = token_nll(fwd_a, examples, tok.pad_token_id, args.batch_size)
    b = token_nll(fwd_b, examples, tok.pad_token_id, args.batch_size)

    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    per_record = []
    for ra, rb in zip(a, b):
        for pos, ((tid, na), (_, nb)) in enumerate(zip(ra, rb)):
            k = kinds["<first>" if pos == 0 else tok.decode([tid])]
            k[0] += na
            k[1] += nb
            k[2] += 1
        per_record.append((sum(n for _, n in ra), sum(n for _, n in rb)))
    ta, tb = sum(x for x, _ in per_record), sum(y for _, y in per_record)
    n = sum(len(r) for r in a)
    print(f"{args.domain}: {len(records)} records, {n} response tokens; total NLL moa {ta:.2f}, "
          f"adapter {tb:.2f} (gap {ta - tb:+.2f} nats, PPL {torch.tensor(ta / n).exp():.3f} vs "
          f"{torch.tensor(tb / n).exp():.3f})")
    print("\ntoken kinds by gap (moa - adapter): token | moa NLL | adapter NLL | count")
    for key, (na, nb, c) in sorted(kinds.items(), key=lambda kv: kv[1][1] - kv[1][0])[: args.top]:
        print(f"  {key!r:>16} | {na:8.2f} | {nb:8.2f} | {c}")
    print("\nrecords by gap: moa NLL | adapter NLL | prompt (end)")
    order = sorted(range(len(records)), key=lambda i: per_record[i][1] - per_record[i][0])
    for i in order[: args.top]:
        prompt = records[i].messages[0]["content"].replace("\n", " | ")
        print(f"  {per_record[i][0]:6.2f} | {per_record[i][1]:6.2f} | ...{prompt[-90:]}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except MoAError as e:  # bad paths, unknown domain, malformed data: one line, not a traceback
        raise SystemExit(f"token_gap: error: {e}")
