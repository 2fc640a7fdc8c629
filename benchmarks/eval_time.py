"""Time the evaluation phase of `moa fit` / `moa demo` (routing of the test split + `run_eval` of
the run's systems) on a finished run directory, with whichever `moa` is first on PYTHONPATH, so
that two versions of the package can be timed on the same trained models:

    PYTHONPATH=/path/to/old/src python benchmarks/eval_time.py RUN [--test data/demo/test.jsonl]
    PYTHONPATH=src              python benchmarks/eval_time.py RUN

RUN: a `moa demo` / `moa fit` output (RUN/moa, RUN/experts/<d>, RUN/baselines/mixed_lora,
RUN/metrics.json naming the systems). Settings of the quick profile: every test record scored,
10 generated replies per domain, 40 new tokens. The base runs in float32 (no --dtype here), as on a
CPU without bf16. Prints one JSON line: seconds of routing, evaluation and both.
A version whose `run_eval` can hand back its scoring's routing (`routed=`) is timed that way, as
`moa fit` then runs it; an older one runs its own routing pass first, as its `moa fit` did.
"""
import argparse
import inspect
import json
import tempfile
import time
from pathlib import Path

import moa
from moa.data import encode_records, read_records
from moa.evaluate import route_records, routing_report, run_eval
from moa.model import MoAModel

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("run", type=Path)
p.add_argument("--test", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "demo" / "test.jsonl")
p.add_argument("--progress", action="store_true")
p.add_argument("--out", type=Path, help="keep metrics.json and generations.jsonl here (default: a temporary dir)")
args = p.parse_args()
run = args.run
metrics = json.loads((run / "metrics.json").read_text())
systems, domains = list(metrics["systems"]), metrics["domains"]
one_pass = "routed" in inspect.signature(run_eval).parameters
print(f"moa from {moa.__file__}; systems {systems}; routing from scoring: {one_pass}", flush=True)
test, _ = read_records(args.test)
t0 = time.time()
routed = {}
if not one_pass:
    model = MoAModel.from_pretrained(run / "moa")
    examples, _ = encode_records(model.tokenizer, test, 1024)
    routed["moa"], _ = route_records(model, examples, "vote", progress=args.progress)
    del model
t1 = time.time()
kw = {"routed": routed} if one_pass else {}
with tempfile.TemporaryDirectory() as tmp:
    run_eval(run / "moa", args.test, args.out or tmp, systems, mixed_lora=run / "baselines" / "mixed_lora",
             single_lora={d: run / "experts" / d for d in domains}, extra={}, limit_per_domain=None,
             generate_limit_per_domain=10, max_new_tokens=40, batch_size=8, progress=args.progress, **kw)
t2 = time.time()
route = routing_report([r.domain for r in test], routed["moa"], domains)
print(json.dumps({"routing_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1),
                  "routing_accuracy": route["accuracy"]}), flush=True)
