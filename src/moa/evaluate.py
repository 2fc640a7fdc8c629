"""`moa eval`: per-domain PPL, BLEU, ROUGE-L, exact match and routing accuracy for MoA and its
baselines, in one `metrics.json`.

Schema: {"domains": [...], "systems": {"<system>": {"<domain>": {"ppl", "bleu", "rouge_l",
"exact_match"}, "routing_accuracy": float | null}}}.

Systems:
  base         the frozen base model
  single_lora  each domain's stage-1 expert, told the domain
  mixed_lora   one LoRA trained on all data in natural proportions (a PEFT adapter dir)
  moa          MoA with vote routing; moa_last / moa_layer: the other routing decisions
  moa_explicit MoA told the domain (upper bound of routing)
Any other name given as NAME=DIR is evaluated as an MoA checkpoint (vote routing) or, if DIR
is a PEFT adapter, as a single LoRA.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from moa.errors import MoAError
from moa.layers import use_cpu_gemm


# --------------------------------------------------------------------------- text metrics


def normalize(text: str) -> str:
    """Lower-case, trim, collapse whitespace, drop surrounding punctuation/quotes."""
    t = " ".join(text.strip().lower().split())
    return t.strip(string.punctuation.replace("{", "").replace("}", "").replace("[", "").replace("]", "") + " ")


def text_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus BLEU (sacrebleu, 0-100), mean ROUGE-L F1 (rouge-score, 0-1), normalized exact match (0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not preds:
        return {"bleu": None, "rouge_l": None, "exact_match": None}
    bleu = sacrebleu.corpus_bleu(list(preds), [list(refs)]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_CharSafeTokenizer())
    rl = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)
    em = sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(preds)
    return {"bleu": round(bleu, 3), "rouge_l": round(rl, 4), "exact_match": round(em, 4)}


class _CharSafeTokenizer:
    """rouge-score's default tokenizer drops every non-alphanumeric token, so code and JSON lose
    their symbols; keep words, numbers and single symbols instead."""

    _re = re.compile(r"\w+|[^\w\s]", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._re.findall(text.lower())


# --------------------------------------------------------------------------- systems


@dataclass
class System:
    name: str
    forward: Callable[[dict], tuple[torch.Tensor, list[dict]]]
    """batch (with domain_names) -> (logits (B,T,V), per-row extras incl. "domain_routed")."""
    generate: Callable[[list, list[str]], list[tuple[str, str | None]]]
    """(prompt message lists, domain labels) -> [(text, routed domain or None)]."""
    routed: bool = False
    close: Callable[[], None] = lambda: None
    by_domain: bool = False
    """The system runs one domain at a time (single_lora): its records are batched domain by domain
    (by length within a domain), so a batch needs one adapter, not one per domain in it."""


def _hf_generate(model, tok, prompts: list, max_new_tokens: int, batch_size: int, lm=None, state=None) -> list[str]:
    """Greedy replies of a transformers / PEFT model, batch_size prompts at a time, left padded.

    lm: the model's `PrefixKV`: the first tokens every prompt of a batch shares (the chat
    template's system text) are then put before the padding, [prefix | pads | rest], and come from
    its cache; positions and attention are those of the left-padded batch, so the replies are the
    same up to float rounding. state: as `PrefixKV`'s."""
    from moa.scoring import shared_start

    texts = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        rendered = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chunk]
        rows = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
        P = shared_start(rows, min(map(len, rows)) - 1) if lm is not None and lm.cache_kw else 0
        cache = lm.batch_cache(torch.tensor(rows[0][:P], device=model.device), len(rows), state) if P else None
        P = P if cache is not None else 0  # no cache to copy into rows: whole prompts
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):  # left padded after the shared prefix
            ids[i, T - len(r) + P:], mask[i, T - len(r) + P:] = torch.tensor(r[P:]), 1
            ids[i, :P], mask[i, :P] = torch.tensor(r[:P], dtype=torch.long), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        kw = {lm.cache_kw: cache} if cache is not None else {}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id, **kw)
        for row in out[:, T:]:
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


def merges_exactly(model) -> bool:
    """Whether PEFT may merge adapters into this model's weights for evaluation: float32 weights
    only. The merged forward is the same function up to float32 rounding (about 1e-7 relative) at
    the bare base's cost; merged into bf16 or fp16 weights, the delta would lose its low bits, so
    those models keep PEFT's unmerged forward."""
    return all(p.dtype == torch.float32 for p in model.parameters())


def _merge(model, adapter: str) -> bool:
    """Merge PEFT adapter `adapter` into the weights (after unmerging any other); False if PEFT
    cannot merge this adapter (the unmerged forward then runs)."""
    model.unmerge_adapter()
    model.set_adapter(adapter)
    try:
        model.merge_adapter([adapter])
    except (NotImplementedError, ValueError, RuntimeError, TypeError):
        model.unmerge_adapter()
        return False
    return True


def peft_system(name: str, base: str, adapter: str | Path | None, max_new_tokens: int, batch_size: int,
                adapters_by_domain: dict[str, Path] | None = None) -> System:
    """The base model, one PEFT adapter, or (adapters_by_domain) each domain's own adapter.

    With float32 weights the adapter in use is merged into them (`merges_exactly`): PEFT's merge,
    and for each domain's own adapter a merge per change of domain, so the system runs at the bare
    base's cost."""
    from moa.base import load_base
    from moa.scoring import PrefixKV, causal_lm_forward, load_peft_adapter

    model, tok = load_base(base)
    use_cpu_gemm(model)  # the same GEMM as the MoA systems' (oneDNN at float32 CPU inference); PEFT wraps these
    merge = merges_exactly(model)
    if adapters_by_domain:
        from peft import PeftModel

        names = list(adapters_by_domain)
        model = PeftModel.from_pretrained(model, str(adapters_by_domain[names[0]]), adapter_name=names[0])
        for d in names[1:]:
            model.load_adapter(str(adapters_by_domain[d]), adapter_name=d)
        model.eval()
        current: list[str | None] = [None]  # the adapter merged into the weights now
        merging = [merge]

        def use(d: str) -> None:
            if not merging[0]:
                model.set_adapter(d)
            elif current[0] != d:
                merging[0] = _merge(model, d)  # once PEFT cannot merge, every domain runs unmerged
                current[0] = d if merging[0] else None

        lm = PrefixKV(model)

        def fwd(batch):
            logits = None
            rows = batch["domain_names"]
            for d in sorted(set(rows)):
                idx = [i for i, r in enumerate(rows) if r == d]
                use(d)
                with torch.no_grad():
                    lg = lm.logits(batch["input_ids"][idx], batch["attention_mask"][idx],
                                   batch.get("logits_to_keep", 0), batch.get("prefix_len", 0), state=d)
                if logits is None:
                    logits = lg.new_zeros(len(rows), *lg.shape[1:])
                logits[idx] = lg
            return logits, [{} for _ in rows]

        def gen(prompts, doms):
            texts = [""] * len(prompts)
            for d in sorted(set(doms)):
                idx = [i for i, x in enumerate(doms) if x == d]
                use(d)
                for i, t in zip(idx, _hf_generate(model, tok, [prompts[i] for i in idx], max_new_tokens, batch_size,
                                                  lm, state=d)):
                    texts[i] = t
            return [(t, None) for t in texts]

        return System(name, fwd, gen, by_domain=True)
    if adapter is not None:
        model = load_peft_adapter(model, adapter)
        if merge:
            _merge(model, model.active_adapter)
    lm = PrefixKV(model)
    return System(name, causal_lm_forward(model, lm),
                  lambda prompts, doms: [(t, None) for t in _hf_generate(model, tok, prompts, max_new_tokens, batch_size,
                                                                         lm)])


def moa_system(name: str, moa_dir, routing: str, max_new_tokens: int, batch_size: int, model=None,
               fallback: str | float | None = None) -> System:
    """fallback: `--fallback` off|auto|P for a model loaded here (None: the checkpoint's, auto)."""
    from moa.fallback import set_fallback
    from moa.model import MoAModel
    from moa.scoring import moa_forward

    if model is None:
        model = MoAModel.from_pretrained(moa_dir)
        set_fallback(model, fallback)
    fwd, _ = moa_forward(model, routing)

    def gen(prompts, doms):
        out = []
        for s in range(0, len(prompts), batch_size):
            res = model.generate(prompts[s : s + batch_size], routing=routing,
                                 domains=doms[s : s + batch_size] if routing == "explicit" else None,
                                 max_new_tokens=max_new_tokens, do_sample=False)
            out.extend((r.text.strip(), r.domain) for r in res)
        return out

    return System(name, fwd, gen, routed=routing != "explicit")


def moe_system(name: str, path, max_new_tokens: int, batch_size: int) -> System:
    from moa.baselines import MoELoRA

    m = MoELoRA.load(path)

    def fwd(batch):
        with torch.no_grad():
            logits, _ = m(batch["input_ids"], batch["attention_mask"])
        return logits, [{} for _ in range(logits.shape[0])]

    def gen(prompts, doms):
        texts = []
        for s in range(0, len(prompts), batch_size):
            texts += m.generate_texts(prompts[s : s + batch_size], max_new_tokens)
        return [(t, None) for t in texts]

    return System(name, fwd, gen)


def classifier_system(name: str, path, max_new_tokens: int, batch_size: int) -> System:
    """A classifier on the base's prompt embedding picks one stage-1 expert per request."""
    from moa.baselines import ClassifierRouter

    cr = ClassifierRouter(path)

    def fwd(batch):
        pred = cr.predict_batch(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"])
        with torch.no_grad():
            out = cr.moa(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], domains=pred)
        return out.logits, [{"domain_routed": d} for d in pred]

    def gen(prompts, doms):
        out = []
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            pred = cr.predict(chunk)
            res = cr.moa.generate(chunk, routing="explicit", domains=pred, max_new_tokens=max_new_tokens)
            out += [(r.text.strip(), d) for r, d in zip(res, pred)]
        return out

    return System(name, fwd, gen, routed=True)


# --------------------------------------------------------------------------- evaluation


def first_per_domain(records, limit: int | None) -> list[int]:
    """Indices of the first `limit` records of each domain, in file order (all when None)."""
    seen: dict[str, int] = {}
    keep = []
    for i, r in enumerate(records):
        if limit is None or seen.get(r.domain, 0) < limit:
            keep.append(i)
            seen[r.domain] = seen.get(r.domain, 0) + 1
    return keep


def evaluate_system(system: System, records, tok, *, batch_size: int = 8, max_length: int = 1024,
                    generate: bool = True, generate_limit: int | None = None, progress: bool = True,
                    generate_batch_size: int | None = None) -> dict:
    """Metrics of one system over `records`: {domain: {...}, "routing_accuracy": ...}.

    PPL and routing use every record; the text metrics (greedy generation, the costly part) use
    the first `generate_limit` records of each domain (all when None). `generate_batch_size`: the
    prompts handed to the system's generation at once (default: `batch_size`); a decode step is
    bound by reading the weights, so more rows per step cost little more than a few.
    """
    gen_bs = batch_size if generate_batch_size is None else generate_batch_size
    if gen_bs <= 0 or batch_size <= 0:
        raise MoAError(f"batch sizes must be positive, got {batch_size} (scoring) and {gen_bs} (generation)")
    from moa.data import encode_records
    from moa.scoring import score_examples, summarize

    examples, _ = encode_records(tok, records, max_length)
    rows = score_examples(system.forward, examples, tok.pad_token_id, batch_size, progress, desc=f"{system.name} ppl",
                          by_domain=system.by_domain)
    ppl = summarize(rows)
    result: dict = {}
    gens: dict[int, tuple[str, str | None]] = {}
    if generate:
        # Shortest prompts first: a batch then holds prompts of similar length, so little left
        # padding is run (as scoring batches by length); replies are keyed by record, so the
        # order changes no number. Ties keep file order. A system that runs one domain at a time
        # gets them domain by domain.
        key = ((lambda i: (records[i].domain, examples[i].prompt_len)) if system.by_domain
               else (lambda i: examples[i].prompt_len))
        chosen = sorted(first_per_domain(records, generate_limit), key=key)
        prompts = [records[i].prompt_messages for i in chosen]
        doms = [records[i].domain for i in chosen]
        from tqdm.auto import tqdm

        replies = []
        with tqdm(total=len(prompts), desc=f"{system.name} generate", disable=not progress, dynamic_ncols=True,
                  mininterval=1.0) as bar:
            for s in range(0, len(prompts), gen_bs):  # in batches, for the progress bar
                replies += system.generate(prompts[s : s + gen_bs], doms[s : s + gen_bs])
                bar.update(len(prompts[s : s + gen_bs]))
        gens = dict(zip(chosen, replies))
    for d in sorted({r.domain for r in records}, key=[r.domain for r in records].index):
        m = {"ppl": round(ppl[d]["ppl"], PPL_DECIMALS)}
        idx = [i for i in gens if records[i].domain == d]
        if generate:
            m.update(text_metrics([gens[i][0] for i in idx], [records[i].response for i in idx]))
        else:
            m.update({"bleu": None, "rouge_l": None, "exact_match": None})
        result[d] = m
    if system.routed:
        # routing accuracy from the decisions made on the prompts during scoring
        routed_right = [r.get("domain_routed") == r["domain"] for r in rows]
        result["routing_accuracy"] = round(sum(routed_right) / max(1, len(routed_right)), 4)
        result["_routed"] = [r.get("domain_routed") for r in rows]  # per record, in order
    else:
        result["routing_accuracy"] = None
    # index and prompt: `moa judge` pairs the systems' answers by record and shows the judge the question
    result["_generations"] = [{"index": i, "domain": records[i].domain, "prompt": records[i].prompt_messages,
                               "reference": records[i].response, "output": g[0], "routed": g[1]}
                              for i, g in sorted(gens.items())]
    return result


def stage1_adapters(cfg) -> dict[str, Path] | None:
    """The stage-1 adapters an MoA checkpoint (its MoAConfig) was assembled from, by provenance."""
    prov = cfg.provenance or {}
    found = prov.get("assembled_from") or (prov.get("stage1") or {})
    if not found:
        return None
    paths = {d: Path(p) for d, p in found.items()}
    return paths if all((p / "adapter_config.json").is_file() for p in paths.values()) else None


DEFAULT_SYSTEMS = ["base", "single_lora", "mixed_lora", "moa"]
GENERATE_BATCH_SIZE = 32
"""Prompts generated together in `run_eval`. A KV-cached decode step reads every weight once
whatever the rows, so 32 rows cost far less than four steps of 8 (docs/RESULTS.md, Performance II:
32 prompts x 40 tokens of the base took 1.8-2x less time at 32 than at 8 on 2 CPU cores)."""

PPL_DECIMALS = 6
"""Decimals of the PPLs in metrics.json. Near-deterministic domains (a fixed answer format) score
PPLs of 1.0000x: at 4 decimals a model with a quarter of the other's loss there (1.00003 against
1.00012) would read as a tie. Tables show fewer."""


def run_eval(moa_dir, data, out, systems=None, *, routing="vote", mixed_lora=None, single_lora=None,
             extra: dict[str, str] | None = None, limit_per_domain: int | None = None,
             generate_limit_per_domain: int | None = None, batch_size: int = 8, max_new_tokens: int = 64,
             max_length: int = 1024, generate: bool = True, progress: bool = True,
             fallback: str | float | None = None, generate_batch_size: int = GENERATE_BATCH_SIZE,
             routed: dict | None = None) -> dict:
    """Evaluate `systems` on the labelled JSONL `data`; writes metrics.json, generations.jsonl, plots.

    fallback: the MoA systems' out-of-domain fallback, `--fallback` off|auto|P (None: auto); a
    routed prompt sent to the base model counts as routed wrong.

    limit_per_domain: use only the first N records of each domain (all when None).
    generate_limit_per_domain: of those, generate replies (text metrics) for the first N only.
    batch_size: records scored together; generate_batch_size: prompts generated together.
    routed: a dict to receive, per routed system, the domain its scoring routed each evaluated
        record to (None: the fallback's base model), in the data's order: a routing report needs
        no routing pass of its own.
    """
    from moa.base import DEFAULT_BASE
    from moa.data import read_records
    from moa.io import atomic_write_json, atomic_write_text
    from moa.checkpoint import MoAConfig
    from moa.model import MoAModel

    for name, v in (("batch_size", batch_size), ("generate_batch_size", generate_batch_size)):
        if v <= 0:
            raise MoAError(f"{name} must be positive, got {v}")
    for name, v in (("limit_per_domain", limit_per_domain), ("generate_limit_per_domain", generate_limit_per_domain)):
        if v is not None and v <= 0:
            raise MoAError(f"{name} must be a positive number of records, got {v}")
    moa_dir = Path(moa_dir)
    cfg = MoAConfig.read(moa_dir)  # present, valid JSON, a format this moa reads
    base = cfg.base or DEFAULT_BASE
    records, _ = read_records(data)
    unknown = sorted({r.domain for r in records} - set(cfg.domains))
    if unknown:
        raise MoAError(f"{data}: unknown domain(s) {', '.join(unknown)} (the model's domains: {', '.join(cfg.domains)})")
    records = [records[i] for i in first_per_domain(records, limit_per_domain)]
    systems = list(systems or DEFAULT_SYSTEMS)
    extra = dict(extra or {})
    single = {d: Path(p) for d, p in single_lora.items()} if isinstance(single_lora, dict) else (
        _adapters_in(Path(single_lora), cfg.domains) if single_lora else stage1_adapters(cfg))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    domains = [d for d in cfg.domains if any(r.domain == d for r in records)]
    n_gen = len(first_per_domain(records, generate_limit_per_domain)) if generate else 0
    metrics = {"domains": domains, "systems": {}, "data": str(data), "moa": str(moa_dir),
               "n_records": len(records), "n_generated": n_gen,
               "records_per_domain": {d: sum(r.domain == d for r in records) for d in domains}}
    generations = {}
    moa_model = None
    for name in systems:
        if name == "base":
            sys_ = peft_system(name, base, None, max_new_tokens, generate_batch_size)
        elif name == "single_lora":
            if not single:
                print("moa: skipping single_lora: no stage-1 adapters recorded; pass --single-lora", file=sys.stderr)
                continue
            sys_ = peft_system(name, base, None, max_new_tokens, generate_batch_size, adapters_by_domain=single)
        elif name == "mixed_lora":
            if not mixed_lora:
                print("moa: skipping mixed_lora: pass --mixed-lora ADAPTER_DIR", file=sys.stderr)
                continue
            sys_ = peft_system(name, base, mixed_lora, max_new_tokens, generate_batch_size)
        elif name in ("moa", "moa_last", "moa_layer", "moa_explicit"):
            r = {"moa": routing, "moa_last": "last", "moa_layer": "layer", "moa_explicit": "explicit"}[name]
            if moa_model is None:
                from moa.fallback import set_fallback

                moa_model = MoAModel.from_pretrained(moa_dir)
                set_fallback(moa_model, fallback)
            sys_ = moa_system(name, moa_dir, r, max_new_tokens, generate_batch_size, model=moa_model)
        elif name in extra:
            path = Path(extra[name])
            if (path / "moe_gates.safetensors").is_file():
                sys_ = moe_system(name, path, max_new_tokens, generate_batch_size)
            elif (path / "classifier.json").is_file():
                sys_ = classifier_system(name, path, max_new_tokens, generate_batch_size)
            elif (path / "moa_config.json").is_file():
                sys_ = moa_system(name, path, "vote", max_new_tokens, generate_batch_size, fallback=fallback)
            elif (path / "adapter_config.json").is_file():
                sys_ = peft_system(name, base, path, max_new_tokens, generate_batch_size)
            else:
                raise MoAError(f"system {name}: {path} is neither an MoA checkpoint nor a PEFT adapter")
        else:
            raise MoAError(f"unknown system '{name}' (known: base, single_lora, mixed_lora, moa, moa_last, "
                           f"moa_layer, moa_explicit, or NAME=DIR)")
        tok = moa_model.tokenizer if moa_model is not None else None
        if tok is None:
            from moa.base import load_tokenizer

            tok = load_tokenizer(base)
        res = evaluate_system(sys_, records, tok, batch_size=batch_size, max_length=max_length,
                              generate=generate, generate_limit=generate_limit_per_domain, progress=progress,
                              generate_batch_size=generate_batch_size)
        generations[name] = res.pop("_generations")
        routed_rows = res.pop("_routed", None)
        if routed is not None and routed_rows is not None:
            routed[name] = routed_rows
        metrics["systems"][name] = res
        atomic_write_json(out / "metrics.json", metrics)  # after every system: partial results survive
    atomic_write_text(out / "generations.jsonl",
                      "".join(json.dumps({"system": s, **g}) + "\n" for s, gs in generations.items() for g in gs))
    plot_metric_bars(metrics, out)
    return metrics


def _adapters_in(root: Path, domains) -> dict[str, Path]:
    found = {d: root / d for d in domains if (root / d / "adapter_config.json").is_file()}
    if len(found) != len(domains):
        missing = [d for d in domains if d not in found]
        raise MoAError(f"--single-lora {root}: no adapter for domain(s) {', '.join(missing)} (expected {root}/<domain>/)")
    return found


def plot_metric_bars(metrics: dict, out: Path) -> None:
    """One PNG per metric: per-domain bars, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, systems = metrics["domains"], list(metrics["systems"])
    for key, label in (("ppl", "perplexity (lower is better)"), ("rouge_l", "ROUGE-L F1"),
                       ("exact_match", "exact match"), ("bleu", "BLEU")):
        fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(domains), 3.6), dpi=110)
        w = 0.8 / max(1, len(systems))
        drawn = False
        for k, s in enumerate(systems):
            vals = [metrics["systems"][s].get(d, {}).get(key) for d in domains]
            if all(v is None for v in vals):
                continue
            drawn = True
            ax.bar([i + k * w for i in range(len(domains))], [v if v is not None else 0 for v in vals], w, label=s)
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(domains))], domains)
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"metric_{key}.png")
        plt.close(fig)


def format_table(metrics: dict) -> str:
    """A markdown table: one row per system, PPL / EM per domain, routing accuracy."""
    domains = metrics["domains"]
    head = "| system | " + " | ".join(f"{d} PPL" for d in domains) + " | " + " | ".join(f"{d} EM" for d in domains) + " | routing acc |"
    sep = "|" + "---|" * (2 * len(domains) + 2)
    lines = [head, sep]
    for s, m in metrics["systems"].items():
        ppl = " | ".join(_fmt(m.get(d, {}).get("ppl"), 4) for d in domains)
        em = " | ".join(_fmt(m.get(d, {}).get("exact_match"), 2) for d in domains)
        lines.append(f"| {s} | {ppl} | {em} | {_fmt(m.get('routing_accuracy'), 4)} |")
    return "\n".join(lines)


def _fmt(v, nd):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


# --------------------------------------------------------------------------- routing accuracy


@torch.no_grad()
def route_records(model, examples, routing: str = "vote", batch_size: int = 16, progress: bool = True):
    """Route each example's prompt. Returns (predicted domain per example, None where the model's
    fallback chose the base model; probs (N, E) or None)."""
    from tqdm.auto import tqdm

    from moa.data import IGNORE_INDEX, Example, collate

    prompts = [Example(e.input_ids[: e.prompt_len], [IGNORE_INDEX] * e.prompt_len, e.prompt_len, e.domain, e.index)
               for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    preds: list[str] = [""] * len(prompts)
    probs = torch.zeros(len(prompts), len(model.domains))
    with tqdm(total=len(prompts), desc=f"route ({routing})", disable=not progress, dynamic_ncols=True) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = collate([prompts[i] for i in idx], model.tokenizer.pad_token_id, padding_side="left")
            ids, probs_b = model.route(b["input_ids"], b["attention_mask"], routing=routing)
            names = model.domain_names(ids)  # None: the fallback sent the prompt to the base model
            for k, i in enumerate(idx):
                preds[i] = names[k]
                if probs_b is not None:
                    probs[i] = probs_b[k].float()
            bar.update(len(idx))
    return preds, probs


FALLBACK_COLUMN = "(base)"
"""The confusion matrix's column of prompts the fallback sent to the base model (no domain name
can be spelled so); such a prompt counts as routed wrong."""


def routing_report(labels: list[str], preds: list[str | None], domains: list[str]) -> dict:
    """accuracy, per_domain accuracy, confusion {true: {predicted: count}} and fallback (the
    fraction of prompts sent to the base model: predicted None)."""
    cols = domains + ([FALLBACK_COLUMN] if None in preds else [])
    confusion = {d: {p: 0 for p in cols} for d in sorted(set(labels), key=lambda d: (d not in domains, d))}
    preds = [FALLBACK_COLUMN if p is None else p for p in preds]
    for t, p in zip(labels, preds):
        confusion[t][p] = confusion[t].get(p, 0) + 1
    per = {d: (row.get(d, 0) / max(1, sum(row.values()))) for d, row in confusion.items()}
    acc = sum(t == p for t, p in zip(labels, preds)) / max(1, len(labels))
    fallback = sum(p == FALLBACK_COLUMN for p in preds) / max(1, len(preds))
    return {"accuracy": acc, "per_domain": per, "confusion": confusion, "n": len(labels), "fallback": fallback}


def plot_confusion(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(report["confusion"])
    cols = list(next(iter(report["confusion"].values())).keys()) if rows else []
    m = torch.tensor([[report["confusion"][r].get(c, 0) for c in cols] for r in rows], dtype=torch.float)
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(cols), 1.0 + 0.6 * len(rows)), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black",
                    fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("routed to")
    ax.set_ylabel("domain label")
    ax.set_title(f"{title}: accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
