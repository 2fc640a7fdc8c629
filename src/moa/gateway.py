"""`moa gateway`: the MoA routers in front of vLLM, or of any OpenAI-compatible LoRA server.

    moa gateway --moa runs/moa --upstream http://gpu1:8000 --upstream http://gpu2:8000 --port 9000
    # client: {"model": "moa", "messages": [...]}  ->  upstream gets {"model": "<domain>", ...}

The gateway runs only the routing part of the MoA: the embeddings and the first K decoder layers
with their routers (`moa.checkpoint.load_routing_part`, K = --route-layers), over the prompt,
with no decoding. From the routers' decision it picks the domain and forwards the request
unchanged except for `model`, which becomes the domain's adapter name on the upstream
(`--upstream-model-template`: "{domain}" for vLLM's `--lora-modules <domain>=...`,
"moa:{domain}" for `moa serve`). The upstream engine batches and decodes.

A routed prompt that the checkpoint's out-of-domain fallback (moa.fallback, `--fallback`) finds
far from every domain goes to the upstream's base model, the name it serves the model under with
no LoRA (`--upstream-base-model`; by default derived from the template, see
`default_base_model`), and the answer says `moa: {"domain": null, "fallback": true, ...}`.

- `model: "moa"` is routed; `"moa:<domain>"` forces that domain (no routing pass).
- The response is the upstream's, with `model` set back to what the client asked for and
  `moa: {domain, router_probs, routing}` added (router_probs: null when forced), as `moa serve`
  answers. `"moa": {"return_layer_probs": true}` in the request adds `moa.layer_probs`: the
  probabilities of the K routers that ran (K lists of E floats).
- Streaming passes through event by event, each chunk with `moa` added.
- Upstream answers with status >= 400 pass through with their status and body.
- Several upstreams are used round-robin. One that cannot be reached is skipped for
  --upstream-cooldown seconds and the request goes to the next; when none can be reached the
  client gets 502 naming them.

Concurrent requests are routed together: the event loop tokenizes and queues them, and one
worker thread runs a routing pass over every request queued at that moment (up to
--max-batch-size), so the routers cost one batched pass, not one pass per request.
"""


import asyncio
import collections
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from moa.errors import MoAError
from moa.serve import APIError, _APIKey, _dumps, _json_response  # one OpenAI error shape for both servers

DEFAULT_TEMPLATE = "{domain}"
"""vLLM serves `--lora-modules sql=/path` under the model name `sql`."""
COOLDOWN_S = 30.0
CONNECT_TIMEOUT_S = 5.0
BATCH_WAIT_MS = 2.0
RETRY_AFTER_S = 1
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


# --------------------------------------------------------------------------- upstreams


def upstream_base(url: str) -> str:
    """The base URL of an OpenAI-compatible server: http(s)://host[:port][/prefix], without a
    trailing /v1 (both http://h:8000 and http://h:8000/v1 are accepted)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise MoAError(f"upstream {url!r} is not an http(s) URL like http://host:8000 or http://host:8000/v1")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{parts.scheme}://{parts.netloc}{path}"


def model_name(template: str, domain: str) -> str:
    """The upstream's model name of `domain` from a template such as "{domain}" or "moa:{domain}"."""
    try:
        return template.format(domain=domain)
    except (KeyError, IndexError, ValueError) as e:
        raise MoAError(f"--upstream-model-template {template!r} is not a valid template with the one "
                       f"field {{domain}} ({type(e).__name__}: {e})") from None


def default_base_model(template: str) -> str | None:
    """The upstream's name of the base model (no LoRA) guessed from the domain template:
    "moa:{domain}" (moa serve) -> "base"; otherwise the template without "{domain}" and the
    separators around it ("llama-{domain}" -> "llama"); None when nothing is left ("{domain}",
    vLLM: its base model's name is its --served-model-name, which the gateway cannot know)."""
    if template.startswith("moa:"):
        return "base"
    return template.replace("{domain}", "").strip(" :/-_.@") or None


def check_template(template: str) -> None:
    if "{domain}" not in template:
        raise MoAError(f"--upstream-model-template {template!r} must contain {{domain}} (e.g. '{{domain}}' for "
                       "vLLM, 'moa:{domain}' for moa serve)")
    model_name(template, "x")


class Upstreams:
    """Round-robin over upstream base URLs; one that failed is skipped for `cooldown_s`.

    Args:
        urls: base URLs (see `upstream_base`).
        cooldown_s: how long an upstream that could not be reached is skipped.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, urls: list[str], cooldown_s: float = COOLDOWN_S, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise MoAError("the gateway needs at least one --upstream")
        if cooldown_s < 0:
            raise MoAError(f"--upstream-cooldown must be >= 0, got {cooldown_s}")
        self.urls = [upstream_base(u) for u in urls]
        if len(set(self.urls)) != len(self.urls):
            raise MoAError(f"an upstream is given twice: {', '.join(urls)}")
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._next = 0
        self._down_until = dict.fromkeys(self.urls, 0.0)

    def order(self) -> list[str]:
        """Every upstream, in the order to try them for one request: the available ones round-robin
        from the next in turn, then the skipped ones, soonest back first (so a request is still
        tried everywhere when all are marked down)."""
        n = len(self.urls)
        turn = [self.urls[(self._next + i) % n] for i in range(n)]
        now = self.clock()
        up = [u for u in turn if self._down_until[u] <= now]
        down = sorted((u for u in turn if self._down_until[u] > now), key=self._down_until.get)
        # The turn passes the one chosen, so skipped upstreams do not give their turns to one neighbour.
        self._next = (self.urls.index((up or down)[0]) + 1) % n
        return up + down

    def failed(self, url: str) -> None:
        self._down_until[url] = self.clock() + self.cooldown_s

    def succeeded(self, url: str) -> None:
        """`url` answered: it is available, and the next turn is its neighbour's (not the upstream
        after one that failed, which would then serve twice in a row)."""
        self._down_until[url] = 0.0
        self._next = (self.urls.index(url) + 1) % len(self.urls)

    def state(self) -> list[dict]:
        now = self.clock()
        return [{"url": u, "available": self._down_until[u] <= now,
                 "retry_in_s": round(max(0.0, self._down_until[u] - now), 1)} for u in self.urls]


# --------------------------------------------------------------------------- routing


@dataclass
class Route:
    """What the routers decided for one prompt."""

    domain: str | None
    """None: the fallback chose the base model."""
    router_probs: dict[str, float]
    """{domain: probability} of the decision (vote: mean over the K routers; last: router K's)."""
    layer_probs: list[list[float]]
    """(K, E) every router's probabilities."""


class RoutingQueue:
    """Routes tokenized prompts in batches on one worker thread (the model is not thread-safe:
    its routing hooks are per model).

    Args:
        model: a MoAModel (typically `load_routing_part`'s); its routing_default (vote or last)
            and route_layers decide.
        max_batch_size: most prompts per routing pass.
        max_queue: most prompts waiting; more are refused (QueueFull).
        batch_wait_ms: how long a pass waits for more prompts once one has arrived.
    """

    def __init__(self, model, max_batch_size: int = 16, max_queue: int = 256, batch_wait_ms: float = BATCH_WAIT_MS):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise MoAError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.wait_s = batch_wait_ms / 1000
        self.how = "last" if model.routing_default == "last" else "vote"
        self.stats = {"passes": 0, "routed": 0, "max_batch": 0, "busy_s": 0.0}
        self._pending: collections.deque[tuple[list[int], asyncio.Future]] = collections.deque()
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moa-gateway-router")

    @property
    def depth(self) -> int:
        return len(self._pending)

    async def route(self, token_ids: list[int]) -> Route:
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"the routing queue is full ({self.max_queue} waiting); retry later")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((token_ids, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)  # let concurrent requests join this pass
            batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            batch = [(ids, f) for ids, f in batch if not f.done()]  # a client that left is not routed
            if not batch:
                continue
            start = time.perf_counter()
            try:
                routes = await loop.run_in_executor(self._executor, self._route_batch, [ids for ids, _ in batch])
            except Exception as e:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.stats["passes"] += 1
            self.stats["routed"] += len(batch)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            self.stats["busy_s"] += time.perf_counter() - start
            for (_, f), r in zip(batch, routes):
                if not f.done():
                    f.set_result(r)

    def _route_batch(self, rows: list[list[int]]) -> list[Route]:
        import torch

        from moa.router import layer_probs

        model = self.model
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)  # (B, T) left padded, as generate pads
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r, dtype=torch.long), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        with torch.inference_mode():
            expert_ids, probs, logits = model._route(ids, mask, mask.bool(), position_ids, self.how)
        per_layer = layer_probs(logits).transpose(0, 1).tolist()  # (B, K, E)
        names = model.domain_names(expert_ids)
        return [Route(names[i], dict(zip(model.domains, probs[i].tolist())), per_layer[i]) for i in range(len(rows))]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class QueueFull(Exception):
    pass


# --------------------------------------------------------------------------- errors and requests


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def prompt_messages(body: dict, path: str) -> list[dict]:
    """The conversation the routers read, rendered as `moa serve` renders it: chat messages as
    they are (text parts joined by newlines, developer -> system), a completion prompt as one
    user turn. Only what routing needs is checked; the upstream checks the rest."""
    if path == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages.{i} must be an object with a string role", f"messages.{i}")
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise _bad(f"messages.{i}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                               "supported", f"messages.{i}.content")
                content = "\n".join(p["text"] for p in content)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise _bad(f"messages.{i}.content must be a string or a list of text parts", f"messages.{i}.content")
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt must be a string (one prompt per request)", "prompt")
        out = [{"role": "user", "content": prompt}]
    if not any(m["content"].strip() for m in out):
        raise _bad("the prompt is empty", "messages" if path == CHAT else "prompt", "empty_prompt")
    return out


def _layer_probs_asked(body: dict) -> bool:
    options = body.get("moa")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"return_layer_probs"} or not isinstance(
            options.get("return_layer_probs", False), bool):
        raise _bad('moa is an object whose only key is return_layer_probs, e.g. {"return_layer_probs": true}', "moa")
    return bool(options.get("return_layer_probs"))


# --------------------------------------------------------------------------- the app


class _Gateway:
    """What the endpoints share: the routing model and its queue, the upstreams, an HTTP client."""

    def __init__(self, model, upstreams: Upstreams, *, template: str, upstream_api_key: str | None,
                 timeout_s: float, max_prompt_tokens: int | None, queue: RoutingQueue,
                 base_model: str | None = None):
        check_template(template)
        self.base_model = base_model or default_base_model(template)
        if getattr(model, "fallback", None) is not None and not self.base_model:
            raise MoAError(f"the out-of-domain fallback is on, but the upstream's name of the base model cannot be "
                           f"guessed from --upstream-model-template {template!r}: pass --upstream-base-model NAME "
                           "(e.g. vLLM's --served-model-name) or --fallback off")
        if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise MoAError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}")
        self.model = model
        self.domains = list(model.domains)
        self.tokenizer = model.tokenizer  # used on the event loop only; the worker gets token ids
        self.upstreams = upstreams
        self.template = template
        self.headers = {"Authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else {}
        self.timeout_s = timeout_s
        self.max_prompt_tokens = max_prompt_tokens
        self.queue = queue
        self.client = None
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        return ["moa"] + [f"moa:{d}" for d in self.domains]

    def forced_domain(self, name) -> str | None:
        if name == "moa":
            return None
        if isinstance(name, str) and name.startswith("moa:") and name[4:] in self.domains:
            return name[4:]
        raise APIError(404, f"the model {name!r} does not exist here; available: {', '.join(self.model_ids())}",
                           param="model", code="model_not_found")

    def tokenize(self, messages: list[dict], param: str) -> list[int]:
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        except Exception as e:  # the template rejects the conversation, or the text cannot be encoded
            raise _bad(f"cannot render the prompt with the model's chat template: {e}", param, "invalid_prompt")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise _bad(f"the prompt has {len(ids)} tokens, more than this gateway's limit of {self.max_prompt_tokens}",
                       param, "context_length_exceeded")
        return ids

    async def decide(self, body: dict, path: str) -> dict:
        """The `moa` field of the answer: {domain, router_probs, routing[, layer_probs]}."""
        forced = self.forced_domain(body.get("model"))
        want_layers = _layer_probs_asked(body)
        if forced is not None and not want_layers:
            return {"domain": forced, "router_probs": None, "routing": "explicit", "fallback": False}
        messages = prompt_messages(body, path)
        ids = self.tokenize(messages, "messages" if path == CHAT else "prompt")
        try:
            route = await self.queue.route(ids)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except MoAError as e:
            raise _bad(str(e), code="invalid_request") from None
        if forced is not None:  # the routers only report what they would have chosen
            info = {"domain": forced, "router_probs": None, "routing": "explicit"}
        else:
            info = {"domain": route.domain, "router_probs": route.router_probs, "routing": self.queue.how}
        info["fallback"] = forced is None and route.domain is None
        if want_layers:
            info["layer_probs"] = route.layer_probs
        return info

    async def send(self, path: str, body: dict, stream: bool):
        """(upstream URL, httpx response) from the first upstream that answers, in round-robin
        order; an upstream that cannot be reached is marked down and the next one is tried."""
        import httpx

        tried = []
        for url in self.upstreams.order():
            request = self.client.build_request("POST", url + path, json=body, headers=self.headers)
            try:
                response = await self.client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # Nothing was sent: trying the next upstream cannot run the request twice.
                self.upstreams.failed(url)
                tried.append(f"{url} ({type(e).__name__}: {e or 'no answer'})")
                continue
            except httpx.TimeoutException:
                raise APIError(504, f"the upstream {url} did not answer within {self.timeout_s:g} s",
                                   type="server_error", code="upstream_timeout") from None
            except httpx.HTTPError as e:
                self.upstreams.failed(url)
                raise APIError(502, f"the upstream {url} failed: {type(e).__name__}: {e}",
                                   type="server_error", code="upstream_error") from None
            self.upstreams.succeeded(url)
            return url, response
        raise APIError(502, "cannot reach any upstream: " + "; ".join(tried), type="server_error",
                           code="upstream_unreachable")


async def _passthrough(response):
    """An upstream error answer, with its status and body."""
    from starlette.responses import Response

    content = await response.aread()
    await response.aclose()
    return Response(content, response.status_code, media_type=response.headers.get("content-type"))


def create_gateway_app(model, upstreams: list[str] | Upstreams, *, template: str = DEFAULT_TEMPLATE,
                       api_key: str | None = None, upstream_api_key: str | None = None,
                       timeout_s: float = 600.0, cooldown_s: float = COOLDOWN_S, max_batch_size: int = 16,
                       max_queue: int = 256, max_prompt_tokens: int | None = None,
                       batch_wait_ms: float = BATCH_WAIT_MS, upstream_base_model: str | None = None):
    """The gateway's ASGI app.

    Args:
        model: a MoAModel that routes (`load_routing_part(MoAModel, dir, K)`, or a full one).
        upstreams: base URLs of OpenAI-compatible servers (or an `Upstreams`).
        template: the upstream model name of a domain, with the field {domain}.
        api_key: if set, /v1/* requires `Authorization: Bearer <api_key>` (/health stays open).
        upstream_api_key: sent to the upstreams as `Authorization: Bearer ...`.
        timeout_s: the longest wait for an upstream's answer (a stream: between two chunks).
        cooldown_s: how long an upstream that cannot be reached is skipped.
        max_batch_size / max_queue / batch_wait_ms: the routing queue (see `RoutingQueue`).
        max_prompt_tokens: longest prompt accepted, in tokens after the chat template (None: no
            limit here; the upstream applies its own).
        upstream_base_model: the upstream's model name of the base model with no LoRA, where the
            fallback sends out-of-domain prompts (default: `default_base_model(template)`; needed
            when that is None and the model's fallback is on).
    """
    import httpx
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse

    if not isinstance(upstreams, Upstreams):
        upstreams = Upstreams(list(upstreams), cooldown_s)
    if timeout_s <= 0:
        raise MoAError(f"the upstream timeout must be > 0 seconds, got {timeout_s}")
    queue = RoutingQueue(model, max_batch_size, max_queue, batch_wait_ms)
    gw = _Gateway(model, upstreams, template=template, upstream_api_key=upstream_api_key, timeout_s=timeout_s,
                  max_prompt_tokens=max_prompt_tokens, queue=queue, base_model=upstream_base_model)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            gw.client = client
            try:
                yield
            finally:
                queue.close()

    app = FastAPI(title="moa gateway", description="MoA routers in front of OpenAI-compatible LoRA servers",
                  lifespan=lifespan)
    app.state.gateway = gw
    if api_key:
        app.add_middleware(_APIKey, key=api_key)

    @app.exception_handler(APIError)
    async def _error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None)).response()

    @app.get("/health")
    async def health():
        return _json_response({"status": "ok", "domains": gw.domains, "route_layers": model.route_layers,
                               "routing": queue.how, "upstreams": upstreams.state(),
                               "upstream_model_template": template, "upstream_base_model": gw.base_model,
                               "fallback": None if model.fallback is None else model.fallback.method,
                               "queue": queue.depth, **queue.stats})

    @app.get("/v1/models")
    async def models():
        return _json_response({"object": "list", "data": [_model_card(m, gw.created) for m in gw.model_ids()]})

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        gw.forced_domain(model_id)
        return _json_response(_model_card(model_id, gw.created))

    async def forward(request: Request, path: str):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the body is not valid JSON ({e})", code="json_invalid") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object with the request's fields")
        if not isinstance(body.get("model"), str):
            raise _bad("model must be a string: 'moa' (routed) or 'moa:<domain>'", "model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream must be a boolean", "stream")
        info = await gw.decide(body, path)
        asked = body["model"]
        upstream_body = {k: v for k, v in body.items() if k != "moa"}  # our field: the upstream may refuse it
        upstream_body["model"] = gw.base_model if info["fallback"] else model_name(template, info["domain"])
        url, response = await gw.send(path, upstream_body, stream)
        if response.status_code >= 400:
            return await _passthrough(response)
        if not stream:
            try:
                answer = response.json()
            except ValueError:
                raise APIError(502, f"the upstream {url} answered with a body that is not JSON",
                                   type="server_error", code="upstream_error") from None
            if not isinstance(answer, dict):
                raise APIError(502, f"the upstream {url} answered with JSON that is not an object",
                                   type="server_error", code="upstream_error")
            return _json_response({**answer, "model": asked, "moa": info})
        # layer_probs (K x E floats) go in the first chunk only, as moa serve sends them.
        brief = {k: v for k, v in info.items() if k != "layer_probs"}
        return StreamingResponse(_relay(response, url, asked, info, brief), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post(CHAT)
    async def chat_completions(request: Request):
        return await forward(request, CHAT)

    @app.post(COMPLETIONS)
    async def completions(request: Request):
        return await forward(request, COMPLETIONS)

    return app


async def _relay(response, url: str, asked: str, first: dict, brief: dict):
    """The upstream's server-sent events, one by one, each JSON chunk with `model` and `moa` set."""
    import httpx

    info = first
    try:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                if payload and payload != "[DONE]":
                    with contextlib.suppress(ValueError):
                        chunk = json.loads(payload)
                        if isinstance(chunk, dict) and "error" not in chunk:
                            line = f"data: {_dumps({**chunk, 'model': asked, 'moa': info})}"
                            info = brief
            yield line + "\n"
    except httpx.HTTPError as e:
        # The status line is sent already: tell the client in the stream (OpenAI clients raise on it).
        error = APIError(502, f"the upstream {url} failed while streaming: {type(e).__name__}: {e}",
                             type="server_error", code="upstream_error")
        yield f"data: {_dumps(error.body())}\n\n"
    finally:
        await response.aclose()


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "moa"}
