"""Iterating on one expert without disturbing the others: `moa add-expert`, `moa remove-expert`,
`moa retrain-expert`.

Adding a domain imports (or first trains) its LoRA, grows every router by one output (old rows
kept), then re-fits the routers on a domain-balanced replay of all domains. Only the routers --
and, with --tune-new-expert, the new expert -- train, so the old experts stay bitwise identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moa.errors import MoAError


def _replay_records(path, domains: list[str], extra=None, skip_invalid: bool = False):
    """Records of `path` (+ `extra`) restricted to `domains`; every domain must be present."""
    from moa.train import load_training_records

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


def add_expert(*, moa_dir, domain: str, out, adapter=None, train_data=None, data=None, max_steps: int = 100,
               tune_new_expert: bool = False, seed: int = 0, batch_size: int = 8, router_lr: float = 3e-3,
               lr: float = 1e-4, expert_steps: int = 40, base=None, overwrite: bool = False,
               bf16: bool | None = None, validation: dict | None = None) -> dict:
    """`validation`: TrainConfig's validation and tracking fields (eval_data, eval_every, keep_best,
    early_stopping_patience, report_to) for both trainings."""
    from moa.model import MoAModel
    from moa.train import load_training_records, train_expert, train_mixture
    from moa.trainer import TrainConfig

    if (adapter is None) == (train_data is None):
        raise MoAError("give exactly one of --adapter PEFT_DIR or --train-data FILE")
    out = Path(out)
    model = MoAModel.from_pretrained(moa_dir, base=base)
    if domain in model.domains:
        raise MoAError(f"domain '{domain}' is already an expert of {moa_dir} (domains: {', '.join(model.domains)}); "
                       "use `moa retrain-expert` to retrain it")
    new_records = None
    if train_data is not None:
        new_records = load_training_records(train_data, [domain], False)
        adapter = out / "stage1" / domain
        cfg = json.loads((Path(moa_dir) / "moa_config.json").read_text())
        spec = next(iter((cfg.get("experts") or {}).values()), {})  # same rank/alpha as the others
        train_expert(data=train_data, domain=domain, out=adapter, base=base or cfg.get("base"),
                     rank=int(spec.get("r", 8)), alpha=float(spec.get("alpha", 16)),
                     targets=list(model.target_modules),
                     cfg=TrainConfig(max_steps=expert_steps, batch_size=batch_size, lr=1e-3 if lr == 1e-4 else lr,
                                     seed=seed, bf16=bf16, **(validation or {})),
                     overwrite=overwrite, records=new_records)
    before = {d: _copy(model.expert_state_dict(d)) for d in model.domains}
    model.add_expert(domain, adapter)
    domains = list(model.domains)
    replay = _replay_records(data, domains, extra=new_records)
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16, **(validation or {}))
    summary = train_mixture(moa_dir=moa_dir, data=data or train_data, out=out, model=model, records=replay,
                            router_only=not tune_new_expert, experts_trainable=[domain] if tune_new_expert else False,
                            router_lr=router_lr, cfg=cfg, overwrite=overwrite, eta=model.eta or 1.0,
                            desc=f"add-expert {domain}")
    unchanged = all(_equal(before[d], model.expert_state_dict(d)) for d in before)
    if not unchanged:  # the design guarantees it; a failure here is a bug worth stopping for
        raise RuntimeError("an old expert changed during add-expert")
    summary["old_experts_unchanged"] = unchanged
    return summary


def remove_expert(*, moa_dir, domain: str, out, overwrite: bool = False) -> dict:
    from moa.model import MoAModel

    model = MoAModel.from_pretrained(moa_dir)
    if domain not in model.domains:
        raise MoAError(f"unknown domain '{domain}' (domains: {', '.join(model.domains)})")
    if len(model.domains) == 1:
        raise MoAError("cannot remove the only expert")
    _check_out(out, overwrite, moa_dir)
    model.remove_expert(domain)
    model.save_pretrained(out, provenance={"removed": domain, "from": str(Path(moa_dir).resolve())})
    return {"out": str(out), "domains": list(model.domains)}


def retrain_expert(*, moa_dir, domain: str, data, out, max_steps: int = 60, router_steps: int = 30, seed: int = 0,
                   batch_size: int = 8, lr: float = 2e-4, router_lr: float = 3e-3, overwrite: bool = False,
                   bf16: bool | None = None, validation: dict | None = None) -> dict:
    """Phase 1: train only `domain`'s expert on its records (routers and other experts frozen).
    Phase 2: re-fit the routers briefly on a balanced replay, if `data` holds every domain."""
    from moa.model import MoAModel
    from moa.train import load_training_records, train_mixture
    from moa.trainer import TrainConfig

    model = MoAModel.from_pretrained(moa_dir)
    if domain not in model.domains:
        raise MoAError(f"unknown domain '{domain}' (domains: {', '.join(model.domains)})")
    records = load_training_records(data, None, False)
    own = [r for r in records if r.domain == domain]
    if not own:
        raise MoAError(f"{data}: no record of domain '{domain}'")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MoAError(f"--out {out} is not empty; pass --overwrite to replace it")
    overwrite = True  # both phases below write into the directory checked just now
    others = {d: _copy(model.expert_state_dict(d)) for d in model.domains if d != domain}
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16, **(validation or {}))
    s1 = train_mixture(moa_dir=moa_dir, data=data, out=out / "retrain", model=model, records=own, eta=0.0,
                       experts_trainable=[domain], train_routers=False, cfg=cfg, overwrite=overwrite,
                       desc=f"retrain {domain}")
    present = {r.domain for r in records}
    if set(model.domains) <= present:
        cfg2 = TrainConfig(max_steps=router_steps, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16,
                           **(validation or {}))
        s2 = train_mixture(moa_dir=moa_dir, data=data, out=out, model=model,
                           records=[r for r in records if r.domain in model.domains], router_only=True,
                           experts_trainable=False, router_lr=router_lr, cfg=cfg2, overwrite=overwrite,
                           eta=model.eta or 1.0, desc="refit routers")
    else:
        print(f"moa: {data} lacks domain(s) {', '.join(sorted(set(model.domains) - present))}: routers not "
              "re-fitted", file=sys.stderr)
        from moa.train import publish_checkpoint

        publish_checkpoint(model, out, {"retrained": domain})
        s2 = None
    if not all(_equal(others[d], model.expert_state_dict(d)) for d in others):
        raise RuntimeError("an untouched expert changed during retrain-expert")
    return {"retrain": s1, "router_refit": s2, "out": str(out)}


def _check_out(out, overwrite: bool, moa_dir) -> None:
    out = Path(out)
    if (out / "moa_config.json").exists() and not overwrite and out.resolve() != Path(moa_dir).resolve():
        raise MoAError(f"--out {out} already holds an MoA checkpoint; pass --overwrite to replace it")


def _copy(t: dict):
    return {k: v.clone() for k, v in t.items()}


def _equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def register(sub) -> None:
    from moa.trainer import add_validation_args

    p = sub.add_parser("add-expert", help="add a domain: import or train its LoRA, grow and re-fit the routers",
                       description="Add a new domain expert to an MoA checkpoint without touching the others: "
                                   "--adapter imports an existing PEFT LoRA (any rank/alpha, any subset of the "
                                   "target modules); --train-data trains one first. Every router grows one output "
                                   "and is re-fitted on a domain-balanced replay (--data).")
    p.add_argument("--moa", required=True, help="input MoA checkpoint")
    p.add_argument("--domain", required=True, help="name of the new domain")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="a PEFT LoRA adapter directory to import")
    src.add_argument("--train-data", help="JSONL with the new domain's records: train its expert first")
    p.add_argument("--out", required=True, help="output MoA checkpoint directory")
    p.add_argument("--data", default=None, help="replay JSONL with records of every domain (old and new)")
    p.add_argument("--max-steps", type=int, default=100, help="router re-fit steps")
    p.add_argument("--tune-new-expert", action="store_true", help="also tune the new expert during the re-fit")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--router-lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    add_validation_args(p)
    p.set_defaults(func=_cmd_add)

    p = sub.add_parser("remove-expert", help="drop one domain's expert and its router row",
                       description="Remove a domain: its expert and its row in every router. Routing over the "
                                   "remaining domains needs no retraining.")
    p.add_argument("--moa", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_remove)

    p = sub.add_parser("retrain-expert", help="retrain one expert (others untouched), then re-fit the routers",
                       description="Continue training one domain's expert on its records with every other expert "
                                   "and the routers frozen, then re-fit the routers briefly on a balanced replay "
                                   "when --data holds every domain.")
    p.add_argument("--moa", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--data", required=True, help="JSONL with the domain's records (and others for the router re-fit)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--router-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    add_validation_args(p)
    p.set_defaults(func=_cmd_retrain)


def _cmd_add(args) -> int:
    s = add_expert(moa_dir=args.moa, domain=args.domain, out=args.out, adapter=args.adapter,
                   train_data=args.train_data, data=args.data, max_steps=args.max_steps,
                   tune_new_expert=args.tune_new_expert, seed=args.seed, batch_size=args.batch_size,
                   router_lr=args.router_lr, overwrite=args.overwrite, validation=_validation(args))
    print(json.dumps(s))
    return 0


def _validation(args) -> dict:
    from moa.trainer import validation_from_args

    return validation_from_args(args)


def _cmd_remove(args) -> int:
    print(json.dumps(remove_expert(moa_dir=args.moa, domain=args.domain, out=args.out, overwrite=args.overwrite)))
    return 0


def _cmd_retrain(args) -> int:
    s = retrain_expert(moa_dir=args.moa, domain=args.domain, data=args.data, out=args.out, max_steps=args.max_steps,
                       router_steps=args.router_steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                       overwrite=args.overwrite, validation=_validation(args))
    print(json.dumps(s))
    return 0
