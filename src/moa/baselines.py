"""The paper's baselines that are not plain LoRAs:

- MoE-LoRA: the same experts, mixed per *token* by learned top-k gates in every layer, trained
  without domain labels, with a Switch-style load-balance loss (MixLoRA / LoRAMoE style).
- Classifier + LoRAs: a separate classifier on the frozen base's prompt embedding picks one
  stage-1 expert per request (no router inside the model).

Each writes a directory that `moa eval` recognises (`moe_gates.safetensors` /
`classifier.safetensors` next to an MoA checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from moa.errors import MoAError
from moa.router import RoutingState

# --------------------------------------------------------------------------- MoE-LoRA


class TokenGates(nn.Module):
    """One linear gate per layer: hidden (B, T, H) -> top-k renormalised weights (B, T, E)."""

    def __init__(self, num_layers: int, hidden: int, num_experts: int, top_k: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_layers, num_experts, hidden, generator=g) * hidden ** -0.5 * 0.1)
        self.top_k = min(top_k, num_experts)
        self.mask: torch.Tensor | None = None  # (B, T) tokens that count for the balance loss
        self.aux: list[torch.Tensor] = []

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.float() @ self.weight[layer].T  # (B, T, E)
        probs = logits.softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)  # (B, T, k)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))  # (B, T, E)
        if self.training and torch.is_grad_enabled():
            E = probs.shape[-1]
            m = self.mask[:, -hidden.shape[1]:].float().unsqueeze(-1) if self.mask is not None else torch.ones_like(probs[..., :1])
            n = m.sum().clamp(min=1)
            frac = (F.one_hot(idx[..., 0], E).float() * m).sum((0, 1)) / n  # f_e: top-1 share
            mean_p = (probs * m).sum((0, 1)) / n  # P_e
            self.aux.append(E * (frac * mean_p).sum())
        return weights.to(hidden.dtype)


class MoELoRA(nn.Module):
    """An MoAModel's experts driven by token-level gates instead of its routers."""

    def __init__(self, moa, top_k: int = 2, seed: int = 0):
        super().__init__()
        self.moa = moa
        cfg = moa.base_model.config
        self.gates = TokenGates(moa.num_layers, cfg.hidden_size, moa.num_experts, top_k, seed).to(moa.device)

    def forward(self, input_ids, attention_mask, **kw):
        input_ids, attention_mask = input_ids.to(self.moa.device), attention_mask.to(self.moa.device)
        self.gates.aux, self.gates.mask = [], attention_mask
        self.gates.training = self.training
        with self.moa.routing(RoutingState("soft", gates=self.gates)):
            out = self.moa.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        balance = torch.stack(self.gates.aux).mean() if self.gates.aux else out.logits.new_zeros(())
        return out.logits, balance

    @torch.no_grad()
    def generate_texts(self, prompts: list, max_new_tokens: int) -> list[str]:
        tok = self.moa.tokenizer
        rendered = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        tok.padding_side = "left"
        enc = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(self.moa.device)
        self.gates.training = False
        with self.moa.routing(RoutingState("soft", gates=self.gates)):
            out = self.moa.base_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return [tok.decode(r, skip_special_tokens=True).strip() for r in out[:, enc["input_ids"].shape[1]:]]

    def save(self, out: Path, provenance: dict) -> None:
        from moa.io import save_tensors

        self.moa.save_pretrained(out, provenance={"kind": "moe_lora", **provenance})
        save_tensors(Path(out) / "moe_gates.safetensors", {"weight": self.gates.weight.detach()},
                     metadata={"top_k": str(self.gates.top_k)})

    @classmethod
    def load(cls, path: Path) -> "MoELoRA":
        from safetensors import safe_open

        from moa.io import load_tensors
        from moa.model import MoAModel

        m = cls(MoAModel.from_pretrained(path))
        with safe_open(str(Path(path) / "moe_gates.safetensors"), "pt") as f:
            top_k = int((f.metadata() or {}).get("top_k", 2))
        m.gates.top_k = top_k
        with torch.no_grad():
            m.gates.weight.copy_(load_tensors(Path(path) / "moe_gates.safetensors")["weight"])
        return m.eval()


def train_moe_lora(*, moa_dir, records, out, cfg, balance_coef: float = 0.01, top_k: int = 2,
                   gate_lr: float = 1e-3, overwrite: bool = True) -> dict:
    """Train gates + experts (no domain labels) on the same balanced batches as stage 2."""
    from moa.data import DomainBalancedSampler
    from moa.model import MoAModel
    from moa.losses import label_nll
    from moa.stages import encode_for_training
    from moa.trainer import Trainer, load_eval_examples, start_run, write_run_files

    out = Path(out)
    run_config = {"stage": "moe_lora", "moa": str(Path(moa_dir).resolve()), "top_k": top_k,
                  "balance_coef": balance_coef, "train": _asdict(cfg)}
    start_run(out, run_config, resume=False, overwrite=overwrite)
    torch.manual_seed(cfg.seed)
    moa = MoAModel.from_pretrained(moa_dir)
    moa.set_trainable(experts=True, routers=False)
    model = MoELoRA(moa, top_k, cfg.seed)
    examples = encode_for_training(moa.tokenizer, records, cfg.max_length)
    index = {d: k for k, d in enumerate(moa.domains)}
    sampler = DomainBalancedSampler([index.get(e.domain, 0) for e in examples], cfg.batch_size, cfg.seed)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_fn(m, batch):
        logits, balance = m(batch["input_ids"], batch["attention_mask"])
        lm = label_nll(batch["labels"], logits=logits)[0].sum() / batch["global_tokens"]
        bal = balance * len(batch["input_ids"]) / batch["global_rows"]
        return lm + balance_coef * bal, {"loss": (lm + balance_coef * bal).detach(), "lm_loss": lm.detach(),
                                          "balance_loss": bal.detach()}

    groups = [{"params": [model.gates.weight], "lr": gate_lr},
              {"params": [p for n, p in named.items() if not n.startswith("gates.")], "lr": cfg.lr}]
    trainer = Trainer(model=model, params=groups, examples=examples, sampler=sampler, loss_fn=loss_fn, cfg=cfg,
                      out=out, pad_id=moa.tokenizer.pad_token_id,
                      state_fn=lambda: {n: p.detach().clone() for n, p in named.items()},
                      load_state_fn=lambda t: [p.data.copy_(t[n]) for n, p in named.items()],
                      desc="moe_lora", log_prefix="moe_lora: ",
                      eval_examples=load_eval_examples(cfg, moa.tokenizer, list(moa.domains)))
    result = trainer.train()
    moa.set_trainable(experts=False, routers=False)
    model.eval()
    model.save(out, {"train": run_config})
    write_run_files(out, run_config, result.log, "MoE-LoRA (token top-k, no labels)")
    return {"steps": result.steps, "seconds": round(result.seconds, 1),
            **({"best": result.best} if result.best is not None else {})}


# --------------------------------------------------------------------------- classifier + LoRAs


@torch.no_grad()
def pooled_features(base_model, input_ids, attention_mask, pool_mask) -> torch.Tensor:
    """Mean of the frozen base's last hidden states over `pool_mask` tokens: (B, H)."""
    device = next(base_model.parameters()).device
    out = base_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                     output_hidden_states=True, logits_to_keep=1)
    h = out.hidden_states[-1].float()  # (B, T, H)
    m = pool_mask.to(device).unsqueeze(-1).float()  # (B, T, 1)
    return ((h * m).sum(1) / m.sum(1).clamp(min=1)).cpu()  # the classifier itself lives on the CPU


@torch.no_grad()
def prompt_features(base_model, tokenizer, prompts: Sequence[list], batch_size: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """Features of rendered chat prompts (generation prompt included): (N, H)."""
    from tqdm.auto import tqdm

    feats = []
    tokenizer.padding_side = "right"
    for s in tqdm(range(0, len(prompts), batch_size), desc="classifier features", disable=not progress,
                  dynamic_ncols=True, mininterval=1.0):
        chunk = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[s : s + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        feats.append(pooled_features(base_model, enc["input_ids"], enc["attention_mask"], enc["attention_mask"]))
    return torch.cat(feats)


def train_classifier(*, moa_dir, records, out, per_domain: int = 200, steps: int = 300, seed: int = 0,
                     overwrite: bool = True) -> dict:
    """Logistic regression on prompt embeddings of the frozen base -> one stage-1 expert."""
    from moa.io import atomic_write_json, save_tensors
    from moa.model import MoAModel
    from moa.trainer import prepare_out_dir

    if per_domain < 1 or steps < 1:
        raise MoAError(f"--per-domain and --steps must be >= 1, got {per_domain} and {steps}")
    prepare_out_dir(Path(out), {}, resume=False, overwrite=overwrite)
    moa = MoAModel.from_pretrained(moa_dir)
    domains = list(moa.domains)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for d in domains:
        rs = [r for r in records if r.domain == d]
        idx = torch.randperm(len(rs), generator=g)[:per_domain].tolist()
        chosen += [rs[i] for i in idx]
    with moa.routing(RoutingState("base")):
        x = prompt_features(moa.base_model, moa.tokenizer, [r.prompt_messages for r in chosen], progress=True)
    y = torch.tensor([domains.index(r.domain) for r in chosen])
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-4)
    clf = nn.Linear(x.shape[1], len(domains))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
    from tqdm.auto import trange

    for _ in trange(steps, desc="classifier", dynamic_ncols=True, mininterval=1.0):
        opt.zero_grad()
        loss = F.cross_entropy(clf((x - mu) / sd), y)
        loss.backward()
        opt.step()
    acc = float((clf((x - mu) / sd).argmax(-1) == y).float().mean())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "classifier.safetensors", {"weight": clf.weight.detach(), "bias": clf.bias.detach(),
                                                   "mean": mu, "std": sd})
    atomic_write_json(out / "classifier.json", {"domains": domains, "experts": str(Path(moa_dir).resolve()),
                                                "train_accuracy": acc, "n": len(chosen)})
    return {"train_accuracy": acc}


class ClassifierRouter:
    """Loads a classifier directory; `predict(prompts) -> domain names`."""

    def __init__(self, path: Path):
        from moa.io import load_tensors
        from moa.model import MoAModel

        path = Path(path)
        if not (path / "classifier.json").is_file():
            raise MoAError(f"{path} is not a classifier directory (no classifier.json)")
        meta = json.loads((path / "classifier.json").read_text())
        self.moa = MoAModel.from_pretrained(meta["experts"]).eval()
        self.domains = meta["domains"]
        self.t = load_tensors(path / "classifier.safetensors")

    def _classify(self, x: torch.Tensor) -> list[str]:
        logits = ((x - self.t["mean"]) / self.t["std"]) @ self.t["weight"].T + self.t["bias"]
        return [self.domains[i] for i in logits.argmax(-1).tolist()]

    @torch.no_grad()
    def predict(self, prompts: list) -> list[str]:
        with self.moa.routing(RoutingState("base")):
            return self._classify(prompt_features(self.moa.base_model, self.moa.tokenizer, prompts))

    @torch.no_grad()
    def predict_batch(self, input_ids, attention_mask, pool_mask) -> list[str]:
        with self.moa.routing(RoutingState("base")):
            return self._classify(pooled_features(self.moa.base_model, input_ids, attention_mask, pool_mask))


def _asdict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
