"""Check add-expert / remove-expert on domains the project never saw (run after verify_moa.py).

    python scripts/verify_incremental.py --src runs/verify_moa --out runs/verify_incremental

Builds a 3-expert MoA (units, sql, sentiment) from verify_moa's stage-1 experts with a full
stage 2, then adds the 4th domain (dates) with `moa add-expert --adapter` (router-only) and
removes one domain with `moa remove-expert`. Reports routing accuracy before/after, whether
the old experts stayed bitwise identical, and the time of add-expert against the full stage 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="runs/verify_moa")
    ap.add_argument("--out", default="runs/verify_incremental")
    ap.add_argument("--stage2-steps", type=int, default=60)
    ap.add_argument("--add-steps", type=int, default=40)
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    moa = [sys.executable, "-m", "moa.cli"]
    old3 = ["units", "sql", "sentiment"]
    rows = [json.loads(l) for l in (src / "train.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (src / "heldout.jsonl").read_text().splitlines()]
    (out / "train3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["domain"] in old3))
    (out / "held3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held if r["domain"] in old3))
    subprocess.run(moa + ["assemble", "--experts", *[str(src / "experts" / d) for d in old3], "--out",
                          str(out / "moa3_0"), "--overwrite"], check=True)
    t = time.time()
    subprocess.run(moa + ["train", "--moa", str(out / "moa3_0"), "--data", str(out / "train3.jsonl"), "--out",
                          str(out / "moa3"), "--max-steps", str(args.stage2_steps), "--overwrite"], check=True)
    t_stage2 = time.time() - t

    def route(ckpt, data, name):
        subprocess.run(moa + ["route", "--moa", str(ckpt), "--data", str(data), "--out", str(out / name)], check=True)
        return json.loads((out / name).read_text())

    before = route(out / "moa3", out / "held3.jsonl", "route_3_before.json")
    t = time.time()
    subprocess.run(moa + ["add-expert", "--moa", str(out / "moa3"), "--domain", "dates", "--adapter",
                          str(src / "experts" / "dates"), "--data", str(src / "train.jsonl"), "--out", str(out / "moa4"),
                          "--max-steps", str(args.add_steps), "--overwrite"], check=True)
    t_add = time.time() - t
    after = route(out / "moa4", src / "heldout.jsonl", "route_4_after.json")

    from moa import MoAModel

    m3, m4 = MoAModel.from_pretrained(out / "moa3"), MoAModel.from_pretrained(out / "moa4")
    bitwise = all(all(torch.equal(a, b) for a, b in zip(m3.expert_state_dict(d).values(),
                                                        m4.expert_state_dict(d).values())) for d in old3)
    subprocess.run(moa + ["remove-expert", "--moa", str(out / "moa4"), "--domain", "sql", "--out",
                          str(out / "moa4_minus_sql"), "--overwrite"], check=True)
    rest = [r for r in held if r["domain"] != "sql"]
    (out / "held_rest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rest))
    removed = route(out / "moa4_minus_sql", out / "held_rest.jsonl", "route_removed.json")
    result = {"stage2_3experts_seconds": round(t_stage2, 1), "add_expert_seconds": round(t_add, 1),
              "add_vs_stage2_time": round(t_add / t_stage2, 3),
              "routing_3_before": before["accuracy"], "routing_4_after": after["accuracy"],
              "routing_4_after_per_domain": after["per_domain"], "old_experts_bitwise_unchanged": bitwise,
              "routing_after_removing_sql": removed["accuracy"]}
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    ok = bitwise and after["accuracy"] >= 0.95 and removed["accuracy"] >= 0.95
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
