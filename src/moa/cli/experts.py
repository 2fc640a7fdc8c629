"""`moa add-expert`, `moa remove-expert`, `moa retrain-expert`: change one domain, keep the others."""

from __future__ import annotations

import json
from dataclasses import replace

from moa.cli.options import add_train_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("add-expert", help="add a domain: import or train its LoRA, grow and re-fit the routers",
                       description="Add a new domain expert to an MoA checkpoint without touching the others: "
                                   "--adapter imports an existing PEFT LoRA (any rank/alpha, any subset of the "
                                   "target modules); --train-data trains one first (into OUT/stage1/DOMAIN, "
                                   "--expert-steps at --expert-lr). Every router grows one output and is re-fitted "
                                   "on a domain-balanced replay (--data) for --max-steps.")
    p.add_argument("--moa", required=True, help="input MoA checkpoint")
    p.add_argument("--domain", required=True, help="name of the new domain")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="a PEFT LoRA adapter directory to import")
    src.add_argument("--train-data", help="JSONL with the new domain's records: train its expert first")
    p.add_argument("--out", required=True, help="output MoA checkpoint directory")
    p.add_argument("--data", default=None, help="replay JSONL with records of the old domains (and the new one, "
                   "unless --train-data has them) (default: none; needed unless --train-data covers every domain)")
    p.add_argument("--tune-new-expert", action="store_true", help="also tune the new expert during the re-fit "
                   "(at --lr)")
    p.add_argument("--router-lr", type=float, default=3e-3, help="learning rate of the routers")
    p.add_argument("--expert-steps", type=int, default=40, help="with --train-data: steps of the new expert")
    p.add_argument("--expert-lr", type=float, default=1e-3, help="with --train-data: lr of the new expert")
    p.add_argument("--base", default=None, help="override the base model recorded in the checkpoint "
                   "(default: the recorded one)")
    add_train_args(p, lr=1e-4, default_steps=100, steps_help="router re-fit steps")
    p.set_defaults(func=_cmd_add)

    p = sub.add_parser("remove-expert", help="drop one domain's expert and its router row",
                       description="Remove a domain: its expert and its row in every router. Routing over the "
                                   "remaining domains needs no retraining.")
    p.add_argument("--moa", required=True, help="input MoA checkpoint")
    p.add_argument("--domain", required=True, help="the domain to remove")
    p.add_argument("--out", required=True, help="output MoA checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an MoA checkpoint at --out")
    p.set_defaults(func=_cmd_remove)

    p = sub.add_parser("retrain-expert", help="retrain one expert (others untouched), then re-fit the routers",
                       description="Continue training one domain's expert on its records with every other expert "
                                   "and the routers frozen (into OUT/retrain), then re-fit the routers briefly on a "
                                   "balanced replay when --data holds every domain. The checkpoint keeps its eta.")
    p.add_argument("--moa", required=True, help="input MoA checkpoint")
    p.add_argument("--domain", required=True, help="the domain whose expert is retrained")
    p.add_argument("--data", required=True, help="JSONL with the domain's records (and others for the router re-fit)")
    p.add_argument("--out", required=True, help="output MoA checkpoint directory")
    p.add_argument("--router-steps", type=int, default=30, help="steps of the router re-fit")
    p.add_argument("--router-lr", type=float, default=3e-3, help="learning rate of the routers")
    p.add_argument("--base", default=None, help="override the base model recorded in the checkpoint "
                   "(default: the recorded one)")
    add_train_args(p, lr=2e-4, default_steps=60, steps_help="steps of the expert's training")
    p.set_defaults(func=_cmd_retrain)


def _cmd_add(args) -> int:
    from moa.incremental import add_expert

    cfg = config_from_args(args)
    s = add_expert(moa_dir=args.moa, domain=args.domain, out=args.out, adapter=args.adapter,
                   train_data=args.train_data, data=args.data, cfg=cfg,
                   expert_cfg=replace(cfg, max_steps=args.expert_steps, epochs=None, lr=args.expert_lr),
                   tune_new_expert=args.tune_new_expert, router_lr=args.router_lr, base=args.base,
                   resume=args.resume, overwrite=args.overwrite, skip_invalid=args.skip_invalid)
    print(json.dumps(s))
    return 130 if s.get("interrupted") else 0


def _cmd_remove(args) -> int:
    from moa.incremental import remove_expert

    print(json.dumps(remove_expert(moa_dir=args.moa, domain=args.domain, out=args.out, overwrite=args.overwrite)))
    return 0


def _cmd_retrain(args) -> int:
    from moa.incremental import retrain_expert

    s = retrain_expert(moa_dir=args.moa, domain=args.domain, data=args.data, out=args.out,
                       cfg=config_from_args(args), router_steps=args.router_steps, router_lr=args.router_lr,
                       base=args.base, resume=args.resume, overwrite=args.overwrite, skip_invalid=args.skip_invalid)
    print(json.dumps(s))
    return 130 if s.get("interrupted") else 0
