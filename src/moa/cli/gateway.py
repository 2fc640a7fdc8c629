"""`moa gateway`: the MoA routers in front of OpenAI-compatible LoRA servers (the app is `moa.gateway`)."""

from __future__ import annotations

import os
import sys

from moa.cli.options import add_device_args, check_server_args, warn_if_open, add_fallback_arg
from moa.errors import MoAError

DEFAULT_ROUTE_LAYERS = 4
"""Chosen from docs/RESULTS.md 'Gateway': on the demo test split the vote of the first 4 routers
routes as well as all 30 layers do, for ~1/10 of the routing pass's cost (layers run: K - 1)."""


def register(sub) -> None:
    p = sub.add_parser(
        "gateway",
        help="route requests with the MoA routers and forward them to vLLM or another OpenAI-compatible server",
        description="An OpenAI-compatible front door (POST /v1/chat/completions, POST /v1/completions, GET "
                    "/v1/models, GET /health). It runs only the routing part of the MoA (the embeddings and the "
                    "first --route-layers decoder layers with their routers, over the prompt; no decoding), picks "
                    "the domain, and forwards the request to an --upstream with 'model' set to the domain's "
                    "adapter name (--upstream-model-template). Model 'moa' is routed, 'moa:<domain>' forces a "
                    "domain; answers carry moa: {domain, router_probs, routing}. Streams pass through chunk by "
                    "chunk; upstream errors pass through with their status; an upstream that cannot be reached "
                    "is skipped for --upstream-cooldown seconds, and 502 when none can be.",
    )
    p.add_argument("--moa", required=True, help="MoA checkpoint directory (only its routing part is loaded)")
    p.add_argument("--upstream", action="append", required=True, metavar="URL",
                   help="base URL of an OpenAI-compatible server, e.g. http://gpu1:8000 or http://gpu1:8000/v1; "
                        "repeat for several (used round-robin)")
    p.add_argument("--upstream-model-template", default="{domain}",
                   help="the upstream's model name of a domain: '{domain}' for vLLM --lora-modules <domain>=..., "
                        "'moa:{domain}' for moa serve (default: {domain})")
    p.add_argument("--upstream-base-model", default=None, metavar="NAME",
                   help="the upstream's model name of the base model with no LoRA, where the out-of-domain "
                        "fallback sends prompts (vLLM: its --served-model-name or model path). Default: 'base' for "
                        "a 'moa:{domain}' template (moa serve), else the template without '{domain}' and the "
                        "separators around it ('llama-{domain}' -> 'llama'); required when that leaves nothing "
                        "('{domain}') and the fallback is on")
    p.add_argument("--route-layers", type=int, default=None, metavar="K",
                   help=f"decide from the routers of the first K layers; only the embeddings and those layers are "
                        f"loaded and run, and up to the layer the checkpoint's distance fallback reads when it is on "
                        f"(0: all layers; default: {DEFAULT_ROUTE_LAYERS}, or all if the model has fewer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=9000, help="TCP port (default: 9000)")
    p.add_argument("--api-key", default=os.environ.get("MOA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOA_API_KEY, else no key)")
    p.add_argument("--upstream-api-key", default=os.environ.get("MOA_UPSTREAM_API_KEY"),
                   help="send 'Authorization: Bearer KEY' to the upstreams (default: $MOA_UPSTREAM_API_KEY, else none)")
    p.add_argument("--upstream-timeout", type=float, default=600.0,
                   help="seconds to wait for an upstream's answer, or between two chunks of a stream (default: 600)")
    p.add_argument("--upstream-cooldown", type=float, default=30.0,
                   help="seconds an upstream that cannot be reached is skipped (default: 30)")
    p.add_argument("--max-batch-size", type=int, default=16, help="most prompts routed in one pass (default: 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="most prompts waiting to be routed; beyond it clients get 503 (default: 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: no limit here; the upstream has its own)")
    add_fallback_arg(p)
    add_device_args(p)
    p.set_defaults(func=_cmd_gateway)


def _cmd_gateway(args) -> int:
    import uvicorn

    from moa.checkpoint import MoAConfig, load_routing_part
    from moa.gateway import Upstreams, check_template, create_gateway_app
    from moa.model import MoAModel

    check_server_args(args, ("max_batch_size", "max_queue", "max_prompt_tokens"))
    if not args.upstream_timeout > 0:
        raise MoAError(f"--upstream-timeout must be > 0, got {args.upstream_timeout}")
    check_template(args.upstream_model_template)
    upstreams = Upstreams(args.upstream, args.upstream_cooldown)
    cfg = MoAConfig.read(args.moa)
    total = _num_layers(cfg)
    K = args.route_layers
    if K is None:
        K = DEFAULT_ROUTE_LAYERS if total is None else min(DEFAULT_ROUTE_LAYERS, total)
    if K < 0 or (total is not None and K > total):
        raise MoAError(f"--route-layers must be 0 (all) or 1..{total or 'the number of layers'}, got {K}")
    K = K or None  # 0: all layers
    # The distance fallback reads the input of its layer: load up to it, the routers still decide from K.
    fallback_layer = (cfg.fallback or {}).get("layer") if args.fallback != "off" else None
    load = None if K is None or fallback_layer is None else max(K, fallback_layer + 1)
    model = load_routing_part(MoAModel, args.moa, load or K)  # on --device, base in --dtype (moa.cli's placement)
    if K is not None:
        model.route_layers = K
    from moa.fallback import set_fallback

    set_fallback(model, args.fallback)
    device = model.device
    app = create_gateway_app(model, upstreams, template=args.upstream_model_template, api_key=args.api_key,
                             upstream_api_key=args.upstream_api_key, timeout_s=args.upstream_timeout,
                             max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                             max_prompt_tokens=args.max_prompt_tokens, upstream_base_model=args.upstream_base_model)
    warn_if_open("moa gateway", args)
    print(f"moa gateway: {args.moa}, routers of {model.route_layers}/{total or model.route_layers} layers on {device} "
          f"(fallback: {'off' if model.fallback is None else f'{model.fallback.method}, layer {model.fallback.layer}'}) "
          f"({', '.join(model.domains)}) -> {', '.join(upstreams.urls)} as '{args.upstream_model_template}'; "
          f"http://{args.host}:{args.port}/v1 (models: moa, moa:<domain>)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _num_layers(cfg) -> int | None:
    return (cfg.base_signature or {}).get("num_hidden_layers") or cfg.router.get("num_layers")
