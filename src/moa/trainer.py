"""One training loop for every stage (stage-1 experts, stage-2 mixture, router refits, baselines).

It owns what all of them share: accelerate (data-parallel processes), its own bf16 autocast, the
deterministic step-indexed samplers, global-batch loss normalisation, gradient accumulation,
atomic checkpoints with exact resume, Ctrl-C, progress bar, `train_log.jsonl` and `loss.png`.
A stage supplies only `loss_fn(model, batch) -> (loss, metrics)` and what to save.

Loss normalisation: `loss_fn` returns sums divided by the *global* batch's label-token count
(`batch["global_tokens"]`) or row count (`batch["global_rows"]`). Data-parallel gradients are
averaged over ranks, so each rank's loss is multiplied by the world size: N processes, any
gradient accumulation, and one process with the same global batch give the same gradient.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from moa.data import IGNORE_INDEX, Example, collate
from moa.device import bf16_native, current, resolve_bf16
from moa.errors import MoAError
from moa.losses import label_nll
from moa.io import atomic_dir, atomic_write_json, atomic_write_text, check_out_dir, load_tensors, save_tensors


@dataclass
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps. Exactly one of max_steps / epochs is used (max_steps wins)."""
    epochs: float | None = None
    """Passes over the data (natural proportions) when max_steps is not given."""
    batch_size: int = 8
    """Global batch size in records (over all processes and accumulation steps)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each process."""
    length_split: int | None = None
    """Run each micro-batch's rows, sorted by length, as at most this many passes, cut where they pad
    the fewest tokens (each pass is padded only to its own longest row, and a cut must save more
    than a pass costs, `PASS_COST_TOKENS`). The gradient is the same: losses are normalised by the
    global batch. None: 8 on a CPU; 1 (off) on other devices, where it was not measured."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    """Fraction of steps with linear warm-up; then linear decay to 10% of lr."""
    max_grad_norm: float = 1.0
    max_length: int = 512
    seed: int = 0
    bf16: bool | None = None
    """bf16 autocast; None follows $MOA_BF16, by default on where the hardware computes bf16
    natively (AVX-512 bf16 / AMX, CUDA with bf16)."""
    save_every: int = 0
    """Checkpoint every N steps under OUT/checkpoints (0 = only at the end / on Ctrl-C)."""
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    eval_data: str | None = None
    """Validation JSONL: its mean NLL per label token (and stage 2's router accuracy) is logged."""
    eval_every: int = 0
    """Validate every N steps (0: only after the last step). Needs eval_data."""
    keep_best: bool = False
    """The run's output is the weights of the validation with the lowest loss, not the last step's."""
    early_stopping_patience: int = 0
    """Stop after this many validations without a lower validation loss (0: never)."""
    keep_best_per_domain: bool = False
    """Also validate each domain of eval_data on its own and keep, per domain, the weights of its
    lowest validation loss (`Trainer.best_by_domain`; `moa fit` starts each expert from them)."""
    report_to: str = "none"
    """Experiment tracker for the scalars: 'none' or 'tensorboard' (events under OUT/tensorboard)."""

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps <= 0:
            raise MoAError(f"--max-steps must be positive, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise MoAError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise MoAError(f"--batch-size must be positive, got {self.batch_size}")
        if self.grad_accum <= 0:
            raise MoAError(f"--grad-accum must be positive, got {self.grad_accum}")
        if self.length_split is not None and (isinstance(self.length_split, bool) or
                                              not isinstance(self.length_split, int) or self.length_split < 1):
            raise MoAError(f"--length-split must be a whole number of passes >= 1, got {self.length_split!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MoAError(f"--lr must be a positive number, got {self.lr}")
        if self.max_length < 8:
            raise MoAError(f"--max-length must be at least 8, got {self.max_length}")
        if self.save_every < 0:
            raise MoAError(f"--save-every must be >= 0, got {self.save_every}")
        if self.eval_every < 0:
            raise MoAError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.early_stopping_patience < 0:
            raise MoAError(f"--early-stopping-patience must be >= 0, got {self.early_stopping_patience}")
        if (self.keep_best or self.early_stopping_patience or self.eval_every or self.keep_best_per_domain) \
                and not self.eval_data:
            raise MoAError("--eval-every, --keep-best, --keep-best-per-domain and --early-stopping-patience need "
                           "--eval-data FILE")
        if self.eval_data and not Path(self.eval_data).is_file():
            raise MoAError(f"--eval-data {self.eval_data}: no such file")
        if self.report_to not in REPORT_TO:
            raise MoAError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        resolve_bf16(self.bf16)  # a bad $MOA_BF16 fails here, before a run writes anything

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil((self.epochs or 1.0) * steps_per_epoch))


REPORT_TO = ("none", "tensorboard")


def bf16_supported() -> bool:
    """Whether the device `--device auto` picks computes bf16 natively (see moa.device)."""
    return bf16_native(None)


def load_eval_examples(cfg: TrainConfig, tok, domains: Sequence[str] | None) -> list[Example] | None:
    """cfg.eval_data encoded like the training data, restricted to `domains` (None: all)."""
    if not cfg.eval_data:
        return None
    from moa.data import encode_records, read_records

    records, _ = read_records(cfg.eval_data)
    if domains is not None:
        records = [r for r in records if r.domain in set(domains)]
    if not records:
        raise MoAError(f"--eval-data {cfg.eval_data}: no record of domain(s) {', '.join(domains or [])}")
    examples, _ = encode_records(tok, records, cfg.max_length)
    if not any(l != IGNORE_INDEX for e in examples for l in e.labels[1:]):
        raise MoAError(f"--eval-data {cfg.eval_data}: no response token left after truncation to "
                       f"--max-length {cfg.max_length}")
    return examples


# --------------------------------------------------------------------------- output dir / checkpoints

_CKPT = re.compile(r"^step-(\d+)$")


def prepare_out_dir(out: Path, run_config: dict, *, resume: bool, overwrite: bool, is_main: bool = True) -> None:
    """Refuse to mix two different runs in one directory (the policy of `moa.io.check_out_dir`, plus
    --resume: only into a run with the same train_config.json)."""
    out = check_out_dir(out, overwrite=overwrite or resume, resumable=True)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if overwrite:
        if is_main and not resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return
    old = None
    cfg_path = out / "train_config.json"
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
    if old is None or _comparable(old) != _comparable(run_config):
        raise MoAError(f"--resume: {out} holds a different run (its train_config.json differs); "
                       "use a new --out or --overwrite")


def start_run(out: Path, run_config: dict, *, resume: bool, overwrite: bool) -> bool:
    """Check `out` (see prepare_out_dir) and record the run's config in it at once, so that a
    run killed at any moment can be resumed. Returns whether this is the main process."""
    from accelerate import PartialState

    # The Trainer's Accelerator reuses this state: both follow the run's --device.
    state = PartialState(cpu=current().device.type != "cuda")
    is_main = state.is_main_process
    prepare_out_dir(out, run_config, resume=resume, overwrite=overwrite, is_main=is_main)
    state.wait_for_everyone()  # every rank has checked OUT before rank 0 writes into it
    if is_main:
        atomic_write_json(out / "train_config.json", run_config)
    return is_main


def _comparable(cfg: dict) -> dict:
    # Options that may change between an interrupted run and its resume.
    # Validation and tracking do not change the training trajectory either.
    # length_split changes how a batch is cut into passes, not its gradient.
    skip = {"save_every", "resume", "overwrite", "world_size", "debug", "keep_checkpoints", "eval_data", "eval_every",
            "keep_best", "early_stopping_patience", "report_to", "length_split"}
    out = {k: v for k, v in cfg.items() if k not in skip}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if k not in skip}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def newest_checkpoint(out: Path) -> Path | None:
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def _rng_tensors() -> dict[str, torch.Tensor]:
    t = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"cuda{i}"] = s
    return t


def _set_rng(t: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(t["torch"])
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(t) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int
    log: list[dict]
    interrupted: bool = False
    seconds: float = 0.0
    best: dict | None = None
    """{"step", "val_loss", "kept"} of the lowest validation loss (None without --eval-data)."""
    stopped_early: bool = False


PASS_COST_TOKENS = 128
"""What one more pass costs, in padded tokens, when `length_split` decides where to cut: a cut is
made only where it saves more. Measured on a 2-core CPU, float32 (docs/RESULTS.md, Performance II):
4 rows cut into 4 one-row passes ran slower than one padded pass, 8 rows in 2 or 4 passes faster."""


def length_split(examples: Sequence[Example], passes: int, pass_cost: int = PASS_COST_TOKENS) -> list[list[Example]]:
    """The examples sorted by length (ties in order) and cut into at most `passes` runs of consecutive
    lengths, where the runs, each padded to its longest, cost the fewest tokens in all, counting
    `pass_cost` tokens per run.

    A batch of 2-token answers and 200-token paragraphs then pads the short rows to their own
    length, not to the paragraphs'. Exact (dynamic programming over the cut points: O(passes n^2)).
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    lengths = [len(examples[i].input_ids) for i in order]
    n, k_max = len(order), max(1, min(passes, len(order)))
    if k_max == 1:
        return [list(examples)] if examples else []
    # best[k][j]: fewest tokens of the first j sorted rows in k runs; cut[k][j]: where the last run starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    best[0][0] = 0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (j - i) * lengths[j - 1]
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, k_max + 1), key=lambda k: (best[k][n] + pass_cost * k, k))  # the fewest among the cheapest
    if k == 1:
        return [list(examples)]
    runs, j = [], n
    while k:
        i = cut[k][j]
        runs.append([examples[order[m]] for m in range(i, j)])
        j, k = i, k - 1
    return runs[::-1]


def causal_lm_loss_sum(model, batch: dict) -> torch.Tensor:
    """LM loss sum for a transformers CausalLM (or PEFT model), computing the vocabulary
    projection only at positions that have a label (most tokens are prompt or padding)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                output_hidden_states=True, use_cache=False)
    head = getattr(model, "module", model).get_output_embeddings()  # frozen head, outside DDP's forward
    return label_nll(batch["labels"], hidden=out.hidden_states[-1], head=head)[0].sum()


class Trainer:
    """Runs `loss_fn` over step-indexed batches with AdamW, checkpoints and resume."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        params: Sequence[torch.nn.Parameter] | Sequence[dict],
        examples: Sequence[Example],
        sampler,
        loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
        cfg: TrainConfig,
        out: Path,
        pad_id: int,
        domains: Sequence[str] | None = None,
        state_fn: Callable[[], dict[str, torch.Tensor]],
        load_state_fn: Callable[[dict[str, torch.Tensor]], None],
        desc: str = "train",
        log_prefix: str = "",
        accelerator=None,
        update_scales: Sequence[tuple[torch.nn.Parameter, torch.Tensor]] = (),
        eval_examples: Sequence[Example] | None = None,
        start_is_candidate: bool = False,
    ):
        """start_is_candidate: the starting weights were trained (an expert from a seed LoRA), so
        with keep_best they are validated at step 0 and kept if no step beats them."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        self.out = Path(out)
        self.examples = examples
        self.sampler = sampler
        self.loss_fn = loss_fn
        self.pad_id = pad_id
        self.domains = domains
        self.state_fn = state_fn
        self.load_state_fn = load_state_fn
        # Validation reuses `loss_fn` on batches whose global counts are 1, so that it returns sums.
        self.eval_examples = list(eval_examples or [])
        self.best: dict | None = None  # {"step", "val_loss"} of the lowest validation loss so far
        self.best_state: dict[str, torch.Tensor] | None = None  # its weights, with --keep-best
        # keep_best_per_domain: {domain: {"step", "val_loss"}} and their weights
        self.best_by_domain: dict[str, dict] = {}
        self.best_state_by_domain: dict[str, dict[str, torch.Tensor]] = {}
        self.evals_without_improvement = 0
        self.start_is_candidate = start_is_candidate
        self.desc = desc
        self.log_prefix = log_prefix
        # (parameter, scale broadcastable to it): each optimizer update of the parameter is
        # multiplied by the scale, i.e. a per-slice learning rate (stacked experts, one lr each).
        self.update_scales = [(p, s.to(p.device, p.dtype)) for p, s in update_scales if p.requires_grad]
        base_dtype = _base_dtype(model)
        # Autocast agrees with the weights: a bf16 base computes in bf16 anyway, so the experts'
        # matmuls follow it unless --no-bf16; a float16 base is not autocast to bf16 (that would
        # copy every frozen weight each step); a float32 base follows --bf16 / $MOA_BF16.
        if base_dtype == torch.bfloat16:
            self.bf16 = True if cfg.bf16 is None else cfg.bf16
        elif base_dtype == torch.float16:
            self.bf16 = False
        else:
            self.bf16 = resolve_bf16(cfg.bf16, _model_device(model))
        # accelerate keeps its precision in one process-wide state that cannot change once set, so
        # two trainings of different precisions in one process (a notebook, `moa demo`) would
        # collide. accelerate therefore always runs in "no" mixed precision, and the autocast is
        # ours, per Trainer (`self.autocast`). bf16 needs no gradient scaler: it has fp32's range.
        self.tracking = cfg.report_to != "none"
        self.acc = accelerator or Accelerator(
            mixed_precision="no",
            cpu=_model_device(model).type != "cuda",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            log_with=cfg.report_to if self.tracking else None,
            project_dir=str(self.out) if self.tracking else None,
        )
        if self.acc.mixed_precision != "no":
            raise MoAError(f"the Trainer does its own autocast; pass an Accelerator with mixed_precision='no' "
                           f"(got {self.acc.mixed_precision!r})")
        self.world = self.acc.num_processes
        self.passes = cfg.length_split or (8 if self.acc.device.type == "cpu" else 1)
        """At most this many passes per micro-batch (`length_split`)."""
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise MoAError(f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum "
                           f"({self.world} x {cfg.grad_accum})")
        self.total = cfg.total_steps(sampler.steps_per_epoch())
        # `params`: parameters, or optimizer groups ({"params": [...], "lr": ...}) for per-part lrs.
        raw_groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
        groups = []
        for g in raw_groups:
            ps = [p for p in g["params"] if p.requires_grad]
            extra = {k: v for k, v in g.items() if k != "params"}
            for sel, wd in ((lambda p: p.ndim >= 2, cfg.weight_decay), (lambda p: p.ndim < 2, 0.0)):
                chosen = [p for p in ps if sel(p)]
                if chosen:
                    groups.append({"params": chosen, "weight_decay": wd, **extra})
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise MoAError("nothing to train: no trainable parameter")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        warm = max(1, int(cfg.warmup_ratio * self.total)) if cfg.warmup_ratio > 0 else 0

        def schedule(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            frac = (step - warm) / max(1, self.total - warm)
            return max(0.1, 1.0 - 0.9 * frac)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.raw_model = model
        self.log: list[dict] = []
        self.step = 0

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write OUT/checkpoints/step-N atomically; older ones beyond `keep_checkpoints` go."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        root = self.out / "checkpoints"
        target = root / f"step-{self.step:07d}"
        try:
            with atomic_dir(target) as tmp:
                save_tensors(tmp / "trainable.safetensors", self.state_fn())
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                save_tensors(tmp / "rng.safetensors", _rng_tensors())
                (tmp / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.log))
                if self.best_state is not None:
                    save_tensors(tmp / "best.safetensors", self.best_state)
                for i, d in enumerate(self.best_by_domain):
                    save_tensors(tmp / f"best_domain_{i}.safetensors", self.best_state_by_domain[d])
                (tmp / "state.json").write_text(json.dumps({
                    "step": self.step, "total_steps": self.total, "sampler_position": self.step,
                    "seed": self.cfg.seed, "world_size": self.world, "bf16": self.bf16,
                    "best": self.best, "evals_without_improvement": self.evals_without_improvement,
                    "best_by_domain": self.best_by_domain,
                }) + "\n")
        except OSError as e:
            prev = newest_checkpoint(self.out)
            raise MoAError(f"could not write checkpoint {target} ({e.strerror or e}); "
                           f"the previous checkpoint {prev or '(none)'} is intact") from e
        found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)))
        for _, p in found[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)
        return target

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        self.load_state_fn(load_tensors(path / "trainable.safetensors"))
        try:  # torch files only with weights_only=True: never unpickle arbitrary objects
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        except Exception as e:
            raise MoAError(f"checkpoint {path} has an unsafe or corrupt optimizer/scheduler file "
                           f"({type(e).__name__}); refusing to load it") from e
        _set_rng(load_tensors(path / "rng.safetensors"))
        self.log = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines() if line.strip()]
        self.step = int(state["sampler_position"])
        self.best = state.get("best")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        if (path / "best.safetensors").is_file():
            self.best_state = {k: v.to(self.acc.device) for k, v in load_tensors(path / "best.safetensors").items()}
        self.best_by_domain = dict(state.get("best_by_domain") or {})
        self.best_state_by_domain = {
            d: {k: v.to(self.acc.device) for k, v in load_tensors(path / f"best_domain_{i}.safetensors").items()}
            for i, d in enumerate(self.best_by_domain)}

    # ---------------------------------------------------------------- batches

    def _micro_batches(self, step: int) -> tuple[list[dict], int]:
        global_idx = self.sampler.batch(step)
        global_tokens = sum(sum(l != IGNORE_INDEX for l in self.examples[i].labels[1:]) for i in global_idx)
        mine = self.sampler.batch(step, self.acc.process_index, self.world)
        ga = self.cfg.grad_accum
        per = len(mine) // ga
        counts = {"global_tokens": max(1, global_tokens), "global_rows": len(global_idx),
                  "global_router_rows": max(1, sum(not self.examples[i].prompt_cut for i in global_idx))}
        micro = []
        for k in range(ga):
            exs = [self.examples[i] for i in mine[k * per : (k + 1) * per]]
            for part in length_split(exs, self.passes, PASS_COST_TOKENS):
                b = collate(part, self.pad_id, self.domains, padding_side="right")
                micro.append({**{key: v.to(self.acc.device) for key, v in b.items()}, **counts})
        n_tok = sum(int(b["attention_mask"].sum()) for b in micro)
        return micro, n_tok

    # ---------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean NLL per label token over the eval records (and router accuracy where `loss_fn`
        reports one), in eval mode without gradient. The RNG state is restored afterwards, so a
        run with validation follows the same training trajectory as one without."""
        rng = _rng_tensors()
        model = self.raw_model  # not the DDP wrapper: its forward syncs buffers, and ranks may differ in batches
        model.eval()
        try:
            mine = self.eval_examples[self.acc.process_index :: self.world]
            per = max(1, self.cfg.batch_size // (self.world * self.cfg.grad_accum))
            # per domain: batches of one domain each, so that each domain's NLL sum is its own;
            # shortest first, so that a batch pads little (the sums do not depend on the order)
            names = self.eval_domain_names if self.cfg.keep_best_per_domain else [None]
            groups = [sorted((e for e in mine if d is None or e.domain == d), key=lambda e: len(e.input_ids))
                      for d in names]
            correct = rows = routed = 0.0
            by_domain = torch.zeros(len(names), 2, dtype=torch.float64)  # (D, [nll sum, label tokens])
            for g, group in enumerate(groups):
                for s in range(0, len(group), per):
                    b = collate(group[s : s + per], self.pad_id, self.domains, padding_side="right")
                    b = {key: v.to(self.acc.device) for key, v in b.items()}
                    b["global_tokens"] = b["global_rows"] = b["global_router_rows"] = 1
                    with self.autocast():
                        _, m = self.loss_fn(model, b)
                    by_domain[g, 0] += float(m.get("lm_loss", m["loss"]))
                    by_domain[g, 1] += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                    if "router_acc" in m:  # with global_rows 1: the mean over layers of the rows routed right
                        correct += float(m["router_acc"])
                        routed = 1.0
                    # the rows the routers were scored on (a prompt cut by --max-length is not)
                    rows += int((b["router_ids"] >= 0).sum()) if "router_ids" in b else len(b["input_ids"])
            t = torch.tensor([correct, rows, routed, *by_domain.flatten().tolist()], dtype=torch.float64,
                             device=self.acc.device)
            if self.world > 1:
                t = self.acc.reduce(t, reduction="sum")
            correct, rows, routed = t[:3].tolist()
            by_domain = t[3:].view(-1, 2).cpu()
            nll, tokens = by_domain.sum(0).tolist()
        finally:
            model.train()
            _set_rng(rng)
        out = {"val_loss": round(nll / max(1.0, tokens), 6)}
        if routed:
            out["val_router_acc"] = round(correct / max(1.0, rows), 6)
        if self.cfg.keep_best_per_domain:
            out["val_loss_by_domain"] = {d: round(float(by_domain[g, 0] / max(1.0, float(by_domain[g, 1]))), 6)
                                         for g, d in enumerate(names)}
        return out

    @property
    def eval_domain_names(self) -> list[str]:
        """The domains of the eval records, in order of first appearance."""
        return list(dict.fromkeys(e.domain for e in self.eval_examples))

    def _record_validation(self, val: dict[str, float]) -> None:
        for d, loss in (val.get("val_loss_by_domain") or {}).items():
            if d not in self.best_by_domain or loss < self.best_by_domain[d]["val_loss"]:
                self.best_by_domain[d] = {"step": self.step, "val_loss": loss}
                self.best_state_by_domain[d] = self.state_fn()
        if self.best is None or val["val_loss"] < self.best["val_loss"]:
            self.best = {"step": self.step, "val_loss": val["val_loss"]}
            self.evals_without_improvement = 0
            if self.cfg.keep_best:
                self.best_state = self.state_fn()
        else:
            self.evals_without_improvement += 1

    def _track(self, row: dict) -> None:
        names = {"loss": "train/loss", "lm_loss": "train/lm_loss", "router_loss": "train/router_loss",
                 "router_acc": "train/router_acc", "balance_loss": "train/balance_loss", "lr": "train/lr",
                 "tokens_per_s": "train/tokens_per_s", "grad_norm": "train/grad_norm",
                 "val_loss": "val/loss", "val_router_acc": "val/router_acc"}
        values = {names[k]: float(v) for k, v in row.items() if k in names and v is not None}
        self.acc.log(values, step=self.step)

    # ---------------------------------------------------------------- run

    def train(self, resume: bool = False) -> TrainResult:
        from tqdm.auto import tqdm

        if resume:
            ckpt = newest_checkpoint(self.out)
            if ckpt is not None:
                self.load_checkpoint(ckpt)
                self.print(f"resumed from {ckpt} at step {self.step}/{self.total}")
            else:
                self.print(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting from step 0")
        self.print(f"{self.log_prefix}world_size={self.world} global_batch={self.cfg.batch_size} "
                   f"micro_batch={self.cfg.batch_size // (self.world * self.cfg.grad_accum)} "
                   f"grad_accum={self.cfg.grad_accum} length_split={self.passes} steps={self.total} bf16={self.bf16} "
                   f"device={self.acc.device}")
        if self.tracking:
            self.acc.init_trackers("tensorboard" if self.cfg.report_to == "tensorboard" else "moa")
        self.model.train()
        t_start = time.time()
        bar = tqdm(total=self.total, initial=self.step, desc=self.desc, disable=not self.acc.is_main_process,
                   dynamic_ncols=True, mininterval=1.0)
        interrupted = stopped_early = False
        # Ctrl-C / SIGTERM ask for a stop at the end of the current step, where the state is
        # consistent (a KeyboardInterrupt raised at an arbitrary point can land in a destructor,
        # where Python ignores it). A second signal stops at once.
        requested: list[int] = []

        def request_stop(signum, frame):
            if requested:
                raise KeyboardInterrupt
            requested.append(signum)

        old_handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.getsignal(sig)
                signal.signal(sig, request_stop)
        except ValueError:  # not in the main thread: no handlers
            old_handlers = {}
        if self.start_is_candidate and self.cfg.keep_best and self.eval_examples and self.step == 0:
            # A run that starts from trained weights and never improves on them keeps them.
            val = self.validate()
            self._record_validation(val)
            self.print(f"{self.log_prefix}step 0: val_loss {val['val_loss']:.4f}")
        try:
            while self.step < self.total:
                t0 = time.perf_counter()
                micro, n_tok = self._micro_batches(self.step)
                sums: dict[str, float] = {}
                for k, b in enumerate(micro):
                    sync = k == len(micro) - 1
                    ctx = self.acc.no_sync(self.model) if (not sync and self.world > 1) else _null()
                    with ctx:
                        with self.autocast():
                            loss, metrics = self.loss_fn(self.model, b)
                        self.acc.backward(loss * self.world)
                    for key, v in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(v)
                gnorm = self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm) if self.cfg.max_grad_norm else None
                before = [p.detach().clone() for p, _ in self.update_scales]
                self.optimizer.step()
                with torch.no_grad():
                    for (p, s), old in zip(self.update_scales, before):
                        p.copy_(old + (p - old) * s)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.world > 1:
                    keys = sorted(sums)
                    t = torch.tensor([sums[k] for k in keys] + [n_tok], dtype=torch.float64, device=self.acc.device)
                    t = self.acc.reduce(t, reduction="sum")
                    sums = {k: float(v) for k, v in zip(keys, t[:-1].tolist())}
                    n_tok = int(t[-1])
                self.step += 1
                dt = time.perf_counter() - t0
                row = {"step": self.step, **{k: round(v, 6) for k, v in sums.items()},
                       "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": round(n_tok / dt, 1),
                       "grad_norm": round(float(gnorm), 4) if gnorm is not None else None}
                every = self.cfg.eval_every
                if self.eval_examples and (self.step == self.total or (every and self.step % every == 0)):
                    row.update(self.validate())
                    self._record_validation(row)
                self.log.append(row)
                if self.tracking:
                    self._track(row)
                bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items() if k in ("loss", "lm_loss", "router_loss", "router_acc")} | {"tok/s": f"{n_tok / dt:.0f}"}, refresh=False)
                bar.update(1)
                if requested:
                    raise KeyboardInterrupt
                patience = self.cfg.early_stopping_patience
                if patience and "val_loss" in row and self.evals_without_improvement >= patience:
                    stopped_early = True
                    self.print(f"early stopping at step {self.step}/{self.total}: no lower val_loss in "
                               f"{patience} validations (best {self.best['val_loss']:.4f} at step {self.best['step']})")
                    break
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            interrupted = True
            bar.close()
            path = self.save_checkpoint()
            if self.acc.is_main_process:
                self.print(f"interrupted at step {self.step}/{self.total}; checkpoint saved to {path}; "
                           "rerun the same command with --resume to continue")
        finally:
            bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.tracking:
                self.acc.end_training()
        best = None
        if self.best is not None:
            best = {**self.best, "kept": bool(self.cfg.keep_best), "last_step": self.step}
            if not interrupted:
                if self.cfg.keep_best and self.best_state is not None and self.best["step"] != self.step:
                    self.load_state_fn(self.best_state)
                    self.print(f"--keep-best: the output holds step {self.best['step']} "
                               f"(val_loss {self.best['val_loss']:.4f}), not step {self.step}")
                if self.acc.is_main_process:
                    atomic_write_json(self.out / "val_best.json", {**best, "stopped_early": stopped_early})
        self.model.eval()
        return TrainResult(self.step, self.log, interrupted, time.time() - t_start, best, stopped_early)

    def autocast(self):
        """bf16 autocast on this run's device when `bf16` is on, else a no-op."""
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def print(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(f"moa: {msg}", flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------- outputs


def write_run_files(out: Path, run_config: dict, log: list[dict], title: str) -> None:
    """train_config.json, train_log.jsonl and loss.png (atomically)."""
    atomic_write_json(out / "train_config.json", run_config)
    atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    plot_losses(log, out / "loss.png", title)


def plot_losses(log: list[dict], path: Path, title: str) -> None:
    if not log:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "lm_loss", "router_loss") if any(k in r for r in log)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for k in keys:
        xs = [r["step"] for r in log if k in r]
        ys = [r[k] for r in log if k in r]
        ax.plot(xs, ys, label=k, lw=1)
        if len(ys) >= 10:
            w = max(2, len(ys) // 20)
            sm = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, lw=2, alpha=0.6, color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _base_dtype(model) -> torch.dtype:
    """The dtype of the frozen weights (the largest share of parameters that do not train)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.requires_grad:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32
