"""LLM-as-judge over `moa eval`'s generations.jsonl, through any OpenAI-compatible endpoint.

Pairwise mode: every record's two answers (systems `a` and `b`) are judged twice, once in each
order (A = a, B = b, then A = b, B = a). A pair is a win for `a` only when both orders prefer
`a`, a loss only when both prefer `b`; anything else (a split, a tie, an invalid verdict) is a
tie, so a judge's position bias cannot produce a win. A verdict that cannot be parsed is asked
for once more; if it still cannot be parsed the judgment is `invalid` (and its pair a tie).

Single mode: each answer is rated 1-10 on its own (MT-Bench's single-answer grading).

The judge sees the reference answer. Prompts come from a template file with the placeholders
{question} {reference} {domain} and {answer_a} {answer_b} (pairwise) or {answer} (single);
the defaults ship in `moa/judge_templates/`. Judgments are cached in the output directory,
keyed by judge model, template, mode, question, reference and the answers in their order, so
a re-run makes no request.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from moa.data import jsonl_objects
from moa.errors import MoAError
from moa.io import atomic_write_json, atomic_write_text

MODES = ("pairwise", "single")
PLACEHOLDERS = {"pairwise": ("question", "reference", "answer_a", "answer_b"),
                "single": ("question", "reference", "answer")}
"""Placeholders a template of each mode must contain ({domain} is optional)."""
CACHE_FILE = "judge_cache.jsonl"
CACHE_SAVE_EVERY = 32
"""New judgments between two saves of the cache, so an interrupted run keeps most of its work."""


# --------------------------------------------------------------------------- generations


@dataclass
class Item:
    """One record of the test set with the answers of the judged systems."""

    key: str
    """The record's position in the test set (or in its system's rows, for files without `index`)."""
    domain: str
    question: str
    reference: str
    answers: dict[str, str]


def _question_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def read_generations(path: str | Path, systems: list[str]) -> list[Item]:
    """The records of `path` (moa eval's generations.jsonl) with the answers of `systems`.

    Every line: {"system", "domain", "prompt" (messages or text), "reference", "output"} and,
    from moa eval, "index" (the record's position in the test set). Raises MoAError naming the
    file, line and field of a malformed line, or an unknown system.
    """
    path = Path(path)
    if not path.is_file():
        raise MoAError(f"--generations {path}: no such file")
    rows: dict[str, list[tuple[str, dict]]] = {}
    with open(path, encoding="utf-8") as f:
        for where, obj in jsonl_objects(f, str(path)):
            if not isinstance(obj, dict):
                raise MoAError(f"{where}: expected a JSON object")
            for field in ("system", "domain", "reference", "output"):
                if not isinstance(obj.get(field), str):
                    raise MoAError(f"{where}: field '{field}' must be a string")
            prompt = obj.get("prompt")
            ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt))
            if not ok:
                raise MoAError(f"{where}: field 'prompt' must be a string or a list of {{role, content}} messages "
                               "(generations.jsonl of an older moa eval have none: re-run moa eval)")
            if "index" in obj and not (isinstance(obj["index"], int) and not isinstance(obj["index"], bool)):
                raise MoAError(f"{where}: field 'index' must be an integer")
            rows.setdefault(obj["system"], []).append((where, obj))
    if not rows:
        raise MoAError(f"--generations {path}: no generation in the file")
    for name in systems:
        if name not in rows:
            raise MoAError(f"system '{name}' is not in {path} (systems: {', '.join(rows)})")
    per_system: dict[str, dict[str, tuple[str, dict]]] = {}
    for name in systems:
        keyed = {}
        for k, (where, obj) in enumerate(rows[name]):
            key = str(obj.get("index", f"#{k}"))
            if key in keyed:
                raise MoAError(f"{where}: system '{name}' has a second answer for record {key}")
            keyed[key] = (where, obj)
        per_system[name] = keyed
    first, *others = systems
    items = []
    for key, (where, obj) in per_system[first].items():
        answers = {first: obj["output"]}
        for name in others:
            if key not in per_system[name]:
                raise MoAError(f"{where}: record {key} has an answer of '{first}' but none of '{name}'")
            w2, o2 = per_system[name][key]
            if (o2["prompt"], o2["reference"], o2["domain"]) != (obj["prompt"], obj["reference"], obj["domain"]):
                raise MoAError(f"{w2}: record {key} of '{name}' has another prompt, reference or domain than {where}")
            answers[name] = o2["output"]
        items.append(Item(key, obj["domain"], _question_text(obj["prompt"]), obj["reference"], answers))
    for name in others:
        extra = sorted(set(per_system[name]) - set(per_system[first]))
        if extra:
            raise MoAError(f"{per_system[name][extra[0]][0]}: record {extra[0]} has an answer of '{name}' "
                           f"but none of '{first}'")
    return items


# --------------------------------------------------------------------------- templates and verdicts


def load_template(mode: str, path: str | Path | None = None) -> tuple[str, str]:
    """(template text, where it came from); checks the placeholders the mode needs."""
    if mode not in MODES:
        raise MoAError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if path is None:
        text = resources.files("moa").joinpath("judge_templates", f"{mode}.txt").read_text(encoding="utf-8")
        where = f"default:{mode}"
    else:
        p = Path(path)
        if not p.is_file():
            raise MoAError(f"--template {p}: no such file")
        text, where = p.read_text(encoding="utf-8"), str(p)
    missing = [n for n in PLACEHOLDERS[mode] if "{" + n + "}" not in text]
    if missing:
        raise MoAError(f"template {where} lacks the placeholder(s) {', '.join('{' + n + '}' for n in missing)} "
                       f"that --mode {mode} fills")
    return text, where


_PLACEHOLDER = re.compile(r"\{(question|reference|domain|answer_a|answer_b|answer)\}")


def render(template: str, **values: str) -> str:
    """Fill the placeholders in one pass: braces in answers (JSON, code) are left alone and an
    answer that contains "{answer_b}" is not filled again."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


_PAIRWISE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_verdict(mode: str, text: str):
    """Pairwise: "A" / "B" / "tie"; single: a rating in [1, 10]; None when there is none.
    The last verdict in the text counts (a judge may quote the format before answering)."""
    if mode == "pairwise":
        found = _PAIRWISE.findall(text or "")
        return None if not found else {"A": "A", "B": "B", "C": "tie"}[found[-1]]
    found = _RATING.findall(text or "")
    if not found:
        return None
    score = float(found[-1])
    return score if 1 <= score <= 10 else None


def wilson_interval(k: int, n: int, z: float = 1.959964) -> list[float] | None:
    """95% Wilson score interval of a proportion k/n (None for n = 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


# --------------------------------------------------------------------------- the endpoint


def check_url(url: str) -> str:
    """The chat-completions URL of an OpenAI-compatible base URL (…/v1) or of the full URL."""
    parsed = urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise MoAError(f"--judge-url {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class JudgeClient:
    """Chat completions with retries: 429 and 5xx (and dropped connections) are retried with
    exponential backoff and jitter, honouring Retry-After; other errors stop the run.

    Args:
        url: base URL (…/v1) or the full chat-completions URL.
        model: the judge model's name.
        api_key: sent as `Authorization: Bearer`; None sends none (local servers).
        max_retries: retries of one request after a retryable failure.
        backoff_s: the first retry's delay; doubled each retry (capped at 60 s).
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, *, max_tokens: int = 512,
                 timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0, key_hint: str = ""):
        import httpx

        self.url = check_url(url)
        self.model = model
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.key_hint = key_hint
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)
        self._lock = threading.Lock()
        self.requests = 0
        """HTTP requests sent (retries included)."""

    def close(self) -> None:
        self._http.close()

    def complete(self, prompt: str) -> str:
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": self.max_tokens}
        last = ""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests += 1
            delay = min(60.0, self.backoff_s * 2 ** attempt) * (1 + 0.25 * random.random())
            try:
                r = self._http.post(self.url, json=body)
            except httpx.ConnectError as e:  # refused, no route, unknown host: retrying does not help
                raise MoAError(f"cannot reach the judge endpoint {self.url} ({e})") from None
            except httpx.TransportError as e:  # timeouts, dropped connections
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 429 or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {_error_message(r)}"
                    retry_after = r.headers.get("retry-after", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        delay = min(60.0, float(retry_after))
                elif r.status_code >= 400:
                    hint = f" ({self.key_hint})" if r.status_code in (401, 403) and self.key_hint else ""
                    raise MoAError(f"the judge endpoint {self.url} answered HTTP {r.status_code}: "
                                   f"{_error_message(r)}{hint}")
                else:
                    try:
                        content = r.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise MoAError(f"the judge endpoint {self.url} did not answer in the chat-completions "
                                       f"format: {r.text[:200]!r}") from None
                    return content or ""
            if attempt < self.max_retries:
                time.sleep(delay)
        raise MoAError(f"the judge endpoint {self.url} failed {self.max_retries + 1} times; last: {last}")


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200] or r.reason_phrase


# --------------------------------------------------------------------------- judging


def _cache_key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


class _Cache:
    """DIR/judge_cache.jsonl: {key: {"verdict", "raw", "attempts"}}, rewritten atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["key"]] = e
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a damaged line is judged again
        self._lock = threading.Lock()
        self._unsaved = 0

    def put(self, entry: dict) -> None:
        with self._lock:
            self.entries[entry["key"]] = entry
            self._unsaved += 1
            if self._unsaved >= CACHE_SAVE_EVERY:
                self._save()

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.entries.values()))
        self._unsaved = 0


def run_judge(*, generations, a: str, b: str | None, out, url: str, model: str, mode: str = "pairwise",
              template: str | Path | None = None, api_key: str | None = None, concurrency: int = 4,
              max_retries: int = 5, backoff_s: float = 1.0, max_tokens: int = 512, timeout_s: float = 120.0,
              key_hint: str = "", progress: bool = True) -> dict:
    """Judge the answers of `a` against `b` (pairwise) or rate `a` (and `b`) alone (single).

    Writes OUT/judgments.jsonl (pairwise: one line per record and order), OUT/summary.json and
    the cache; returns the summary.
    """
    if mode not in MODES:
        raise MoAError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "pairwise" and not b:
        raise MoAError("--mode pairwise needs --b (the system judged against --a)")
    if b is not None and a == b:
        raise MoAError(f"--a and --b are the same system '{a}'")
    if concurrency < 1:
        raise MoAError(f"--concurrency must be >= 1, got {concurrency}")
    if max_retries < 0:
        raise MoAError(f"--max-retries must be >= 0, got {max_retries}")
    check_url(url)
    text, template_where = load_template(mode, template)
    systems = [a] + ([b] if b else [])
    items = read_generations(generations, systems)
    out = Path(out)
    if out.is_file():
        raise MoAError(f"--out {out} is a file, expected a directory")
    out.mkdir(parents=True, exist_ok=True)

    # One task per judgment: (item, order or system, the prompt's answers).
    tasks = []
    for it in items:
        if mode == "pairwise":
            for order, (first, second) in (("ab", (a, b)), ("ba", (b, a))):
                prompt = render(text, question=it.question, reference=it.reference, domain=it.domain,
                                answer_a=it.answers[first], answer_b=it.answers[second])
                key = _cache_key(mode, model, text, it.question, it.reference, it.answers[first], it.answers[second])
                tasks.append({"item": it, "order": order, "first": first, "second": second, "prompt": prompt,
                              "key": key})
        else:
            for name in systems:
                prompt = render(text, question=it.question, reference=it.reference, domain=it.domain,
                                answer=it.answers[name])
                key = _cache_key(mode, model, text, it.question, it.reference, it.answers[name])
                tasks.append({"item": it, "system": name, "prompt": prompt, "key": key})

    cache = _Cache(out / CACHE_FILE)
    todo = {t["key"]: t for t in tasks if t["key"] not in cache.entries}  # equal prompts are asked once
    client = JudgeClient(url, model, api_key, max_tokens=max_tokens, timeout_s=timeout_s, max_retries=max_retries,
                         backoff_s=backoff_s, key_hint=key_hint)
    stop = threading.Event()

    def judge(task: dict) -> None:
        raws = []
        verdict = None
        for _ in range(2):  # an unparseable verdict is asked for once more
            if stop.is_set():
                return
            raws.append(client.complete(task["prompt"]))
            verdict = parse_verdict(mode, raws[-1])
            if verdict is not None:
                break
        cache.put({"key": task["key"], "verdict": verdict, "raw": raws, "attempts": len(raws)})

    try:
        if todo:
            from tqdm.auto import tqdm

            with tqdm(total=len(todo), desc=f"judge {model}", disable=not progress, dynamic_ncols=True) as bar, \
                    ThreadPoolExecutor(max_workers=concurrency) as pool:  # the pool's threads end before the bar
                futures = [pool.submit(judge, t) for t in todo.values()]
                for f in futures:
                    f.add_done_callback(lambda _: bar.update(1))
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    stop.set()
                    for f in futures:
                        f.cancel()
            if failed:
                raise failed[0].exception()
    finally:
        cache.save()
        client.close()

    judgments = []
    for t in tasks:
        e = cache.entries[t["key"]]
        it = t["item"]
        row = {"index": it.key, "domain": it.domain}
        if mode == "pairwise":
            v = e["verdict"]
            winner = None if v is None else "tie" if v == "tie" else (t["first"] if v == "A" else t["second"])
            row.update({"order": t["order"], "A": t["first"], "B": t["second"],
                        "verdict": "invalid" if v is None else v, "winner": winner})
        else:
            row.update({"system": t["system"], "score": e["verdict"], "verdict": "invalid" if e["verdict"] is None
                        else "valid"})
        row.update({"attempts": e["attempts"], "cached": t["key"] not in todo, "judge": e["raw"][-1]})
        judgments.append(row)
    summary = (_pairwise_summary if mode == "pairwise" else _single_summary)(judgments, items, a, b)
    summary = {"mode": mode, "a": a, "b": b, "judge_model": model, "judge_url": client.url,
               "template": template_where, "generations": str(generations), **summary,
               "judgments": len(judgments), "invalid_judgments": sum(j["verdict"] == "invalid" for j in judgments),
               "new_requests": client.requests}
    atomic_write_text(out / "judgments.jsonl", "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in judgments))
    atomic_write_json(out / "summary.json", summary)
    return summary


def _pairwise_summary(judgments: list[dict], items: list[Item], a: str, b: str) -> dict:
    by_record: dict[str, dict[str, dict]] = {}
    for j in judgments:
        by_record.setdefault(j["index"], {})[j["order"]] = j
    domains: dict[str, dict[str, int]] = {}
    for it in items:
        orders = by_record[it.key]
        winners = {orders["ab"]["winner"], orders["ba"]["winner"]}
        counts = domains.setdefault(it.domain, {"win": 0, "tie": 0, "loss": 0, "invalid": 0, "pairs": 0})
        counts["pairs"] += 1
        if None in winners:
            counts["invalid"] += 1  # and a tie
        outcome = "win" if winners == {a} else "loss" if winners == {b} else "tie"
        counts[outcome] += 1
    total = {k: sum(c[k] for c in domains.values()) for k in ("win", "tie", "loss", "invalid", "pairs")}
    n = total["pairs"]
    overall = {**total, "win_rate": round(total["win"] / n, 4) if n else None,
               "win_rate_ci95": wilson_interval(total["win"], n),
               "loss_rate": round(total["loss"] / n, 4) if n else None,
               "loss_rate_ci95": wilson_interval(total["loss"], n)}
    return {"pairs": n, "domains": domains, "overall": overall}


def _single_summary(judgments: list[dict], items: list[Item], a: str, b: str | None) -> dict:
    def stats(scores: list[float], invalid: int) -> dict:
        n = len(scores)
        mean = sum(scores) / n if n else None
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else None
        half = 1.959964 * sd / math.sqrt(n) if sd is not None else None
        return {"mean": None if mean is None else round(mean, 4), "n": n, "invalid": invalid,
                "ci95": None if half is None else [round(mean - half, 4), round(mean + half, 4)]}

    systems = [a] + ([b] if b else [])
    domains: dict[str, dict] = {}
    for d in dict.fromkeys(it.domain for it in items):
        domains[d] = {}
        for s in systems:
            rows = [j for j in judgments if j["domain"] == d and j["system"] == s]
            domains[d][s] = stats([j["score"] for j in rows if j["score"] is not None],
                                  sum(j["score"] is None for j in rows))
    overall = {s: stats([j["score"] for j in judgments if j["system"] == s and j["score"] is not None],
                        sum(j["system"] == s and j["score"] is None for j in judgments)) for s in systems}
    return {"records": len(items), "domains": domains, "overall": overall}


def format_summary(summary: dict) -> str:
    """A markdown table of the summary."""
    if summary["mode"] == "pairwise":
        lines = [f"| domain | {summary['a']} wins | ties | {summary['b']} wins | invalid | pairs |",
                 "|---|---|---|---|---|---|"]
        for d, c in [*summary["domains"].items(), ("all", summary["overall"])]:
            lines.append(f"| {d} | {c['win']} | {c['tie']} | {c['loss']} | {c['invalid']} | {c['pairs']} |")
        o = summary["overall"]
        if o["win_rate_ci95"]:
            lines.append(f"\n{summary['a']} win rate {o['win_rate']:.3f} (95% CI {o['win_rate_ci95'][0]:.3f}-"
                         f"{o['win_rate_ci95'][1]:.3f}); {summary['b']} win rate {o['loss_rate']:.3f}")
    else:
        systems = list(summary["overall"])
        lines = ["| domain | " + " | ".join(f"{s} (1-10)" for s in systems) + " |", "|---|" + "---|" * len(systems)]
        for d, per in [*summary["domains"].items(), ("all", summary["overall"])]:
            cells = [("–" if per[s]["mean"] is None else f"{per[s]['mean']:.2f}") +
                     (f" ({per[s]['invalid']} invalid)" if per[s]["invalid"] else "") for s in systems]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append(f"\nrequests sent: {summary['new_requests']}")
    return "\n".join(lines)
