"""`moa serve`: the OpenAI-compatible HTTP server (the server itself is `moa.serve`)."""

from __future__ import annotations

import os
import sys

from moa.cli.options import add_device_args, add_fallback_arg, check_server_args, warn_if_open

def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve an MoA checkpoint over HTTP with the OpenAI API: POST /v1/chat/completions "
                    "(stream: true for server-sent events), POST /v1/completions, GET /v1/models, GET /health. "
                    "Model 'moa' routes each request automatically (to the base model when the checkpoint's "
                    "calibrated fallback finds the prompt out of domain: moa.domain null, moa.fallback true); "
                    "'moa:<domain>' forces that expert; 'base' answers without any expert. GET / is a playground page showing the routers at work. "
                    "Requests join and leave the running batch at every decode step (each with its own expert and "
                    "sampling parameters) and stream token by token. POST /v1/admin/reload {\"path\": DIR} swaps "
                    "in another checkpoint without dropping requests; GET /metrics is Prometheus text.",
    )
    p.add_argument("--moa", required=True, help="MoA checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("MOA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOA_API_KEY, else no key)")
    p.add_argument("--max-batch-size", type=int, default=8, help="most requests decoded together (default: 8)")
    p.add_argument("--max-batch-tokens", type=int, default=2048,
                   help="token budget of one decode step: the prompts admitted in it plus one per running request; "
                        "a longer prompt runs alone (default: 2048)")
    p.add_argument("--scheduler", choices=["continuous", "static"], default="continuous",
                   help="continuous (default): requests join and leave at every decode step; static: the former "
                        "batcher (one generate call per batch of equal decoding parameters), kept to compare with")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting; beyond it clients get 503 with Retry-After (default: 64)")
    p.add_argument("--max-new-tokens-limit", type=int, default=1024,
                   help="largest max_tokens a request may ask for, and the chat default (default: 1024)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the model's context length)")
    p.add_argument("--route-layers", type=int, default=None, metavar="K",
                   help="routed requests ('moa') are decided by the routers of the first K layers (default: all)")
    add_fallback_arg(p)
    add_device_args(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import uvicorn

    from moa.model import MoAModel
    from moa.serve import create_app

    check_server_args(args, ("max_batch_size", "max_batch_tokens", "max_queue", "max_new_tokens_limit",
                             "max_prompt_tokens"))
    model = MoAModel.from_pretrained(args.moa)  # on --device, base in --dtype (moa.cli runs us in that placement)
    if args.route_layers is not None:
        model.route_layers = args.route_layers  # outside 1..L: a one-line error
    from moa.fallback import set_fallback

    set_fallback(model, args.fallback)  # also applied to a checkpoint hot-reloaded later
    device = model.device
    app = create_app(model, api_key=args.api_key, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                     max_new_tokens_limit=args.max_new_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                     scheduler=args.scheduler, max_batch_tokens=args.max_batch_tokens)
    warn_if_open("moa serve", args)
    print(f"moa serve: {args.moa} on {device} ({', '.join(model.domains)}); "
          f"http://{args.host}:{args.port}/v1 (models: moa, moa:<domain>, base); fallback: "
          f"{'off' if model.fallback is None else model.fallback.method + ' > ' + format(model.fallback.threshold, '.4g')}; "
          f"playground: http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
