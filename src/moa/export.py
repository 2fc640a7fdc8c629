"""`moa export`: hand a MoA checkpoint's experts to tools that know nothing of moa.

    peft    every expert (or one) as a standard PEFT LoRA adapter directory OUT/<domain>/
    merged  one domain's expert folded into the base weights, W' = W + scaling * B @ A: a plain
            transformers checkpoint (+ tokenizer) that needs neither moa nor peft
    vllm    the adapters + OUT/serve_vllm.sh + OUT/README.md for vLLM's multi-LoRA server, where
            the client names the domain (`"model": "<domain>"`): no router runs there

The experts are read from the checkpoint's files (`moa.checkpoint`: `experts/<domain>/` is
already a PEFT adapter), so `peft` and `vllm` never load the base model; `merged` loads it once.
The routers are not exported: outside `moa serve`, whoever sends the request picks the domain.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from moa.checkpoint import CONFIG_FILE, DOMAIN_NAME, MoAConfig, lora_pairs
from moa.errors import MoAError
from moa.io import check_out_dir

FORMATS = ("peft", "merged", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
# LoRA ranks vLLM accepts for --max-lora-rank (vllm.config.LoRAConfig); the smallest one that
# covers every expert is used.
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Checkpoint:
    """What the exporters need from a MoA checkpoint directory."""

    path: Path
    config: MoAConfig
    base: str
    """The base model reference: the checkpoint's, or the --base override."""

    @property
    def domains(self) -> list[str]:
        return list(self.config.domains)

    def expert_dir(self, domain: str) -> Path:
        return self.path / "experts" / domain

    def select(self, domain: str | None) -> list[str]:
        """All domains, or [domain] after checking that it exists."""
        if domain is None:
            return self.domains
        if domain not in self.config.domains:
            raise MoAError(f"unknown domain '{domain}' (known domains: {', '.join(self.domains)})")
        return [domain]


def read_checkpoint(moa_dir: str | Path, base: str | None = None) -> Checkpoint:
    moa_dir = Path(moa_dir)
    cfg_path = moa_dir / CONFIG_FILE
    cfg = MoAConfig.read(moa_dir)
    if not cfg.domains:
        raise MoAError(f"{cfg_path}: the checkpoint has no expert")
    if not (base or cfg.base):
        raise MoAError(f"{cfg_path} records no base model; pass --base")
    ckpt = Checkpoint(moa_dir, cfg, str(base or cfg.base))
    for d in ckpt.domains:
        # Domain names become directory names and shell words in serve_vllm.sh.
        if not isinstance(d, str) or not DOMAIN_NAME.fullmatch(d):
            raise MoAError(f"{cfg_path}: invalid domain name {d!r}")
        missing = [f for f in _ADAPTER_FILES if not (ckpt.expert_dir(d) / f).is_file()]
        if missing:
            raise MoAError(f"{ckpt.expert_dir(d)}: missing {', '.join(missing)} (incomplete checkpoint)")
    return ckpt


# --------------------------------------------------------------------------- peft


def export_peft(moa_dir: str | Path, out: str | Path, domain: str | None = None, *, base: str | None = None,
                overwrite: bool = False) -> list[Path]:
    """Write each selected expert as a PEFT adapter directory OUT/<domain>/; returns them.

    `base_model_name_or_path` is set to the base's local directory when it can be resolved
    here, so `peft.AutoPeftModelForCausalLM.from_pretrained(OUT/<domain>)` works offline.
    """
    from moa.io import atomic_dir

    ckpt = read_checkpoint(moa_dir, base)
    domains = ckpt.select(domain)
    out = Path(out)
    check_out_dir(out, overwrite=overwrite, protect=[ckpt.path])
    base_path = _base_path(ckpt.base)
    with atomic_dir(out) as tmp:
        _write_adapters(ckpt, domains, tmp, base_path or ckpt.base)
        _usual_modes(tmp)
    return [out / d for d in domains]


def _write_adapters(ckpt: Checkpoint, domains: Sequence[str], root: Path, base_ref: str) -> None:
    from moa.io import atomic_write_json

    for d in domains:
        src = ckpt.expert_dir(d)
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_ref
        cfg["inference_mode"] = True
        (root / d).mkdir(parents=True)
        atomic_write_json(root / d / "adapter_config.json", cfg)
        shutil.copyfile(src / "adapter_model.safetensors", root / d / "adapter_model.safetensors")


def _base_path(base: str) -> str | None:
    """The base's local checkpoint directory (what `moa base-path` prints), or None."""
    from moa.base import resolve_base

    try:
        return str(resolve_base(base))
    except MoAError:
        return None


# --------------------------------------------------------------------------- merged


def export_merged(moa_dir: str | Path, out: str | Path, domain: str | None, *, base: str | None = None,
                  dtype: str = "float32", overwrite: bool = False) -> Path:
    """Fold `domain`'s expert into the base weights and write a transformers checkpoint.

    Every adapted linear gets W' = W + scaling * B @ A (scaling = alpha / r, or alpha / sqrt(r)
    with rsLoRA), computed in float32 and rounded once to `dtype`. The base is loaded in float32
    (4 bytes per parameter), or directly in `dtype` when it is stored in that dtype. The result's
    logits equal MoAModel with explicit routing to `domain` (up to float rounding).
    """
    import torch

    from moa.base import base_signature, load_base
    from moa.io import atomic_dir, atomic_write_json, load_tensors
    from moa.scoring import load_peft_adapter

    ckpt = read_checkpoint(moa_dir, base)
    if domain is None:
        raise MoAError(f"--format merged folds one expert into the base: pass --domain "
                       f"(one of: {', '.join(ckpt.domains)})")
    ckpt.select(domain)
    if dtype not in DTYPES:
        raise MoAError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    base_path = _base_path(ckpt.base)
    check_out_dir(out, overwrite=overwrite, protect=[ckpt.path, base_path])
    adapter_dir = ckpt.expert_dir(domain)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = acfg["r"], acfg["lora_alpha"]
    scaling = alpha / (math.sqrt(r) if acfg.get("use_rslora") else r)
    modules = len(lora_pairs(load_tensors(adapter_dir / "adapter_model.safetensors"), adapter_dir))

    # Load in float32 unless the base is stored in `dtype` already (then that is lossless and
    # halves the memory): the merge must round once, not twice.
    stored = _stored_dtype(base_path) if base_path else None
    model, tok = load_base(ckpt.base, getattr(torch, dtype if stored == dtype else "float32"))
    recorded = ckpt.config.base_signature
    if recorded and base_signature(model.config) != recorded:
        raise MoAError(f"base model {ckpt.base} does not match the checkpoint's base: it is "
                       f"{base_signature(model.config)}, the checkpoint was built on {recorded}")
    # PEFT's own merge (W + scaling * B @ A, in float32 on the CPU even for a 16-bit base) on the
    # expert directory, which is a standard PEFT adapter already.
    model = load_peft_adapter(model, adapter_dir).merge_and_unload(safe_merge=True)
    model.to(getattr(torch, dtype))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "moa_export.json", {
            "format": "merged", "domain": domain, "moa": str(ckpt.path.resolve()), "base": ckpt.base,
            "r": r, "lora_alpha": alpha, "scaling": scaling, "modules": modules, "dtype": dtype,
        })
        _usual_modes(tmp)
    return out


def _stored_dtype(base_dir: str) -> str | None:
    """The dtype the base checkpoint's weights are stored in, per its config.json."""
    try:
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


# --------------------------------------------------------------------------- vllm


def export_vllm(moa_dir: str | Path, out: str | Path, domain: str | None = None, *, base: str | None = None,
                overwrite: bool = False) -> Path:
    """Write the adapters (as in `export_peft`) plus OUT/serve_vllm.sh and OUT/README.md."""
    from moa.io import atomic_dir, atomic_write_text

    ckpt = read_checkpoint(moa_dir, base)
    domains = ckpt.select(domain)
    out = Path(out)
    check_out_dir(out, overwrite=overwrite, protect=[ckpt.path])
    base_path = _base_path(ckpt.base)
    ranks = {d: json.loads((ckpt.expert_dir(d) / "adapter_config.json").read_text())["r"] for d in domains}
    max_rank = max(ranks.values())
    vllm_rank = next((r for r in VLLM_RANKS if r >= max_rank), max_rank)
    with atomic_dir(out) as tmp:
        _write_adapters(ckpt, domains, tmp, base_path or ckpt.base)
        script = tmp / "serve_vllm.sh"
        atomic_write_text(script, _serve_script(ckpt, domains, base_path, vllm_rank))
        os.chmod(script, 0o755)
        atomic_write_text(tmp / "README.md", _readme(ckpt, domains, base_path, ranks, vllm_rank))
        _usual_modes(tmp)
    return out


def _serve_script(ckpt: Checkpoint, domains: Sequence[str], base_path: str | None, rank: int) -> str:
    default = shlex.quote(base_path or ckpt.base)
    modules = "".join(f'    "{d}=$HERE/{d}" \\\n' for d in domains)
    where = (f"resolved at export time from '{ckpt.base}'" if base_path else
             f"'{ckpt.base}' could not be resolved at export time: set MOA_BASE")
    return f"""#!/usr/bin/env bash
# Serve the experts of the MoA checkpoint {ckpt.path.resolve()}
# with vLLM's OpenAI-compatible server: one shared base model, one LoRA adapter per domain.
#
# vLLM has no router: every request names its domain as the model, e.g.
#   {{"model": "{domains[0]}", "messages": [...]}}
# (`moa serve` routes automatically instead; see README.md).
#
# Base checkpoint: $MOA_BASE, else the directory below ({where};
# `moa base-path --base <reference>` prints it on any machine).
# --max-lora-rank: the smallest rank vLLM accepts that covers every expert.
# --max-loras: how many adapters one batch may mix (all domains here).
# Extra arguments go to `vllm serve`, e.g.: ./serve_vllm.sh --port 8001 --dtype bfloat16
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
DEFAULT_BASE={default}
BASE="${{MOA_BASE:-$DEFAULT_BASE}}"
exec vllm serve "$BASE" \\
  --enable-lora \\
  --max-lora-rank {rank} \\
  --max-loras {len(domains)} \\
  --lora-modules \\
{modules}  "$@"
"""


def _readme(ckpt: Checkpoint, domains: Sequence[str], base_path: str | None, ranks: dict, rank: int) -> str:
    rows = "".join(f"| `{d}` | `{d}/` | {ranks[d]} |\n" for d in domains)
    base_line = (f"`{base_path}` (resolved from `{ckpt.base}` when this was exported)" if base_path else
                 f"`{ckpt.base}`, which could not be resolved on the exporting machine")
    return f"""# MoA experts for vLLM

Exported from the MoA checkpoint `{ckpt.path.resolve()}` by `moa export --format vllm`.

| domain (vLLM model name) | PEFT adapter | LoRA rank |
|---|---|---|
{rows}
## Launch

    ./serve_vllm.sh                      # = vllm serve BASE --enable-lora --max-lora-rank {rank} \\
                                         #     --max-loras {len(domains)} --lora-modules {domains[0]}=... ...
    MOA_BASE=/models/base ./serve_vllm.sh --port 8001 --dtype bfloat16

Extra arguments are passed to `vllm serve`. The adapter paths are relative to this directory, so
it can be copied to the serving machine as a whole.

## The base model

Every adapter was trained on one frozen base model, and vLLM must serve exactly that one:
{base_line}. On any machine, `moa base-path --base <reference>` prints the local checkpoint
directory of a base (for the embedded default it converts the bundled GGUF file once); pass it
as `MOA_BASE`. The adapters' `adapter_config.json` record it as `base_model_name_or_path`.

## Choosing the domain

vLLM has **no router**: the client picks the expert per request by naming the domain as the
model. One batch may mix domains (up to `--max-loras` adapters at once).

    curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{domains[0]}", "messages": [{{"role": "user", "content": "..."}}]}}'

    from openai import OpenAI
    client = OpenAI(base_url="http://localhost:8000/v1", api_key="-")
    client.chat.completions.create(model="{domains[0]}", messages=[...])

Requests whose `model` is the base path get the base model without any expert.

When the client does not know the domain, use `moa serve --moa {ckpt.path.resolve()}` instead:
there `"model": "moa"` lets the routers trained in stage 2 read the prompt and choose the expert
(the vote of all layer routers), which is what `router.safetensors` in the MoA checkpoint is for;
vLLM ignores it. (`"model": "moa:<domain>"` forces an expert in `moa serve`.)
"""


# --------------------------------------------------------------------------- shared


def _usual_modes(root: Path) -> None:
    """rw-r--r-- (per umask) on every file: safetensors writes 0600 files, which a serving
    process running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in root.rglob("*"):
        if f.is_file():
            os.chmod(f, (0o777 if f.stat().st_mode & 0o111 else 0o666) & ~umask)
