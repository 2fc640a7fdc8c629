"""`moa serve`: an OpenAI-compatible HTTP server for an MoA checkpoint, with continuous batching.

    moa serve --moa runs/demo/moa --port 8000
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \
        -d '{"model": "moa", "messages": [{"role": "user", "content": "What is an ETF?"}]}'

`model: "moa"` lets the routers pick the expert (vote of all layer routers); `"moa:<domain>"`
forces one; `"base"` answers with the base model alone (no expert). Every response carries the
OpenAI fields plus `moa: {domain, router_probs, routing, fallback}` (routing: "vote", "explicit" or
"base"; domain is null for the base model; fallback is true when a routed request went to the
base model because its prompt lies far from every domain: the checkpoint's out-of-domain
fallback, see moa.fallback and `moa serve --fallback`).

An optional request field asks for more (strictly checked: unknown keys or wrong types -> 400):

    "moa": {"return_layer_probs": true}

adds `moa.layer_probs`: every layer's router probabilities on the prompt, a list of L lists of
E floats (one per layer, experts in the order of /v1/models), each summing to 1. With a forced
expert or the base model the routers still read the prompt, to show what they would have chosen;
the answer does not change. When streaming, the first chunk carries it. Clients that do not
ask get exactly the fields above.

`GET /` is the playground: a page (shipped in moa/static, no external resources) to chat with
the model, see which expert answered and each layer's router probabilities as a heatmap, force
an expert or the base model, and compare two answers side by side. The page and its assets need
no API key; the API calls it makes do.

Each request may also carry vLLM's benchmarking fields `ignore_eos` (bool: keep going after the
end-of-turn token) and `min_tokens` (int: no end-of-turn token or stop string before that many).

One worker thread owns the model (`moa.engine.Engine`, continuous batching: requests join and
leave the running batch at every decode step, each row with its own expert and sampling
parameters); requests are validated and tokenised on the event loop, which never waits on the
model. Streaming sends each step's new text as it exists (`stream_options.include_usage` adds a
last chunk with the usage); a client that disconnects frees its row at the next step.
`--scheduler static` keeps the former batcher (`Batcher`: one `MoAModel.generate` call per batch
of requests with equal decoding parameters, streamed once done) for comparison.

`POST /v1/admin/reload` with `{"path": DIR}` loads another MoA checkpoint in the background and
serves it from then on (requests already accepted finish on the model they were accepted for;
`/v1/models` lists the new domains). It needs the API key if the server has one, else it is
accepted from loopback only. `GET /metrics` is Prometheus text: requests and generated tokens per
expert, queue depth, running batch size, time to first token and end-to-end latency histograms.
"""

import asyncio
import collections
import contextlib
import copy
import json
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

from moa.engine import Decoding, Engine, Job, JobQueue, QueueFull
from moa.errors import MoAError

BATCH_WAIT_MS = 5.0
"""How long the worker waits for more requests once one has arrived (unless the batch is full)."""
DISCONNECT_POLL_S = 0.05
"""How often a waiting request checks whether its client has gone."""
RETRY_AFTER_S = 1
MAX_STOP = 4
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
BASE_MODEL = "base"
"""The model id of the base model with no expert (domains are addressed as moa:<domain>, so no clash)."""
STATIC = Path(__file__).parent / "static"
"""The playground page and its assets."""


# --------------------------------------------------------------------------- batching


class Batcher(JobQueue):
    """A bounded FIFO of `Job`s and the one worker thread that runs them through `model.generate`.

    Args:
        model: anything with MoAModel's `generate`.
        max_batch_size: most rows per generate call.
        max_queue: most jobs waiting (the running batch not counted); `submit` raises QueueFull beyond.
        batch_wait_ms: how long the worker waits for a batch to fill once the first job is there.
    """

    def __init__(self, model, max_batch_size: int = 8, max_queue: int = 64, batch_wait_ms: float = BATCH_WAIT_MS):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_ms / 1000
        self.stats = {"batches": 0, "requests": 0, "max_batch": 0, "busy_s": 0.0}
        """Completed batches, the requests in them, the largest, and seconds spent in generate."""
        super().__init__()

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _take_batch(self) -> list[Job] | None:
        """Wait for work; return the oldest job and its compatible followers ([] if all were cancelled)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self.max_batch_size > 1:
                deadline = time.monotonic() + self.batch_wait_s
                while 0 < len(self._queue) < self.max_batch_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._closed:
                return None
            if not self._queue:
                return []
            key = self._queue[0].key
            batch, rest = [], collections.deque()
            for job in self._queue:
                (batch if len(batch) < self.max_batch_size and job.key == key else rest).append(job)
            self._queue = rest
            return batch

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        self._running = len(batch)
        try:
            results = self._generate(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"generate returned {len(results)} results for {len(batch)} prompts")
        except Exception as e:
            if len(batch) > 1:  # one bad row must not fail its neighbours: retry them one by one
                for job in batch:
                    if not job.cancelled:
                        self._run([job])
                return
            self._running = 0
            self._finish(batch[0], None, e)
            return
        with self._cond:
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            self.stats["busy_s"] += time.perf_counter() - start
        self._running = 0
        for job, result in zip(batch, results):
            self._finish(job, result, None)

    def _generate(self, batch: list[Job]):
        d = batch[0].decoding
        model = batch[0].model if batch[0].model is not None else self.model
        explicit = batch[0].routing != "vote"
        # Passed only when asked: a model whose generate lacks them still serves every other request.
        extra = {"return_layer_probs": True} if explicit and batch[0].layer_probs else {}
        if d.ignore_eos:
            extra["ignore_eos"] = True
        if d.min_tokens:
            extra["min_tokens"] = d.min_tokens
        return model.generate(
            [job.messages for job in batch],
            routing="explicit" if explicit else "vote",
            domains=[job.domain for job in batch] if explicit else None,  # None: the base model
            max_new_tokens=d.max_new_tokens, do_sample=d.do_sample, temperature=d.temperature, top_p=d.top_p,
            seed=d.seed, stop=list(d.stop) or None, **extra,
        )

    @staticmethod
    def _finish(job: Job, result, error: BaseException | None) -> None:
        if not job.cancelled:
            job.done(result, error)


# --------------------------------------------------------------------------- request schema


def _schema():
    """The pydantic request models (built lazily so that `moa --help` does not import pydantic)."""
    from pydantic import BaseModel, ConfigDict, Field

    class _Strict(BaseModel):
        # strict: "0.5" is not a float and 1 is not a bool; unknown fields are ignored, as clients
        # send more than we read (user, metadata, ...).
        model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    class TextPart(_Strict):
        type: Literal["text"]
        text: str

    class ChatMessage(_Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[TextPart]
        name: str | None = None

    class StreamOptions(_Strict):
        include_usage: bool = False

    class MoAOptions(_Strict):
        # Our own field: unlike the OpenAI ones, an unknown key here is a mistake worth reporting.
        model_config = ConfigDict(strict=True, extra="forbid")

        return_layer_probs: bool = False

    class _Common(_Strict):
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = Field(None, ge=0, lt=2**63)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None
        moa: MoAOptions | None = None
        # vLLM's benchmarking fields.
        ignore_eos: bool = False
        min_tokens: int = Field(0, ge=0)
        # Read only to refuse what this server does not do (see _refuse_unsupported).
        n: int | None = None
        frequency_penalty: float | None = None
        presence_penalty: float | None = None

    class ChatCompletionRequest(_Common):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = None
        tools: list[Any] | None = None

    class CompletionRequest(_Common):
        prompt: str | list[str]
        echo: bool | None = None
        best_of: int | None = None
        logprobs: int | None = None
        suffix: str | None = None

    class ReloadRequest(_Strict):
        model_config = ConfigDict(strict=True, extra="forbid")

        path: str = Field(min_length=1)

    return ChatCompletionRequest, CompletionRequest, ReloadRequest


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        return _json_response(self.body(), self.status, self.headers)


class _ClientGone(Exception):
    pass


def _json_response(content, status: int = 200, headers=None):
    from starlette.responses import Response

    # ASCII-escaped: request text (and so error messages) may hold lone surrogates, which UTF-8 cannot encode.
    return Response(_dumps(content), status, headers, media_type="application/json")


def _dumps(content) -> str:
    return json.dumps(content, ensure_ascii=True, separators=(",", ":"))


def _validation_error(exc) -> APIError:
    errors = exc.errors()
    locs = [[str(x) for x in e.get("loc", ()) if x != "body"] for e in errors]
    first = errors[0] if errors else {"msg": "invalid request", "type": "invalid_request"}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code="json_invalid")
    # A union field reports one error per member (messages.0.content.str, ...list[TextPart]): name the field.
    common = locs[0] if locs else []
    for loc in locs[1:]:
        n = 0
        while n < min(len(common), len(loc)) and common[n] == loc[n]:
            n += 1
        common = common[:n]
    param = ".".join(common) or None
    where = param or (".".join(locs[0]) if locs else "")
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    if first.get("type") == "missing" and not where:
        message = "the body must be a JSON object with the request's fields"
    if common[:1] == ["moa"]:
        message += ' (moa is an object whose only key is return_layer_probs, e.g. {"return_layer_probs": true})'
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code=str(first.get("type")))


# --------------------------------------------------------------------------- the app


class _Events:
    """What the worker says about one job, delivered on the event loop as (kind, value):
    ("start", routing info), ("text", delta), ("done", GenerationResult) or ("error", exception)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = time.perf_counter()
        self.first: float | None = None
        """When the first event arrived (the first token exists), perf_counter seconds."""
        self._get: asyncio.Future | None = None

    def put(self, kind: str, value) -> None:  # on the worker thread
        with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def next(self, timeout: float | None = None):
        """The next event, or None after `timeout` seconds (the pending read carries over)."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self._get}, timeout=timeout)
        if not done:
            return None
        event, self._get = self._get.result(), None
        if self.first is None:
            self.first = time.perf_counter()
        return event

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()


class _Metrics:
    """The Prometheus metrics of one app (its own registry: several apps may live in one process)."""

    def __init__(self, engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("moa_requests", "Completed requests, by expert ('base': no expert)", ["expert"],
                                registry=self.registry)
        self.tokens = Counter("moa_generated_tokens", "Generated tokens, by expert", ["expert"],
                              registry=self.registry)
        Gauge("moa_queue_depth", "Requests waiting to be admitted", registry=self.registry).set_function(
            lambda: engine.depth)
        Gauge("moa_running_batch_size", "Requests being decoded", registry=self.registry).set_function(
            lambda: engine.running)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("moa_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=buckets, registry=self.registry)
        self.latency = Histogram("moa_e2e_request_latency_seconds", "From a request's arrival to its last token",
                                 buckets=buckets, registry=self.registry)

    def finished(self, result, events: _Events) -> None:
        expert = result.domain or BASE_MODEL
        self.requests.labels(expert).inc()
        self.tokens.labels(expert).inc(result.completion_tokens)
        now = time.perf_counter()
        self.ttft.observe((events.first or now) - events.created)
        self.latency.observe(now - events.created)

    def render(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


SCHEDULERS = ("continuous", "static")


class _Server:
    """What the endpoints share: the current model, its names and limits, a tokenizer, the engine.

    A reload replaces model, domains, tokenizer and context_length together, on the event loop,
    so an endpoint that reads them without awaiting in between sees one model throughout."""

    def __init__(self, model, *, max_batch_size, max_queue, max_new_tokens_limit, max_prompt_tokens,
                 batch_wait_ms, scheduler=None, max_batch_tokens=2048):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("max_new_tokens_limit", max_new_tokens_limit), ("max_batch_tokens", max_batch_tokens)):
            if not isinstance(value, int) or value < 1:
                raise MoAError(f"{name} must be a positive integer, got {value!r}")
        if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
            raise MoAError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}")
        if scheduler is None:  # a stand-in with only `generate` (tests, stub judges) gets the static batcher
            scheduler = "continuous" if hasattr(model, "base_model") and hasattr(model, "routing") else "static"
        if scheduler not in SCHEDULERS:
            raise MoAError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        self.scheduler = scheduler
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_prompt_tokens = max_prompt_tokens
        self.swap(model)
        if scheduler == "static":
            self.engine = Batcher(model, max_batch_size, max_queue, batch_wait_ms)
        else:
            self.engine = Engine(model, max_batch_size, max_queue, max_batch_tokens)
        self.metrics = _Metrics(self.engine)
        self.reloading = False

    def swap(self, model) -> None:
        """Serve `model` from now on (requests already accepted finish on the model they were accepted for)."""
        self.model = model
        self.domains = list(model.domains)
        # Our own copy: the worker thread uses the model's tokenizer while we count prompt tokens here.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self.context_length = _context_length(model)
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        return ["moa"] + [f"moa:{d}" for d in self.domains] + [BASE_MODEL]

    def resolve_model(self, name: str) -> tuple[str | None, bool]:
        """(forced domain, base): 'moa' -> (None, False) routed; 'moa:<domain>' -> (domain, False);
        'base' -> (None, True), no expert."""
        if name == "moa":
            return None, False
        if name == BASE_MODEL:
            return None, True
        if name.startswith("moa:") and name[4:] in self.domains:
            return name[4:], False
        raise APIError(404, f"the model '{name}' does not exist; available: {', '.join(self.model_ids())}",
                       param="model", code="model_not_found")

    def prompt_tokens(self, messages: list[dict], param: str) -> int:
        """Render like MoAModel.generate (chat template + generation prompt) and count the tokens."""
        if not any(m["content"].strip() for m in messages):
            raise APIError(400, "the prompt is empty", param=param, code="empty_prompt")
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
        except Exception as e:  # the template rejects the conversation, or the text cannot be encoded
            raise APIError(400, f"cannot render the prompt with the model's chat template: {e}", param=param,
                           code="invalid_prompt") from None
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n} tokens, more than this server's limit of "
                                f"{self.max_prompt_tokens}", param=param, code="context_length_exceeded")
        return n

    def decoding(self, body, prompt_tokens: int, max_tokens: int | None, default_max_tokens: int,
                 prompt_param: str, tokens_param: str = "max_tokens") -> Decoding:
        """The request's decoding parameters, max_tokens checked against our limit and the context."""
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if room is not None and room < 1:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens, which fills the model's context of "
                                f"{self.context_length}", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, self.max_new_tokens_limit)
            if room is not None:
                max_tokens = min(max_tokens, room)
        elif max_tokens > self.max_new_tokens_limit:
            raise APIError(400, f"{tokens_param} is {max_tokens}, more than this server's limit of "
                                f"{self.max_new_tokens_limit}", param=tokens_param, code="invalid_value")
        elif room is not None and max_tokens > room:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus {tokens_param} ({max_tokens}) exceeds "
                                f"the model's context of {self.context_length}", param=tokens_param,
                           code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}", param="stop",
                           code="invalid_value")
        stop = tuple(dict.fromkeys(s for s in stops if s))
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({body.min_tokens}) is more than {tokens_param} ({max_tokens})",
                           param="min_tokens", code="invalid_value")
        extra = {"ignore_eos": body.ignore_eos, "min_tokens": body.min_tokens}
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature == 0:  # greedy: the other sampling parameters do not matter, so do not split batches
            return Decoding(max_tokens, False, stop=stop, **extra)
        return Decoding(max_tokens, True, temperature, 1.0 if body.top_p is None else body.top_p, body.seed, stop,
                        **extra)

    def job(self, messages: list[dict], model: tuple[str | None, bool], decoding: Decoding, layer_probs: bool,
            prompt_tokens: int, stream: bool) -> tuple[Job, _Events]:
        """A job for `model` (what resolve_model returned) on the current model, and its events."""
        events = _Events(asyncio.get_running_loop())
        domain, base = model
        job = Job(messages, domain, decoding, lambda result, error: events.put(
                      "error" if error is not None else "done", error if error is not None else result),
                  base=base, layer_probs=layer_probs, model=self.model, prompt_tokens=prompt_tokens,
                  on_start=lambda info: events.put("start", info),
                  on_text=(lambda delta: events.put("text", delta)) if stream else None)
        return job, events

    async def submit(self, request, job: Job, events: _Events):
        """Queue the job and return its first event (start, or done from the static batcher);
        drop the job if the client disconnects first. Errors become APIError."""
        self.engine.start()
        try:
            self.engine.submit([job])
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        try:
            while True:
                event = await events.next(DISCONNECT_POLL_S)
                if event is not None:
                    break
                if await request.is_disconnected():
                    raise _ClientGone()
        except BaseException:  # the client left, or the server is cancelling us
            self.engine.cancel(job)
            events.close()
            raise
        self.check(event)
        return event

    async def result(self, request, job: Job, events: _Events):
        """Wait for the job's result (non-streamed requests)."""
        event = await self.submit(request, job, events)
        try:
            while event[0] != "done":
                nxt = await events.next(DISCONNECT_POLL_S)
                if nxt is None:
                    if await request.is_disconnected():
                        raise _ClientGone()
                    continue
                self.check(nxt)
                event = nxt
        except BaseException:
            self.engine.cancel(job)
            events.close()
            raise
        self.metrics.finished(event[1], events)
        return event[1]

    @staticmethod
    def check(event) -> None:
        kind, error = event
        if kind != "error":
            return
        if isinstance(error, MoAError):
            raise APIError(400, str(error), code="invalid_request")
        if isinstance(error, QueueFull):
            raise APIError(503, str(error), type="server_error", code="unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        raise APIError(500, f"internal error while generating: {type(error).__name__}: {error}",
                       type="server_error", code="internal_error")


async def _stream_events(server: _Server, job: Job, events: _Events, first):
    """The events of a streamed job from its first one on: ("start", info), ("text", delta)...,
    ("done", result), or an ("error", APIError) after the start. The static batcher's one result
    is replayed as a start and word-sized pieces. The job is dropped if the client leaves."""
    try:
        if first[0] == "done":  # static batcher: the whole text at once
            result = first[1]
            yield "start", {"domain": result.domain, "router_probs": result.router_probs,
                            "layer_probs": result.layer_probs}
            for piece in _pieces(result.text):
                yield "text", piece
            server.metrics.finished(result, events)
            yield first
            return
        yield first
        while True:
            event = await events.next()
            if event[0] == "error":
                try:
                    server.check(event)
                except APIError as e:
                    yield "error", e
                return
            if event[0] == "done":
                server.metrics.finished(event[1], events)
            yield event
            if event[0] == "done":
                return
    finally:
        server.engine.cancel(job)  # a no-op once done; frees the row if the client went away
        events.close()


_UNSUPPORTED = {
    # field: (the values that are fine, what to say)
    "n": ((None, 1), "n must be 1 (one choice per request)"),
    "frequency_penalty": ((None, 0), "frequency_penalty is not supported (only 0)"),
    "presence_penalty": ((None, 0), "presence_penalty is not supported (only 0)"),
    "logprobs": ((None, False, 0), "logprobs are not supported"),
    "tools": ((None, []), "tools are not supported"),
    "echo": ((None, False), "echo is not supported"),
    "best_of": ((None, 1), "best_of must be 1"),
    "suffix": ((None, ""), "suffix is not supported"),
}


def _refuse_unsupported(body) -> None:
    for name, (fine, message) in _UNSUPPORTED.items():
        if getattr(body, name, None) not in fine:
            raise APIError(400, message, param=name, code="unsupported_parameter")


def _context_length(model) -> int | None:
    try:
        return int(model.base_model.config.get_text_config().max_position_embeddings)
    except (AttributeError, TypeError, ValueError):
        return None


def _chat_messages(messages) -> list[dict]:
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _moa_info(info, job: Job) -> dict:
    """The response's moa field from a result or the start event's info."""
    get = info.get if isinstance(info, dict) else lambda k: getattr(info, k)
    # Routed, yet no expert: the out-of-domain fallback sent it to the base model.
    out = {"domain": get("domain"), "router_probs": get("router_probs"), "routing": job.routing,
           "fallback": job.routing == "vote" and get("domain") is None}
    if job.layer_probs:
        out["layer_probs"] = get("layer_probs")
    return out


def _wants_layer_probs(body) -> bool:
    return bool(body.moa and body.moa.return_layer_probs)


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _pieces(text: str) -> list[str]:
    """Split into word-sized pieces for streaming; "".join(pieces) == text."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]


def _sse(chunks) -> Any:
    """Server-sent events from an async iterator of chunks (an APIError is sent as an error event)."""
    from starlette.responses import StreamingResponse

    async def events():
        async for chunk in chunks:
            if isinstance(chunk, APIError):
                chunk = {"error": {"message": chunk.message, "type": chunk.type, "param": chunk.param,
                                   "code": chunk.code}}
            yield f"data: {_dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _APIKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY` (checked before the body is read)."""

    def __init__(self, app, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(auth, self.expected):
                error = APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, *, api_key: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
               max_new_tokens_limit: int = 1024, max_prompt_tokens: int | None = None,
               batch_wait_ms: float = BATCH_WAIT_MS, scheduler: str | None = None, max_batch_tokens: int = 2048,
               loader: Callable[[str], Any] | None = None):
    """The FastAPI app serving `model` (a MoAModel, or anything with its domains/tokenizer/generate).

    Args:
        api_key: if set, /v1/* requires `Authorization: Bearer <api_key>` (/health, /metrics, the
            playground page at / and its assets under /static stay open).
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting; more are answered 503 with Retry-After.
        max_new_tokens_limit: largest max_tokens accepted (and the chat default).
        max_prompt_tokens: longest prompt accepted, in tokens after the chat template (None: the
            model's context length is the only limit).
        batch_wait_ms: static scheduler: how long the worker waits for more requests before a batch.
        scheduler: "continuous" (moa.engine: requests join and leave the running batch at every
            decode step, text streams token by token) or "static" (the former batcher: one
            `generate` call per batch of equal decoding parameters; kept to compare with). Default:
            continuous for a MoAModel, static for a stand-in that only has `generate`.
        max_batch_tokens: continuous scheduler: token budget of one step (admitted prompts plus one
            per running row).
        loader: `loader(path, current_model) -> model` for POST /v1/admin/reload (default:
            MoAModel.from_pretrained on the served model's device and dtype).

    The worker thread starts with the app (lifespan) or at the first request; `app.state.engine`
    (also `app.state.batcher`) exposes its queue depth, running rows and stats.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    ChatCompletionRequest, CompletionRequest, ReloadRequest = _schema()
    server = _Server(model, max_batch_size=max_batch_size, max_queue=max_queue,
                     max_new_tokens_limit=max_new_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                     batch_wait_ms=batch_wait_ms, scheduler=scheduler, max_batch_tokens=max_batch_tokens)
    load = loader or _default_loader

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.close()

    app = FastAPI(title="moa", description="OpenAI-compatible Mixture-of-LoRAs server", lifespan=lifespan)
    app.state.engine = app.state.batcher = server.engine
    app.state.server = server
    if api_key:
        app.add_middleware(_APIKey, key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(_ClientGone)
    async def _gone(request, exc):
        from starlette.responses import Response

        return Response(status_code=499)  # nobody reads it

    @app.get("/", include_in_schema=False)
    async def playground():
        from starlette.responses import FileResponse

        # Everything the page loads comes from this server; model text is only ever set as text.
        csp = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": csp,
                                                            "Cache-Control": "no-cache"})

    app.mount("/static", _static_files(), name="static")

    @app.get("/health")
    async def health():
        e = server.engine
        return _json_response({"status": "ok", "domains": server.domains, "scheduler": server.scheduler,
                               "queue": e.depth, "running": e.running, "max_queue": e.max_queue,
                               "max_batch_size": e.max_batch_size, **e.stats})

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return server.metrics.render()

    @app.get("/v1/models")
    async def models():
        return _json_response({"object": "list", "data": [_model_card(m, server.created) for m in server.model_ids()]})

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        server.resolve_model(model_id)
        return _json_response(_model_card(model_id, server.created))

    @app.post("/v1/admin/reload")
    async def reload(request: Request):
        # Without a key (the middleware checks it when there is one) only this machine may reload.
        host = request.client.host if request.client else None
        if not api_key and host not in _LOOPBACK:
            raise APIError(403, "reload is only accepted from loopback when the server has no API key",
                           type="permission_error", code="forbidden")
        try:
            body = ReloadRequest.model_validate_json(await request.body())
        except Exception as e:
            if hasattr(e, "errors"):
                raise _validation_error(e) from None
            raise
        if server.reloading:
            raise APIError(409, "a reload is already in progress", code="reload_in_progress")
        server.reloading = True
        try:
            # A thread: the engine keeps serving the current model while the new one loads.
            new = await asyncio.to_thread(load, body.path, server.model)
        except Exception as e:
            raise APIError(400, f"cannot load {body.path}: {e}" if isinstance(e, MoAError)
                           else f"cannot load {body.path}: {type(e).__name__}: {e}", param="path",
                           code="invalid_checkpoint") from None
        finally:
            server.reloading = False
        server.swap(new)  # requests accepted from here on run on it; the running ones finish on the old
        return _json_response({"status": "ok", "path": body.path, "domains": server.domains,
                               "models": server.model_ids()})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _refuse_unsupported(body)
        model = server.resolve_model(body.model)
        messages = _chat_messages(body.messages)
        n_prompt = server.prompt_tokens(messages, "messages")
        tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        decoding = server.decoding(body, n_prompt, getattr(body, tokens_param), server.max_new_tokens_limit,
                                   "messages", tokens_param)
        job, events = server.job(messages, model, decoding, _wants_layer_probs(body), n_prompt, body.stream)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": None}
        if not body.stream:
            result = await server.result(request, job, events)
            return _json_response({
                **head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": _usage(result), "moa": _moa_info(result, job),
            })
        first = await server.submit(request, job, events)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(delta, finish=None, info=None):
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **extra, "moa": info}

        async def chunks():
            brief = None
            async for kind, value in _stream_events(server, job, events, first):
                if kind == "start":
                    moa = _moa_info(value, job)
                    # L x E floats are sent once, in the first chunk (a page draws them before the text).
                    brief = {k: v for k, v in moa.items() if k != "layer_probs"}
                    yield chunk({"role": "assistant", "content": ""}, info=moa)
                elif kind == "text":
                    yield chunk({"content": value}, info=brief)
                elif kind == "error":
                    yield value
                else:
                    yield chunk({}, value.finish_reason, info=brief)
                    if include_usage:
                        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value),
                               "moa": brief}

        return _sse(chunks())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _refuse_unsupported(body)
        model = server.resolve_model(body.model)
        if isinstance(body.prompt, list) and len(body.prompt) != 1:
            raise APIError(400, "send one prompt per request (the server batches concurrent requests)",
                           param="prompt", code="invalid_value")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        # MoAModel.generate renders every prompt with the chat template: the prompt is one user turn.
        messages = [{"role": "user", "content": prompt}]
        n_prompt = server.prompt_tokens(messages, "prompt")
        decoding = server.decoding(body, n_prompt, body.max_tokens, 16, "prompt")
        job, events = server.job(messages, model, decoding, _wants_layer_probs(body), n_prompt, body.stream)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None}
        if not body.stream:
            result = await server.result(request, job, events)
            return _json_response({
                **head, "choices": [{"index": 0, "text": result.text, "logprobs": None,
                                     "finish_reason": result.finish_reason}],
                "usage": _usage(result), "moa": _moa_info(result, job),
            })
        first = await server.submit(request, job, events)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(text, finish=None, info=None):
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                    **extra, "moa": info}

        async def chunks():
            moa = brief = None  # the first chunk carries the whole moa field, the others its brief form
            async for kind, value in _stream_events(server, job, events, first):
                if kind == "start":
                    moa = _moa_info(value, job)
                    brief = {k: v for k, v in moa.items() if k != "layer_probs"}
                elif kind == "text":
                    yield chunk(value, info=moa or brief)
                    moa = None
                elif kind == "error":
                    yield value
                else:
                    yield chunk("", value.finish_reason, info=moa or brief)
                    if include_usage:
                        yield {**head, "choices": [], "usage": _usage(value), "moa": brief}

        return _sse(chunks())

    return app


def _default_loader(path: str, current) -> Any:
    """Load a checkpoint like the one being served: same device, same dtype, same --fallback
    (applied to the new checkpoint's own calibration)."""
    from moa.fallback import set_fallback
    from moa.model import MoAModel

    model = MoAModel.from_pretrained(path, device=getattr(current, "device", None), dtype=_dtype_of(current))
    set_fallback(model, getattr(current, "fallback_spec", "auto"))
    return model


def _dtype_of(model):
    try:
        return next(model.base_model.parameters()).dtype
    except (AttributeError, StopIteration):
        return None


def _static_files():
    from starlette.staticfiles import StaticFiles

    return StaticFiles(directory=STATIC)


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "moa"}
