"""The serving engine of `moa serve`: iteration-level (continuous) batching over routed prefill and
decode steps, with token-by-token output.

One worker thread owns the model and loops over *steps*. At every step it

1. drops the rows whose client has gone (`Engine.cancel`),
2. admits waiting requests, oldest first, while the running batch has fewer than
   `max_batch_size` rows and the step's token budget (`max_batch_tokens`: each admitted prompt's
   tokens plus one per running row) allows; a prompt longer than the budget is admitted alone,
   into an empty batch, so that it still runs,
3. prefills the admitted prompts (`moa.generation.prefill`: the routers decide one expert per
   request on its prompt, exactly as `MoAModel.generate` does, and the KV cache is filled with
   that decision), samples their first token and merges them into the running batch,
4. runs one decode step for the whole running batch, every row with its own expert (one
   `MoLoRALinear` pass over a mixed-expert batch), its own sampling parameters (temperature,
   top_p, seed, stop, max_tokens, ignore_eos, min_tokens) and its own cache positions,
5. hands each row's new text to its request, and removes finished rows at once.

The running batch keeps one left-padded KV cache: a joining row is padded to the batch's cache
length (or the batch to the row's), and columns that no row uses any more are cut when rows
leave. Left padding does not change a row's positions (they come from its own mask), so a row
decodes the same tokens as `MoAModel.generate` gives it alone (greedy), whatever joins or leaves
around it. Requests carry the model they were accepted for: after a hot reload the requests of
the old model finish on it (its own running batch) while new ones run on the new model.

Why not transformers' own continuous batching (`generate_batch` / `ContinuousBatchingManager`,
transformers 5.x, read in `transformers/generation/continuous_batching/`): it packs the tokens
of all running requests into ONE row (`input_ids` of shape (1, total_tokens), sequences told
apart by `cu_seq_lens_q/k` and a paged block table), and its own manager thread builds those
packed inputs and calls the model's forward. `MoLoRALinear` routes per batch row (one
`ExpertChoice` of shape (B,) per layer, no per-token index), so a packed batch would give every
request the expert of the first; carrying a per-request expert would need a per-token expert
index rebuilt from the manager's private packing at every step, and the routers' prompt pooling
per packed (and possibly chunked) sequence, i.e. reaching into the manager's internals on each
forward. Its sampling is also per-manager, not per request (per-request temperature/top_p only
exist for processors created up front). So the scheduler here is written over moa's own
prefill and decode step; the paged cache's gain (no padding copies) matters less at the batch
sizes served here than keeping routing exact.

Text is detokenised incrementally (the prefix/read offsets of TGI and vLLM): a step's bytes that
end inside a multi-byte character wait for the next token, so a character is never split; text
that could be the start of a stop string is held back until it cannot be. The final text of a
request is exactly `tokenizer.decode` of its tokens cut at the first stop string, as in
`MoAModel.generate`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from moa.errors import MoAError
from moa.generation import (GenerationResult, _eos_ids, _next_token, _step_kwargs, encode_prompts, prefill)
from moa.router import RoutingState, layer_probs


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Decoding:
    """How one request decodes (the static batcher batches requests together iff these are equal)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Keep generating after the end-of-turn token (benchmarks)."""
    min_tokens: int = 0
    """No end-of-turn token and no stop string before this many tokens."""


@dataclass(eq=False)
class Job:
    """One prompt waiting for the worker. Callbacks are called from the worker thread:
    `on_start(info)` once its prompt is in (info: domain, router_probs, layer_probs),
    `on_text(delta)` for each new piece of text, then `done(result, error)` once."""

    messages: list[dict]
    domain: str | None
    """The forced expert; None: routed by the routers (vote), or the base model if `base`."""
    decoding: Decoding
    done: Callable[[Any, BaseException | None], None]
    cancelled: bool = False
    base: bool = False
    """No expert at all (domain is None)."""
    layer_probs: bool = False
    """Report the routers' per-layer probabilities even when the expert is forced."""
    model: Any = None
    """The model the request was accepted for (None: the engine's); a reload does not move it."""
    on_start: Callable[[dict], None] | None = None
    on_text: Callable[[str], None] | None = None
    prompt_tokens: int = 0
    """Its prompt's length in tokens, if known (the admission budget counts it)."""

    @property
    def routing(self) -> str:
        return "base" if self.base else "vote" if self.domain is None else "explicit"

    @property
    def key(self) -> tuple:
        # Static batcher: explicit (and base) rows and routed rows need different generate calls;
        # the experts themselves may differ within a batch. A seeded sampled request runs alone:
        # one generator serves a whole batch, so its sample would otherwise depend on its
        # neighbours. Forced rows that ask for layer probabilities pay a routing pass for them.
        alone = self if self.decoding.do_sample and self.decoding.seed is not None else None
        routed = self.routing == "vote"
        return (id(self.model), routed, self.decoding, alone, self.layer_probs and not routed)


# --------------------------------------------------------------------------- text


class Detokenizer:
    """Incremental detokenisation: `push(token)` returns the text the token completes ("" while a
    multi-byte character is unfinished). The pieces join to `tokenizer.decode(tokens)` up to the
    unfinished tail."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # decode from _prefix for context; text up to _read is out

    def push(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        now = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += delta
        return delta


def final_text(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
    """The completion as `MoAModel.generate` reports it: decoded, cut at the first stop string."""
    text, cut_any = tokenizer.decode(tokens, skip_special_tokens=True), False
    for s in stops:
        cut = text.find(s)
        if cut >= 0:
            text, cut_any = text[:cut], True
    return text, cut_any


# --------------------------------------------------------------------------- rows and batches


@dataclass(eq=False)
class _Row:
    job: Job
    detok: Detokenizer
    prompt_tokens: int
    domain: str | None
    router_probs: dict[str, float] | None
    layer_probs: list[list[float]] | None
    generator: torch.Generator | None
    sent: int = 0
    """Characters of detok.text already handed to on_text."""


@dataclass(eq=False)
class _Batch:
    """The running rows of one model and their shared left-padded KV cache."""

    model: Any
    rows: list[_Row]
    cache: Any
    mask: Tensor
    """(B, S) 1 where the cache holds a real token of that row."""
    pos: Tensor
    """(B,) position of each row's next input token."""
    last: Tensor
    """(B,) each row's last sampled token (the next step's input)."""
    experts: Tensor
    """(L, B) each row's expert in every layer (-1: base only)."""
    eos: Tensor = field(default=None)
    """The end-of-turn token ids of `model`."""
    _routing: tuple | None = field(default=None, repr=False)
    """(the `experts` tensor, its RoutingState): kept while no row joins or leaves."""

    def routing(self) -> RoutingState:
        """The routing of the next decode step. The same state (and so the same ExpertChoices, which
        keep the experts' gathered weights) serves every step until rows join or leave and `experts`
        is replaced: the weights are gathered once per batch composition, not once per token."""
        if self._routing is None or self._routing[0] is not self.experts:
            # (B,) when every row uses one expert in all layers: one ExpertChoice shared by the layers.
            same = bool((self.experts == self.experts[:1]).all())
            self._routing = (self.experts, RoutingState("explicit", self.experts[0] if same else self.experts))
        state = self._routing[1]
        state.decisions.clear()  # the step's forward records them again
        return state

    def select(self, keep: list[int]) -> None:
        """Keep these rows (in order) and cut the cache columns no remaining row uses."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
        self.experts = self.experts[:, idx]
        used = self.mask.any(0)  # (S,)
        first = int(used.int().argmax()) if bool(used.any()) else 0
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys[idx, :, first:]  # (B', H, S - first, D)
            layer.values = layer.values[idx, :, first:]
        self.mask = self.mask[:, first:]

    def extend(self, other: "_Batch") -> None:
        """Append other's rows, left-padding whichever cache is shorter."""
        S, s = self.mask.shape[1], other.mask.shape[1]
        T = max(S, s)
        for mine, theirs in zip(_cache_layers(self.cache), _cache_layers(other.cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, T - S), _pad_left(theirs.keys, T - s)])  # (B + b, H, T, D)
            mine.values = torch.cat([_pad_left(mine.values, T - S), _pad_left(theirs.values, T - s)])
        self.mask = torch.cat([_pad_left(self.mask, T - S, dim=1), _pad_left(other.mask, T - s, dim=1)])  # (B + b, T)
        self.pos, self.last = torch.cat([self.pos, other.pos]), torch.cat([self.last, other.last])
        self.experts = torch.cat([self.experts, other.experts], dim=1)  # (L, B + b)
        self.rows += other.rows


def _pad_left(x: Tensor, n: int, dim: int = 2) -> Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) or not isinstance(getattr(layer, "keys", None),
                                                                                    Tensor) for layer in layers):
        raise MoAError(f"continuous batching needs a KV cache of full-attention layers ({type(cache).__name__} "
                       "has others); serve this model with --scheduler static")
    return layers


# --------------------------------------------------------------------------- the engine


class JobQueue:
    """A bounded FIFO of `Job`s and the one worker thread (`_loop`, the subclass's) that runs
    them: what the continuous `Engine` and the static `moa.serve.Batcher` share. Subclasses set
    `max_queue` and call `super().__init__()`."""

    thread_name = "moa-serve-worker"
    max_queue: int

    def __init__(self) -> None:
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._running = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Rows in the running batches, as of the last step."""
        return self._running

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after its current step or batch; jobs still queued fail with QueueFull
        (a running one as its worker decides)."""
        with self._cond:
            self._closed = True
            pending, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for job in pending:
            job.done(None, QueueFull("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none (QueueFull)."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._queue.extend(jobs)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job: out of the queue, or out of the running work (the engine: at its next step;
        the static batcher: its result is ignored)."""
        with self._cond:
            job.cancelled = True
            with contextlib.suppress(ValueError):
                self._queue.remove(job)

    def _loop(self) -> None:
        raise NotImplementedError


class Engine(JobQueue):
    """A bounded FIFO of `Job`s and the worker thread that runs them with continuous batching.

    Args:
        model: a MoAModel (jobs without a `model` of their own run on it).
        max_batch_size: most rows running at once (all models together).
        max_queue: most jobs waiting (running rows not counted); `submit` raises QueueFull beyond.
        max_batch_tokens: token budget of one step: the prompts admitted in it plus one per running row.
    """

    thread_name = "moa-serve-engine"

    def __init__(self, model, max_batch_size: int = 8, max_queue: int = 64, max_batch_tokens: int = 2048):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.stats = {"steps": 0, "requests": 0, "tokens": 0, "max_batch": 0, "busy_s": 0.0}
        """Decode steps run, requests finished, tokens generated, the largest batch, seconds of model work."""
        super().__init__()
        self._batches: dict[int, _Batch] = {}  # id(model) -> its running batch

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._queue and not self._batches and not self._closed:
                            self._cond.wait()
                        if self._closed:
                            break
                        admitted = self._admit()
                    start = time.perf_counter()
                    for model, jobs in admitted.items():
                        self._guarded(self._prefill, model, jobs)
                    self._running = sum(len(b.rows) for b in self._batches.values())
                    for key, batch in list(self._batches.items()):
                        self._guarded(self._step, batch)
                        if not batch.rows:
                            del self._batches[key]
                    self._running = sum(len(b.rows) for b in self._batches.values())
                    self.stats["busy_s"] += time.perf_counter() - start
        finally:
            for batch in list(self._batches.values()):
                for row in batch.rows:
                    self._finish(row.job, None, QueueFull("the server is shutting down"))
            self._batches.clear()

    def _guarded(self, fn, *args) -> None:
        """Run a prefill or a step; an unexpected error fails the rows it concerns, not the worker."""
        try:
            fn(*args)
        except Exception as e:
            jobs = args[1] if fn == self._prefill else [row.job for row in args[0].rows]
            for job in jobs:
                self._finish(job, None, e)
            if fn == self._step:
                args[0].rows = []
            else:  # a failed merge leaves the model's batch in an unknown state: end it too
                batch = self._batches.pop(id(args[0]), None)
                for row in batch.rows if batch is not None else []:
                    self._finish(row.job, None, e)

    def _admit(self) -> dict[Any, list[Job]]:
        """Take the jobs that join this step, oldest first, grouped by model (under the lock)."""
        running = self.running
        budget = self.max_batch_tokens - running
        admitted: dict[Any, list[Job]] = {}
        n = 0
        while self._queue and running + n < self.max_batch_size:
            job = self._queue[0]
            cost = max(1, job.prompt_tokens)
            if cost > budget and (n or running):
                break  # FIFO: it waits for room rather than being overtaken
            self._queue.popleft()
            model = job.model if job.model is not None else self.model
            admitted.setdefault(model, []).append(job)
            budget -= cost
            n += 1
        return admitted

    def _prefill(self, model, jobs: list[Job]) -> None:
        """Run the prompts of `jobs`, sample their first token, merge the rows into model's batch."""
        jobs = [j for j in jobs if not j.cancelled]
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:  # one prefill per routing kind: routed rows decide, forced rows do not
            groups.setdefault((job.routing == "vote", job.layer_probs and job.routing != "vote"), []).append(job)
        for (routed, probs), group in groups.items():
            try:
                part = self._prefill_group(model, group, routed, probs)
            except Exception as e:
                if len(group) > 1:  # one bad prompt must not fail its neighbours
                    for job in group:
                        self._prefill(model, [job])
                    continue
                self._finish(group[0], None, e)
                continue
            if part is None:
                continue
            batch = self._batches.get(id(model))
            if batch is None:
                self._batches[id(model)] = part
            else:
                batch.extend(part)

    def _prefill_group(self, model, jobs: list[Job], routed: bool, probs: bool) -> _Batch | None:
        input_ids, attention_mask = encode_prompts(model, [j.messages for j in jobs])  # (b, T)
        if routed:
            pre = prefill(model, input_ids, attention_mask, "vote")
        else:
            pre = prefill(model, input_ids, attention_mask, "explicit", [j.domain for j in jobs], probs)
        _cache_layers(pre.cache)
        names = model.domain_names(pre.per_row)
        by_row = None if pre.per_layer is None else layer_probs(pre.per_layer).transpose(0, 1).tolist()  # (b, L, E)
        prompt_lens = attention_mask.sum(1)  # (b,)
        experts = pre.experts if pre.experts.ndim == 2 else pre.experts[None].expand(model.num_layers, -1)  # (L, b)
        rows = []
        for i, job in enumerate(jobs):
            d = job.decoding
            generator = None
            if d.do_sample and d.seed is not None:  # as generate seeds a request alone
                generator = torch.Generator(device=model.device).manual_seed(d.seed)
            rows.append(_Row(job, Detokenizer(model.tokenizer), int(prompt_lens[i]), names[i],
                             None if pre.probs is None else dict(zip(model.domains, pre.probs[i].tolist())),
                             None if by_row is None or not (routed or job.layer_probs) else by_row[i], generator))
            if job.on_start is not None and not job.cancelled:
                job.on_start({"domain": names[i], "router_probs": rows[-1].router_probs,
                              "layer_probs": rows[-1].layer_probs})
        eos = _eos_ids(model)
        part = _Batch(model, rows, pre.cache, attention_mask, prompt_lens.clone(), None, experts, eos)
        part.last = self._sample(part, pre.logits)
        keep = self._advance(part)
        if not keep:
            return None
        if len(keep) < len(rows):
            part.select(keep)
        return part

    def _step(self, batch: _Batch) -> None:
        """One decode step of a running batch: drop departed rows, one token for every other row."""
        keep = [i for i, row in enumerate(batch.rows) if not row.job.cancelled]
        if len(keep) < len(batch.rows):
            if not keep:
                batch.rows = []
                return
            batch.select(keep)
        B = len(batch.rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], B)
        model = batch.model
        mask = torch.cat([batch.mask, batch.mask.new_ones(B, 1)], dim=1)  # (B, S + 1)
        try:
            with model.routing(batch.routing()):
                out = model.base_model(**_step_kwargs(model, batch.last[:, None], mask, batch.pos[:, None],
                                                      batch.cache))
        except Exception as e:
            for row in batch.rows:
                self._finish(row.job, None, e)
            batch.rows = []
            return
        self.stats["steps"] += 1
        batch.mask, batch.pos = mask, batch.pos + 1
        batch.last = self._sample(batch, out.logits[:, -1])  # (B,)
        keep = self._advance(batch)
        if len(keep) < len(batch.rows):
            if keep:
                batch.select(keep)
            else:
                batch.rows = []

    def _sample(self, batch: _Batch, logits: Tensor) -> Tensor:
        """logits (B, V) -> each row's next token (B,) under its own sampling parameters."""
        early = [i for i, row in enumerate(batch.rows) if len(row.detok.tokens) < row.job.decoding.min_tokens]
        if early:
            rows = torch.tensor(early, device=logits.device)[:, None]  # (b, 1)
            logits = logits.index_put((rows, batch.eos[None, :]), torch.tensor(float("-inf"), device=logits.device))
        nxt = logits.argmax(-1)  # (B,)
        for i, row in enumerate(batch.rows):
            d = row.job.decoding
            if d.do_sample and d.temperature > 0:
                nxt[i] = _next_token(logits[i:i + 1], True, d.temperature, d.top_p, row.generator)[0]
        return nxt

    def _advance(self, batch: _Batch) -> list[int]:
        """Give every row its token (batch.last); finish the rows that are done. Returns the others."""
        keep = []
        eos = set(batch.eos.tolist())
        for i, (row, token) in enumerate(zip(batch.rows, batch.last.tolist())):
            job, d = row.job, row.job.decoding
            row.detok.push(token)
            n = len(row.detok.tokens)
            stopped = token in eos and not d.ignore_eos
            if d.stop and n >= d.min_tokens and not stopped:
                stopped = any(s in row.detok.text for s in d.stop)
            if stopped or n >= d.max_new_tokens:
                self._complete(batch.model, row, stopped)
                continue
            keep.append(i)
            # Text that could still turn into a stop string stays here until it cannot.
            hold = max((len(s) for s in d.stop), default=1) - 1
            ready = len(row.detok.text) - hold
            if ready > row.sent and job.on_text is not None and not job.cancelled:
                job.on_text(row.detok.text[row.sent:ready])
                row.sent = ready
        return keep

    def _complete(self, model, row: _Row, stopped: bool) -> None:
        job = row.job
        text, cut = final_text(model.tokenizer, row.detok.tokens, job.decoding.stop)
        sent = row.detok.text[:row.sent]
        if job.on_text is not None and not job.cancelled and text.startswith(sent) and len(text) > len(sent):
            job.on_text(text[len(sent):])
        n = len(row.detok.tokens)
        self.stats["requests"] += 1
        self.stats["tokens"] += n
        self._finish(job, GenerationResult(text=text, domain=row.domain, router_probs=row.router_probs,
                                           prompt_tokens=row.prompt_tokens, completion_tokens=n,
                                           finish_reason="stop" if stopped or cut else "length",
                                           layer_probs=row.layer_probs), None)

    @staticmethod
    def _finish(job: Job, result, error: BaseException | None) -> None:
        if not job.cancelled:
            job.done(result, error)
