"""`moa demo`: `moa fit` on the bundled data (data/demo) with a profile of fixed settings.

stage 1 (one expert per domain) -> assemble -> stage 2 (routers + experts, explicit routing)
-> the mixed-data single-LoRA baseline (as many steps as stage 1 + stage 2, same batch size)
-> routing report -> evaluation of base / single_lora / mixed_lora / moa -> report.md,
metrics.json and PNG plots under --out.
"""

from __future__ import annotations

import time
from pathlib import Path

from moa.errors import MoAError
from moa.fit import FitConfig


Profile = FitConfig
"""A demo profile is the FitConfig of a `moa fit` on the bundled data."""

PROFILES = {
    # Sized for `make demo` on a 2-core CPU within 20 minutes. Every expert gets the same number
    # of epochs (steps in proportion to its data, as the mixed LoRA sees each domain), and its lr
    # follows the square-root rule for its label tokens per step (`lr_scaling`): an expert of
    # one-letter answers steps more carefully than one of paragraphs. Chosen on the valid split
    # (docs/RESULTS.md). No validation during training (time); the valid split serves the eta sweep.
    # The paper's recipe (fresh experts, joint stage 2) at equal compute: what the demo measures.
    # No out-of-domain fallback (time; `moa calibrate` adds one to the demo's checkpoint).
    "quick": Profile(expert_steps=16, stage2_steps=24, batch_size=4, lr=2e-3, stage2_lr=1e-3, router_lr=3e-3,
                     eta=0.1, max_length=192, eval_per_domain=None, generate_per_domain=10, max_new_tokens=40,
                     allocation=1.0, lr_scaling="tokens", validations=0, budget="equal", expert_init="fresh",
                     stage2="joint", fallback_acceptance=0),
    # The comparison of docs/RESULTS.md: all baselines and ablations, and the eta sweep.
    "full": Profile(expert_steps=24, stage2_steps=32, batch_size=4, lr=2e-3, stage2_lr=1e-3, router_lr=3e-3,
                    eta=0.1, max_length=256, eval_per_domain=None, generate_per_domain=10, max_new_tokens=40,
                    ablations=True, allocation=1.0, lr_scaling="tokens", validations=0, budget="equal",
                    expert_init="fresh", stage2="joint", fallback_acceptance=0),
}


def bundled_data_dir() -> Path:
    """data/demo of the source checkout (the package is installed editable from it)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "data" / "demo"
        if (cand / "train.jsonl").is_file():
            return cand
    raise MoAError("the bundled demo data (data/demo) was not found; pass --data DIR "
                   "or build it with `moa data build-demo --out data/demo`")


def run_demo(profile: str | Profile = "quick", out: str | Path = "runs/demo", data_dir: str | Path | None = None,
             base: str | None = None, overwrite: bool = True, seed: int = 0) -> dict:
    """`moa fit` on the bundled train/valid/test split with a profile's settings; returns the test
    metrics (as `moa eval` writes them) with the fit's plan under "fit"."""
    from moa.fit import run_fit

    if isinstance(profile, FitConfig):
        cfg, profile = profile, "custom"
    elif profile in PROFILES:
        cfg = PROFILES[profile]
    else:
        raise MoAError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
    data_dir = Path(data_dir) if data_dir else bundled_data_dir()
    t0 = time.time()
    summary = run_fit(data_dir / "train.jsonl", out, cfg, valid=data_dir / "valid.jsonl", test=data_dir / "test.jsonl",
                      base=base, seed=seed, overwrite=overwrite, label=f"demo ({profile} profile)")
    metrics = summary["metrics"]
    metrics["fit"] = {k: v for k, v in summary.items() if k != "metrics"}
    print()
    from moa.evaluate import format_table

    print(format_table(metrics))
    print(f"\nrouting accuracy (vote, all {metrics['routing_full_test']['n']} test records): "
          f"{metrics['routing_full_test']['accuracy']:.4f}")
    # summary["seconds"] is the trainings' time (the report's "Training time"); the evaluation follows it.
    print(f"time: {(time.time() - t0) / 60:.1f} min in all, {summary['seconds'] / 60:.1f} min of it training; "
          f"report: {Path(out) / 'report.md'}")
    return metrics
