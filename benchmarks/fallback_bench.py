"""Out-of-domain fallback: in-domain routing accuracy with fallbacks, and the fraction of generic
questions (from no domain) sent to the base model, for every fallback method, in one run.

    python benchmarks/fallback_bench.py --moa /tmp/pg_demo/moa --train data/demo/train.jsonl \
        --valid data/demo/valid.jsonl --test data/demo/test.jsonl --generic benchmarks/generic_prompts.jsonl

One routing pass over each file's prompts (chat template, as `moa serve` renders them) gives the
router logits and the pooled inputs of the candidate layers. Each method is then calibrated
from them as `moa calibrate` does (`moa.fallback.fit_fallback`: centroids on --train, threshold
on --valid at --acceptance, the margin and layer from --references) and measured on --test ((a) routing accuracy counting a fallback as
wrong, and the in-domain acceptance) and on --generic ((b) the fraction that falls back). Rows:
`distance` (per-domain spreads, the layer chosen among `moa.fallback.default_layers` by the
held-out-domain rule: what `moa calibrate` stores), `distance@L` (layer L forced, L in --layers
and the defaults), `distance-shared@L` (one spread shared by the domains), `msp`, `energy`.
The centroids use the first 200 training prompts per domain, as calibrate does. The calibrated
`distance` fallback is then put in force on the model and the generic prompts and the first 50
test prompts are routed again through `MoAModel.route` (the path generate, serve and the
gateway take): its decisions must equal the ones computed from the features.
"""

import argparse
import json
import platform
import subprocess
import time


def cpu_info() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    name = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in out.splitlines() if l.startswith("Flags")), [])
    have = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(have) or 'no avx512_bf16/amx'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moa", required=True, help="an MoA checkpoint (its own calibration is ignored)")
    ap.add_argument("--train", default="data/demo/train.jsonl", help="labelled JSONL: the distance centroids")
    ap.add_argument("--valid", default="data/demo/valid.jsonl", help="labelled JSONL: the thresholds")
    ap.add_argument("--test", default="data/demo/test.jsonl", help="labelled JSONL: in-domain accuracy")
    ap.add_argument("--generic", default="benchmarks/generic_prompts.jsonl",
                    help="JSONL prompts from no domain ({\"prompt\": ...} or {\"messages\": [...]})")
    ap.add_argument("--acceptance", type=float, default=1.0)
    ap.add_argument("--references", default="default", metavar="default|none|FILE",
                    help="reference prompts of no domain for the margin and the layer, as `moa calibrate "
                         "--references` (default: the bundled ones; they must not be the --generic prompts)")
    ap.add_argument("--layers", default="0,3",
                    help="more layers to report distance@L rows for, beside moa.fallback.default_layers")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    import torch

    from moa.data import read_prompts, read_records
    from moa.fallback import (MAX_TRAIN_PER_DOMAIN, METHODS, candidate_layers, first_per_domain, fit_fallback,
                              prompt_features, resolve_references, set_fallback)
    from moa.generation import encode_prompts
    from moa.model import MoAModel
    from moa.router import decide

    t0 = time.perf_counter()
    model = MoAModel.from_pretrained(args.moa)
    set_fallback(model, "off")
    domains = model.domains
    defaults = candidate_layers(model, "distance")
    extra = candidate_layers(model, "distance", [int(x) for x in args.layers.split(",")]) if args.layers else []
    layers = sorted({*defaults, *extra})
    how = "last" if model.routing_default == "last" else "vote"

    def labelled(path):
        recs = read_records(path)[0]
        return [r.prompt_messages for r in recs], torch.tensor([domains.index(r.domain) for r in recs])

    with open(args.generic, encoding="utf-8") as f:
        generic = [m for m, _ in read_prompts(f, args.generic)]
    train, ytr = labelled(args.train)
    keep = first_per_domain([argparse.Namespace(domain=domains[int(y)]) for y in ytr], MAX_TRAIN_PER_DOMAIN)
    train, ytr = [train[i] for i in keep], ytr[keep]
    valid, yva = labelled(args.valid)
    test, yte = labelled(args.test)
    _, ftr = prompt_features(model, train, layers, args.batch_size, desc="train", logits=False)
    feats = {name: prompt_features(model, prompts, layers, args.batch_size, desc=name)
             for name, prompts in (("valid", valid), ("test", test), ("generic", generic))}
    lva, fva = feats["valid"]
    references = resolve_references(args.references)
    lref, fref = (prompt_features(model, references, layers, args.batch_size, desc="references")
                  if references else (None, None))
    overlap = {json.dumps(m) for m in generic} & {json.dumps(m) for m in references or []}
    if overlap:
        raise SystemExit(f"{len(overlap)} --generic prompts are also reference prompts: the measurement would "
                         "not be independent of the calibration")

    def measure(fb):
        out = {}
        for name in ("test", "generic"):
            lg, pooled = feats[name]
            logits = list(lg.unbind(1))
            out[name] = fb.apply(decide(logits, how)[0], logits, pooled, how)
        routed = decide(list(feats["test"][0].unbind(1)), how)[0]
        return {"threshold": round(fb.threshold, 6), "layer": fb.layer,
                "valid_acceptance": fb.calibration["valid_acceptance"],
                "test_routing_accuracy": round(float((out["test"] == yte).float().mean()), 4),
                "test_acceptance": round(float((out["test"] >= 0).float().mean()), 4),
                "test_routing_accuracy_without_fallback": round(float((routed == yte).float().mean()), 4),
                "generic_fallback": round(float((out["generic"] < 0).float().mean()), 4),
                "generic_fallback_n": f"{int((out['generic'] < 0).sum())}/{len(generic)}"}, out

    rows, chosen = {}, None
    for method in METHODS:
        cands = {l: ftr[l] for l in defaults} if method == "distance" else {}
        fb = fit_fallback(domains, method, args.acceptance, cands, ytr, lva, fva, yva, how, lref=lref, fref=fref)
        rows[method], decided = measure(fb)
        rows[method].update({k: fb.calibration[k] for k in ("in_domain_threshold", "reference_rejection",
                                                             "reference_rejection_by_layer")
                             if k in fb.calibration})
        if method == "distance":
            rows[method]["held_out_domain_rejection"] = fb.calibration["held_out_domain_rejection"]
            chosen = (fb, decided)
            if references:  # the same without references: the in-domain threshold, the held-out-domain layer
                plain = fit_fallback(domains, method, args.acceptance, cands, ytr, lva, fva, yva, how)
                rows["distance (no references)"] = measure(plain)[0]
            for shared in (False, True):
                for l in layers:
                    fl = fit_fallback(domains, method, args.acceptance, {l: ftr[l]}, ytr, lva, fva, yva, how,
                                      per_domain_scale=not shared)
                    rows[f"distance{'-shared' if shared else ''}@{l}"] = measure(fl)[0]

    # The real path: the calibrated distance fallback in force, prompts routed by MoAModel.route.
    fb, decided = chosen
    model.fallback = fb
    same = True
    for name, prompts in (("test", test[:50]), ("generic", generic)):
        got = []
        for s in range(0, len(prompts), args.batch_size):
            ids, mask = encode_prompts(model, prompts[s : s + args.batch_size])
            got.append(model.route(ids, mask, routing=how)[0].cpu())
        same &= torch.equal(torch.cat(got), decided[name][: len(prompts)])

    result = {"moa": args.moa, "domains": domains, "routing": how, "acceptance": args.acceptance,
              "references": args.references,
              "n": {"train": len(train), "valid": len(valid), "test": len(test), "generic": len(generic)},
              "dtype": str(next(model.base_model.parameters()).dtype), "cpu": cpu_info(),
              "route_path_matches_features": same, "wall_s": round(time.perf_counter() - t0, 1), "methods": rows}
    print(json.dumps(result, indent=1))
    print("\n| method | layer | test routing acc (fallback = wrong) | test acceptance | generic fallback |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {'' if r['layer'] is None else r['layer']} | {r['test_routing_accuracy']:.4f} | "
              f"{r['test_acceptance']:.4f} | {r['generic_fallback_n']} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
