"""Iterating on one expert without disturbing the others: `moa add-expert`, `moa remove-expert`,
`moa retrain-expert`.

Adding a domain imports (or first trains) its LoRA, grows every router by one output (old rows
kept), then re-fits the routers on a domain-balanced replay of all domains. Only the routers --
and, with --tune-new-expert, the new expert -- train, so the old experts stay bitwise identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moa.errors import MoAError
from moa.fallback import drop_calibration
from moa.io import check_out_dir


def _replay_records(path, domains: list[str], extra=None, skip_invalid: bool = False):
    """Records of `path` (+ `extra`) restricted to `domains`; every domain must be present."""
    from moa.stages import load_training_records

    records = load_training_records(path, None, skip_invalid) if path else []
    records = [r for r in records if r.domain in domains]
    have = {r.domain for r in records}
    if extra:
        records += [r for r in extra if r.domain not in have]
        have |= {r.domain for r in extra}
    missing = [d for d in domains if d not in have]
    if missing:
        where = f"--data {path}" if path else "the replay data (pass --data REPLAY_FILE)"
        raise MoAError(f"{where} has no record of domain(s) {', '.join(missing)}; the routers are re-fitted "
                       "on a replay of every domain")
    return records


def add_expert(*, moa_dir, domain: str, out, adapter=None, train_data=None, data=None, cfg=None,
               expert_cfg=None, tune_new_expert: bool = False, router_lr: float = 3e-3, base=None,
               resume: bool = False, overwrite: bool = False, skip_invalid: bool = False) -> dict:
    """Add `domain`: import `adapter` (a PEFT LoRA) or first train one on `train_data` (into
    OUT/stage1/<domain>, with `expert_cfg`), grow every router by one output and re-fit the
    routers (and, with `tune_new_expert`, the new expert) on a balanced replay with `cfg`.

    Everything that can be checked (OUT, the replay's domains) is checked before any training.
    """
    from dataclasses import replace

    from moa.model import MoAModel
    from moa.stages import load_training_records, train_expert, train_mixture
    from moa.trainer import TrainConfig, prepare_out_dir

    if (adapter is None) == (train_data is None):
        raise MoAError("give exactly one of --adapter PEFT_DIR or --train-data FILE")
    cfg = cfg or TrainConfig(max_steps=100, lr=1e-4)
    expert_cfg = expert_cfg or replace(cfg, max_steps=40, epochs=None, lr=1e-3)
    out = Path(out)
    model = MoAModel.from_pretrained(moa_dir, base=base)
    if domain in model.domains:
        raise MoAError(f"domain '{domain}' is already an expert of {moa_dir} (domains: {', '.join(model.domains)}); "
                       "use `moa retrain-expert` to retrain it")
    # OUT is checked once here; both trainings below then write into it (stage1/ and the checkpoint).
    if not resume:
        prepare_out_dir(out, {}, resume=False, overwrite=overwrite)
    new_records = None
    if train_data is not None:
        new_records = load_training_records(train_data, [domain], skip_invalid)
    replay = _replay_records(data, [*model.domains, domain], extra=new_records, skip_invalid=skip_invalid)
    if train_data is not None:
        adapter = out / "stage1" / domain
        spec = next(iter(model.experts.values()), {})  # same rank/alpha as the others
        if not (resume and (adapter / "adapter_model.safetensors").is_file()):
            train_expert(data=train_data, domain=domain, out=adapter, base=base or model.base_ref,
                         rank=int(spec.get("r", 8)), alpha=float(spec.get("alpha", 16)),
                         targets=list(model.target_modules), cfg=expert_cfg, resume=resume, overwrite=True,
                         records=new_records)
    before = {d: _copy(model.expert_state_dict(d)) for d in model.domains}
    dropped = drop_calibration(model, f"the new domain '{domain}' changes the experts")
    model.add_expert(domain, adapter)
    summary = train_mixture(moa_dir=moa_dir, data=data or train_data, out=out, model=model, records=replay,
                            router_only=not tune_new_expert, experts_trainable=[domain] if tune_new_expert else False,
                            router_lr=router_lr, cfg=cfg, resume=resume, overwrite=True,
                            eta=model.eta or 1.0, checkpoint_eta=model.eta, desc=f"add-expert {domain}")
    unchanged = all(_equal(before[d], model.expert_state_dict(d)) for d in before)
    if not unchanged:  # the design guarantees it; a failure here is a bug worth stopping for
        raise RuntimeError("an old expert changed during add-expert")
    summary["old_experts_unchanged"] = unchanged
    summary["fallback_dropped"] = dropped
    return summary


def remove_expert(*, moa_dir, domain: str, out, overwrite: bool = False) -> dict:
    from moa.model import MoAModel

    model = MoAModel.from_pretrained(moa_dir)
    if domain not in model.domains:
        raise MoAError(f"unknown domain '{domain}' (domains: {', '.join(model.domains)})")
    if len(model.domains) == 1:
        raise MoAError("cannot remove the only expert")
    check_out_dir(out, overwrite=overwrite)  # the model is in memory: replacing --moa itself is allowed
    dropped = drop_calibration(model, f"removing '{domain}' changes the domains")
    model.remove_expert(domain)
    model.save_pretrained(out, provenance={"removed": domain, "from": str(Path(moa_dir).resolve())})
    return {"out": str(out), "domains": list(model.domains), "fallback_dropped": dropped}


def retrain_expert(*, moa_dir, domain: str, data, out, cfg=None, router_steps: int = 30,
                   router_lr: float = 3e-3, base=None, resume: bool = False, overwrite: bool = False,
                   skip_invalid: bool = False) -> dict:
    """Phase 1: train only `domain`'s expert on its records with `cfg` (routers and other experts
    frozen), into OUT/retrain. Phase 2: re-fit the routers for `router_steps` on a balanced replay,
    if `data` holds every domain. The checkpoint keeps its eta."""
    from dataclasses import replace

    from moa.model import MoAModel
    from moa.stages import load_training_records, train_mixture
    from moa.trainer import TrainConfig, prepare_out_dir

    cfg = cfg or TrainConfig(max_steps=60, lr=2e-4)
    model = MoAModel.from_pretrained(moa_dir, base=base)
    model.domain_index(domain)  # unknown domain: an error naming the known ones
    dropped = drop_calibration(model, f"retraining '{domain}' changes its expert and the routers")
    records = load_training_records(data, None, skip_invalid)
    own = [r for r in records if r.domain == domain]
    if not own:
        raise MoAError(f"{data}: no record of domain '{domain}'")
    out = Path(out)
    if not resume:  # both phases write into OUT
        prepare_out_dir(out, {}, resume=False, overwrite=overwrite)
    eta = model.eta
    others = {d: _copy(model.expert_state_dict(d)) for d in model.domains if d != domain}
    phase1 = out / "retrain"
    if resume and (phase1 / "moa_config.json").is_file():
        model = MoAModel.from_pretrained(phase1, base=base)
        s1 = {"resumed": str(phase1)}
    else:
        s1 = train_mixture(moa_dir=moa_dir, data=data, out=phase1, model=model, records=own, eta=0.0,
                           checkpoint_eta=eta, experts_trainable=[domain], train_routers=False, cfg=cfg,
                           resume=resume, overwrite=True, desc=f"retrain {domain}")
        if s1.get("interrupted"):
            return {"retrain": s1, "router_refit": None, "out": str(out), "interrupted": True}
    present = {r.domain for r in records}
    if set(model.domains) <= present:
        cfg2 = replace(cfg, max_steps=router_steps, epochs=None)
        s2 = train_mixture(moa_dir=moa_dir, data=data, out=out, model=model,
                           records=[r for r in records if r.domain in model.domains], router_only=True,
                           experts_trainable=False, router_lr=router_lr, cfg=cfg2, resume=resume, overwrite=True,
                           eta=eta or 1.0, checkpoint_eta=eta, desc="refit routers")
    else:
        print(f"moa: {data} lacks domain(s) {', '.join(sorted(set(model.domains) - present))}: routers not "
              "re-fitted", file=sys.stderr)
        from moa.stages import publish_checkpoint

        model.eta = eta
        publish_checkpoint(model, out, {"retrained": domain})
        s2 = None
    if not all(_equal(others[d], model.expert_state_dict(d)) for d in others):
        raise RuntimeError("an untouched expert changed during retrain-expert")
    return {"retrain": s1, "router_refit": s2, "out": str(out), "eta": eta, "fallback_dropped": dropped}


def _copy(t: dict):
    return {k: v.clone() for k, v in t.items()}


def _equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
