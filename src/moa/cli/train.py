"""`moa train-expert` (stage 1), `moa train` (stage 2) and `moa baseline` (the comparison systems)."""

from __future__ import annotations

import json

from moa.base import DEFAULT_BASE
from moa.cli.options import add_device_args, add_train_args, config_from_args
from moa.stages import DEFAULT_TARGETS, is_main_process, parse_targets


def _add_lora_args(p) -> None:
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"base model: '{DEFAULT_BASE}', a local checkpoint dir or a hub id (org/name)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module names to adapt")


def register(sub) -> None:
    p = sub.add_parser(
        "train-expert",
        help="stage 1: train one LoRA expert on one domain's records",
        description="Stage 1 of MoA: train a LoRA adapter on the records of one domain and write a "
                    "standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors), "
                    "train_log.jsonl, train_config.json and loss.png.",
    )
    p.add_argument("--data", required=True, help="training JSONL file")
    p.add_argument("--domain", required=True, help="domain whose records are used")
    p.add_argument("--out", required=True, help="output directory (the PEFT adapter)")
    _add_lora_args(p)
    p.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="start from this LoRA adapter (same rank, alpha, targets) instead of a fresh init, "
                        "e.g. a seed LoRA trained on all domains (default: fresh LoRA init)")
    p.add_argument("--interpolate", type=float, default=1.0, metavar="T",
                   help="with --init-adapter: write init + T x (trained - init), each LoRA matrix averaged in "
                        "weight space with the start (1: the trained weights; they are kept in OUT/trained either "
                        "way)")
    p.add_argument("--lr-scaling", choices=["none", "tokens"], default="none",
                   help="tokens: --lr is the lr of one LoRA on all of --data; this expert's lr is scaled by "
                        "sqrt(its label tokens per row / the mean over all the data) (square-root rule for Adam)")
    add_train_args(p)
    _add_per_domain_arg(p)
    p.set_defaults(func=_cmd_train_expert)

    p = sub.add_parser(
        "train",
        help="stage 2: train routers and experts jointly on domain-balanced mixed batches",
        description="Stage 2 of MoA: every row goes through its own domain's expert in all layers "
                    "(explicit routing) in one forward; loss = LM loss + eta * mean over layers of the "
                    "routers' cross-entropy against the domain label. Writes a complete MoA checkpoint.",
    )
    p.add_argument("--moa", required=True, help="input MoA checkpoint (from `moa assemble`)")
    p.add_argument("--data", required=True, help="training JSONL with records of every domain")
    p.add_argument("--out", required=True, help="output MoA checkpoint directory")
    _add_stage2_args(p)
    add_train_args(p, lr=1e-4)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "baseline",
        help="train a comparison system: mixed-lora, moe-lora or classifier",
        description="Train one of the systems MoA is compared with (docs/RESULTS.md); each writes what "
                    "`moa eval` takes: mixed-lora a PEFT adapter (eval --mixed-lora DIR), moe-lora and "
                    "classifier a directory for eval --systems NAME=DIR.",
    )
    kinds = p.add_subparsers(dest="baseline", metavar="KIND", required=True)
    b = kinds.add_parser(
        "mixed-lora", help="one LoRA on all domains' records in their natural proportions",
        description="Single-LoRA on the mixed data: one PEFT LoRA adapter trained on every record of --data "
                    "(the paper's main baseline; give it the same steps as MoA's stage 1 + stage 2).")
    b.add_argument("--data", required=True, help="training JSONL with records of every domain")
    b.add_argument("--out", required=True, help="output directory (the PEFT adapter)")
    _add_lora_args(b)
    add_train_args(b)
    _add_per_domain_arg(b)
    b.set_defaults(func=_cmd_mixed_lora)

    b = kinds.add_parser(
        "moe-lora", help="the same experts mixed per token by learned top-k gates, no domain labels",
        description="MoE-LoRA (MixLoRA / LoRAMoE style): starts from an assembled MoA checkpoint's experts, "
                    "learns token-level top-k gates in every layer with a load-balance loss, no labels.")
    b.add_argument("--moa", required=True, help="assembled MoA checkpoint whose experts start the mixture")
    b.add_argument("--data", required=True, help="training JSONL with records of every domain")
    b.add_argument("--out", required=True, help="output directory (eval --systems moe_lora=OUT)")
    b.add_argument("--top-k", type=int, default=2, help="experts mixed per token")
    b.add_argument("--balance-coef", type=float, default=0.01, help="weight of the load-balance loss")
    b.add_argument("--gate-lr", type=float, default=1e-3, help="learning rate of the gates")
    add_train_args(b, lr=1e-4)
    b.set_defaults(func=_cmd_moe_lora)

    b = kinds.add_parser(
        "classifier", help="a prompt classifier on the frozen base that picks one stage-1 expert",
        description="Classifier + LoRAs: logistic regression on the frozen base's pooled prompt states "
                    "chooses one expert of --moa per request (no router inside the model).")
    b.add_argument("--moa", required=True, help="MoA checkpoint whose experts the classifier chooses from")
    b.add_argument("--data", required=True, help="labelled JSONL with records of every domain")
    b.add_argument("--out", required=True, help="output directory (eval --systems classifier_loras=OUT)")
    b.add_argument("--per-domain", type=int, default=200, help="training prompts per domain")
    b.add_argument("--steps", type=int, default=300, help="optimizer steps of the classifier")
    b.add_argument("--seed", type=int, default=0, help="seed for the choice of prompts")
    b.add_argument("--overwrite", action="store_true", help="replace an OUT that holds another classifier")
    b.add_argument("--skip-invalid", action="store_true", help="skip bad JSONL lines instead of stopping")
    add_device_args(b)
    b.set_defaults(func=_cmd_classifier)


def _add_stage2_args(p) -> None:
    p.add_argument("--eta", type=float, default=0.1,
                   help="weight of the router loss (default 0.1: the best of 0 / 0.1 / 1 / 10 on the demo's "
                        "valid split, docs/RESULTS.md; larger values pulled the experts away from their LM loss)")
    p.add_argument("--init", choices=["experts", "random"], default="experts",
                   help="start from the stage-1 experts or from random LoRA init (ablation)")
    p.add_argument("--router-only", action="store_true", help="train only the routers; experts stay bitwise equal")
    p.add_argument("--router-lr", type=float, default=1e-3, help="learning rate of the routers")
    p.add_argument("--base", default=None, help="override the base model recorded in the checkpoint "
                   "(default: the recorded one)")
    p.add_argument("--expert-lr-scaling", choices=["none", "tokens"], default="none",
                   help="tokens: --lr is the lr of one LoRA on all the data; each expert's lr is scaled by "
                        "sqrt(its share of the batch x its label tokens per row / the mean over all the data)")
    p.add_argument("--detach-router-inputs", action="store_true",
                   help="the routers read detached hidden states: the router loss trains the routers only")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the experts' input during training")
    p.add_argument("--length-window", type=int, default=1, metavar="W",
                   help="regroup the domain-balanced batches of every W steps by length (less padding; each "
                        "domain's share holds per W steps instead of per batch) (default 1: off)")


def _report(summary: dict) -> int:
    if summary.get("interrupted"):
        return 130
    if is_main_process():
        print(json.dumps(summary))
    return 0


def _add_per_domain_arg(p) -> None:
    p.add_argument("--keep-best-per-domain", action="store_true",
                   help="also validate each domain of --eval-data on its own and write, for each, the weights of "
                        "its lowest validation loss to OUT/best_by_domain/<domain>/ (a PEFT adapter; `moa fit` "
                        "starts each expert from its domain's)")


def _cmd_train_expert(args) -> int:
    from moa.stages import train_expert

    return _report(train_expert(
        data=args.data, domain=args.domain, out=args.out, base=args.base, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, targets=parse_targets(args.targets),
        cfg=config_from_args(args, keep_best_per_domain=args.keep_best_per_domain),
        resume=args.resume, overwrite=args.overwrite, skip_invalid=args.skip_invalid,
        init_adapter=args.init_adapter, lr_scaling=args.lr_scaling, interpolate=args.interpolate,
    ))


def _cmd_train(args) -> int:
    from moa.stages import train_mixture

    return _report(train_mixture(
        moa_dir=args.moa, data=args.data, out=args.out, eta=args.eta, init=args.init,
        router_only=args.router_only, router_lr=args.router_lr, cfg=config_from_args(args), resume=args.resume,
        overwrite=args.overwrite, skip_invalid=args.skip_invalid, base=args.base,
        expert_lr_scaling=args.expert_lr_scaling, router_loss_to_experts=not args.detach_router_inputs,
        lora_dropout=args.lora_dropout, length_window=args.length_window,
    ))


def _cmd_mixed_lora(args) -> int:
    from moa.stages import train_expert

    return _report(train_expert(
        data=args.data, domain=None, out=args.out, base=args.base, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, targets=parse_targets(args.targets),
        cfg=config_from_args(args, keep_best_per_domain=args.keep_best_per_domain),
        resume=args.resume, overwrite=args.overwrite, skip_invalid=args.skip_invalid,
    ))


def _cmd_moe_lora(args) -> int:
    from moa.baselines import train_moe_lora
    from moa.stages import load_training_records

    records = load_training_records(args.data, None, args.skip_invalid)
    return _report(train_moe_lora(moa_dir=args.moa, records=records, out=args.out, cfg=config_from_args(args),
                                  balance_coef=args.balance_coef, top_k=args.top_k, gate_lr=args.gate_lr,
                                  overwrite=args.overwrite))


def _cmd_classifier(args) -> int:
    from moa.baselines import train_classifier
    from moa.stages import load_training_records

    records = load_training_records(args.data, None, args.skip_invalid)
    return _report(train_classifier(moa_dir=args.moa, records=records, out=args.out, per_domain=args.per_domain,
                                    steps=args.steps, seed=args.seed, overwrite=args.overwrite))
