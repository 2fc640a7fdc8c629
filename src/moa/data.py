"""Multi-domain SFT data: JSONL records -> chat-formatted tokens with response-only labels.

Record format (one JSON object per line):
    {"domain": "finance", "messages": [{"role": "user", "content": ...},
                                       {"role": "assistant", "content": ...}]}
or  {"domain": "finance", "prompt": "...", "response": "..."}

Labels cover the assistant turns' tokens (their content and end-of-turn token) and are -100
elsewhere. The "prompt" of a record -- what routers read -- is everything before the last
assistant turn, exactly what a user sends at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from moa.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    domain: str
    messages: list[dict]
    index: int = 0
    """0-based position of the record among the valid records of its file."""
    where: str = ""
    """FILE:LINE, for messages."""

    @property
    def prompt_messages(self) -> list[dict]:
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def response(self) -> str:
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise DataError(f"{where}: messages[{i}] is missing string field 'role'")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role '{role}' is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}] is missing string field 'content'")
        out.append({"role": role, "content": content})
    assistants = [m for m in out if m["role"] == "assistant"]
    if not assistants:
        raise DataError(f"{where}: no assistant turn in 'messages'")
    if not assistants[-1]["content"].strip():
        raise DataError(f"{where}: empty assistant content")
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's response")
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise DataError(f"{where}: no user turn with text in 'messages'")
    return out


def parse_record(obj, where: str, index: int = 0) -> Record:
    """Validate one decoded JSON value and return a Record (raises DataError naming `where`)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    domain = obj.get("domain")
    if domain is None:
        raise DataError(f"{where}: missing field 'domain'")
    if not isinstance(domain, str) or not domain.strip():
        raise DataError(f"{where}: field 'domain' must be a non-empty string")
    if "messages" in obj:
        messages = _check_messages(obj["messages"], where)
    elif "prompt" in obj or "response" in obj:
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt' must be a string")
        if not isinstance(response, str):
            raise DataError(f"{where}: field 'response' must be a string")
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt")
        if not response.strip():
            raise DataError(f"{where}: empty assistant content")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise DataError(f"{where}: missing field 'messages' (or 'prompt' and 'response')")
    return Record(domain=domain.strip(), messages=messages, index=index, where=where)


def read_records(path: str | Path, *, skip_invalid: bool = False) -> tuple[list[Record], int]:
    """Read and validate a JSONL file. Returns (records, number of skipped bad lines).

    The first bad line raises DataError("FILE:LINE: what is wrong") unless `skip_invalid`.
    Blank lines are ignored. An empty file (no record) is an error in both modes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    records: list[Record] = []
    skipped = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                records.append(parse_record(obj, where, index=len(records)))
            except DataError:
                if not skip_invalid:
                    raise
                skipped += 1
    if not records:
        raise DataError(f"{path}: empty file (no valid record)" if skipped == 0 else
                        f"{path}: no valid record ({skipped} bad lines skipped)")
    return records, skipped


def parse_prompt(obj, where: str) -> tuple[list[dict], str | None]:
    """A prompt to generate from: {"prompt": str} or {"messages": [...]} (a trailing assistant
    turn, the reference, is dropped), with an optional "domain". Returns (messages, domain)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    domain = obj.get("domain")
    if domain is not None and (not isinstance(domain, str) or not domain.strip()):
        raise DataError(f"{where}: field 'domain' must be a non-empty string")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant" and len(messages) > 1:
            messages = messages[:-1]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with a role "
                                f"({', '.join(ROLES)}) and string content")
        if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise DataError(f"{where}: the last message to answer must be a user turn with text")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise DataError(f"{where}: field 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages')")
    return messages, (domain.strip() if domain else None)


def jsonl_objects(lines: Iterable[str], name: str) -> Iterator[tuple[str, object]]:
    """(NAME:LINE, decoded value) of every non-blank JSONL line; invalid JSON raises DataError there."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_prompts(lines: Iterable[str], name: str) -> list[tuple[list[dict], str | None]]:
    """Prompts from JSONL lines (see parse_prompt); blank lines are skipped, the first bad one raises
    DataError("NAME:LINE: what is wrong")."""
    out = [parse_prompt(obj, where) for where, obj in jsonl_objects(lines, name)]
    if not out:
        raise DataError(f"{name}: no prompt")
    return out


def select_domains(records: Sequence[Record], domains: Iterable[str], path: str | Path = "data") -> list[Record]:
    """Keep the records of `domains`; a requested domain with no record is an error."""
    domains = list(domains)
    present = sorted({r.domain for r in records})
    for d in domains:
        if d not in present:
            raise DataError(f"{path}: no record of domain '{d}' (domains present: {', '.join(present)})")
    keep = set(domains)
    return [r for r in records if r.domain in keep]


def domains_of(records: Sequence[Record]) -> list[str]:
    """Domains in order of first appearance."""
    seen: dict[str, None] = {}
    for r in records:
        seen.setdefault(r.domain, None)
    return list(seen)


# --------------------------------------------------------------------------- tokenization


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    """Tokens before the last assistant turn's content: what the routers read."""
    domain: str
    index: int = 0
    truncated: bool = False
    prompt_cut: bool = False
    """The start of the prompt was dropped to fit max_length: the routers, which read the whole
    prompt at inference, would train on a view of it they never get, so they skip this row."""


def render_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]], int]:
    """Render `messages`; return (text, char spans of assistant turns, char start of the last one)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, messages[:i])
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        start = len(before) if full.startswith(before) else _common_prefix(full, before)
        end = len(upto) if full.startswith(upto) else len(full)
        # Keep the end-of-turn token, drop the template's trailing newline/whitespace.
        while end > start and full[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return full, spans, spans[-1][0]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_record(tokenizer, record: Record, max_length: int | None = None) -> Example:
    """Tokenize one record with the chat template; labels only on assistant tokens."""
    text, spans, last_start = _assistant_spans(tokenizer, record.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    prompt_len = len(ids)
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        if s >= last_start and prompt_len == len(ids):
            prompt_len = t
        if any(a <= s < b for a, b in spans):
            labels[t] = ids[t]
    truncated = prompt_cut = False
    if max_length is not None and len(ids) > max_length:
        truncated = True
        if prompt_len >= max_length // 2:
            # Keep the end of the prompt (closest to the response) and the start of the response.
            keep_resp = min(len(ids) - prompt_len, max_length - max_length // 2)
            cut = prompt_len - (max_length - keep_resp)
            ids, labels, prompt_len = ids[cut:], labels[cut:], prompt_len - cut
            prompt_cut = cut > 0
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels, prompt_len, record.domain, record.index, truncated, prompt_cut)


def encode_records(tokenizer, records: Sequence[Record], max_length: int | None = None) -> tuple[list[Example], int]:
    """Encode all records. Returns (examples, number truncated to max_length)."""
    examples = [encode_record(tokenizer, r, max_length) for r in records]
    return examples, sum(e.truncated for e in examples)


def collate(
    examples: Sequence[Example],
    pad_id: int,
    domains: Sequence[str] | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad a list of examples into a batch.

    Returns input_ids/attention_mask/labels/prompt_mask of shape (B, T) and, when `domains` is
    given, domain_ids (B,) with each row's index in `domains` and router_ids (B,): the same, or -1
    where the prompt was cut (Example.prompt_cut).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    prompt_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        o = 0 if padding_side == "right" else T - n
        input_ids[i, o : o + n] = torch.tensor(e.input_ids)
        labels[i, o : o + n] = torch.tensor(e.labels)
        attention_mask[i, o : o + n] = 1
        prompt_mask[i, o : o + e.prompt_len] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompt_mask": prompt_mask}
    if domains is not None:
        index = {d: k for k, d in enumerate(domains)}
        batch["domain_ids"] = torch.tensor([index[e.domain] for e in examples], dtype=torch.long)
        # The routers' targets: the domain, or -1 (no router loss) where the prompt was cut.
        batch["router_ids"] = torch.where(torch.tensor([e.prompt_cut for e in examples]), -1, batch["domain_ids"])
    return batch


# --------------------------------------------------------------------------- samplers
#
# Both samplers are pure functions of (seed, step): batch(step) is the same in every run and
# every process, so resuming needs only the step number and data-parallel ranks take
# disjoint slices of the same global batch.


def _perm(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class ShuffledSampler:
    """Natural proportions: epochs over a fresh permutation of all examples."""

    n: int
    batch_size: int
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def _at(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch not in self._cache:
            self._cache = {epoch: _perm(self.n, self.seed, epoch)}
        return self._cache[epoch][pos]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        rows = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self._at(k) for j, k in enumerate(rows) if j % world_size == rank]

    def steps_per_epoch(self) -> int:
        return max(1, -(-self.n // self.batch_size))


@dataclass
class DomainBalancedSampler:
    """Every global batch draws domains evenly (row k of the stream takes domain k mod D, in an
    order reshuffled every D rows); within a domain, examples are drawn in per-epoch
    permutations, so small domains are repeated and large ones subsampled."""

    domain_of: Sequence[int]
    """Domain id of every example."""
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        groups: dict[int, list[int]] = {}
        for i, d in enumerate(self.domain_of):
            groups.setdefault(int(d), []).append(i)
        if not groups:
            raise ValueError("DomainBalancedSampler needs at least one example")
        self.groups = [groups[d] for d in sorted(groups)]
        self._perms: dict[tuple[int, int], list[int]] = {}

    def _at(self, k: int) -> int:
        D = len(self.groups)
        rnd, slot = divmod(k, D)
        order = _perm(D, self.seed + 7919, rnd)
        g = order[slot]
        members = self.groups[g]
        epoch, pos = divmod(rnd, len(members))
        key = (g, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * D:
                self._perms.clear()
            self._perms[key] = _perm(len(members), self.seed + 104729 * (g + 1), epoch)
        return members[self._perms[key][pos]]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        rows = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self._at(k) for j, k in enumerate(rows) if j % world_size == rank]

    def steps_per_epoch(self) -> int:
        n = sum(len(g) for g in self.groups)
        return max(1, -(-n // self.batch_size))


@dataclass
class LengthGroupedSampler:
    """Batches of similar lengths from another sampler's stream, with its mix kept.

    The rows of the inner sampler's batches at steps [w*window, (w+1)*window) are regrouped by
    length and served, in a shuffled order, at those same steps: every row of the stream is
    still served once, in the same window of steps. With `domain_of`, each batch keeps exactly
    the domains the inner batch at its position had (a domain-balanced batch stays balanced, so
    the routers' loss still sees every domain each step): batch j of a window takes the j-th
    shortest share of each domain's rows in the window. Without it, the window's rows are
    sorted by length outright. Step-indexed and deterministic like the inner sampler, so a
    resumed run draws the same batches. window 1: the inner sampler's batches unchanged.
    """

    inner: object
    """A sampler with `batch(step)` and `batch_size` (DomainBalancedSampler, ShuffledSampler)."""
    lengths: Sequence[int]
    """Tokens of every example."""
    window: int = 8
    seed: int = 0
    domain_of: Sequence[int] | None = None
    """Domain id of every example: keep each batch's domain counts (stage 2)."""
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"the length-grouping window must be >= 1 batch, got {self.window}")
        self.batch_size = self.inner.batch_size

    def _window(self, w: int) -> list[list[int]]:
        if w not in self._cache:
            batches = [self.inner.batch(s) for s in range(w * self.window, (w + 1) * self.window)]
            key = lambda i: self.lengths[i]  # sorted() is stable: ties keep the stream's order
            if self.domain_of is None:
                pool = sorted((i for b in batches for i in b), key=key)
                chunks, at = [], 0
                for b in batches:
                    chunks.append(pool[at:at + len(b)])
                    at += len(b)
            else:
                dom = lambda i: int(self.domain_of[i])
                by_domain: dict[int, list[int]] = {}
                for b in batches:
                    for i in b:
                        by_domain.setdefault(dom(i), []).append(i)
                queues = {d: iter(sorted(rows, key=key)) for d, rows in by_domain.items()}
                # batch j: the inner batch j's domain counts, from each domain's next-shortest rows
                chunks = [[next(queues[dom(i)]) for i in b] for b in batches]
            self._cache = {w: [chunks[j] for j in _perm(self.window, self.seed + 15485863, w)]}
        return self._cache[w]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        if self.window == 1:
            return self.inner.batch(step, rank, world_size)
        rows = self._window(step // self.window)[step % self.window]
        return [k for j, k in enumerate(rows) if j % world_size == rank]

    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch()
