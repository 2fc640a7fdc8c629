"""MoA checkpoints on disk: `moa_config.json` (`MoAConfig`), one standard PEFT LoRA adapter per
domain under `experts/<domain>/`, and `router.safetensors`; plus reading stage-1 PEFT adapters.

    <moa checkpoint>/
      moa_config.json          format version, base model reference, domains in order, target
                               modules, per-expert r/alpha, router config, eta, routing default,
                               training provenance
      experts/<domain>/        adapter_config.json + adapter_model.safetensors (keys
                               base_model.model.<module path>.lora_A.weight [r, in] / .lora_B.weight
                               [out, r]): loadable by peft.PeftModel as is
      router.safetensors       layers.<i>.weight (E, H) / layers.<i>.bias (E,)
      fallback.safetensors     optional: the out-of-domain fallback's tensors, described by the
                               `fallback` block of moa_config.json (see moa.fallback)

Safetensors only, never pickle; every write is atomic (a complete temp dir, then a rename).
The model class (`moa.model.MoAModel`) holds no I/O: its from_pretrained / from_adapters /
save_pretrained call the functions here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from moa.base import DEFAULT_BASE, base_reference, base_signature, load_base, load_base_prefix, resolve_base
from moa.errors import MoAError
from moa.io import atomic_dir, atomic_write_json, load_tensors, save_tensors

if TYPE_CHECKING:
    from moa.model import MoAModel

FORMAT_VERSION = 1
CONFIG_FILE = "moa_config.json"
LORA_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
"""A PEFT LoRA tensor name: base_model.model.<module path>.lora_A|B[.<adapter name>].weight."""
DOMAIN_NAME = re.compile(r"\w[\w.+-]{0,99}")
"""Domain names become directory names (and shell words in exported scripts)."""

# adapter_config.json fields that change what a LoRA computes or stores; MoA needs them unset.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "layers_to_transform", "layer_replication",
                "modules_to_save", "rank_pattern", "alpha_pattern", "trainable_token_indices", "target_parameters")


@dataclass
class MoAConfig:
    """moa_config.json of a checkpoint."""

    base: str
    """The base model reference as the user gave it (embedded name, directory or hub id)."""
    domains: list[str]
    """Expert order: expert e of every module and row e of every router."""
    target_modules: list[str]
    experts: dict[str, dict]
    """{domain: {"r", "alpha", "target_modules"[, "use_rslora"]}}."""
    base_signature: dict | None = None
    """Shape facts of the base (checked on load: a different base is a clear error)."""
    router: dict = field(default_factory=dict)
    eta: float = 1.0
    routing_default: str = "vote"
    provenance: dict = field(default_factory=dict)
    fallback: dict | None = None
    """The out-of-domain fallback's calibration (`moa.fallback.FallbackConfig.to_block`); None: off."""
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, moa_dir: str | Path) -> "MoAConfig":
        """Read and check presence, JSON, format version and the required fields."""
        path = Path(moa_dir) / CONFIG_FILE
        if not path.is_file():
            raise MoAError(f"{moa_dir} is not a MoA checkpoint (no {CONFIG_FILE})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MoAError(f"{path}: invalid JSON ({e.msg})") from None
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            got = raw.get("format_version") if isinstance(raw, dict) else None
            raise MoAError(f"{path}: unsupported format_version {got!r} (this moa reads {FORMAT_VERSION})")
        missing = [k for k in ("base", "domains", "target_modules") if k not in raw]
        if missing:
            raise MoAError(f"{path}: missing field(s) {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        cfg = cls(**{k: v for k, v in raw.items() if k in known and k != "experts"},
                  experts=raw.get("experts") or {})
        cfg.provenance = dict(cfg.provenance or {})
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- whole checkpoints


def save_checkpoint(model: "MoAModel", out_dir: str | Path, provenance: dict | None = None) -> Path:
    """Write `model` as a checkpoint into `out_dir` atomically; `provenance` replaces the model's."""
    if provenance is not None:
        model.provenance = dict(provenance)
    cfg = MoAConfig(
        base=model.base_ref, base_signature=base_signature(model.base_model.config), domains=model.domains,
        target_modules=model.target_modules, experts={d: dict(model.experts[d]) for d in model.domains},
        router={"pooling": "masked_mean", "input": "layer_input", "num_layers": model.num_layers},
        eta=model.eta, routing_default=model.routing_default, provenance=model.provenance,
    )
    calibration = getattr(model, "fallback_calibration", None)
    if calibration is not None:
        cfg.fallback = calibration.to_block()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if calibration is not None:
            save_tensors(tmp / calibration.to_block()["file"], calibration.tensors())
        # no fallback: no block at all, so the file is what this moa wrote before the fallback existed
        atomic_write_json(tmp / CONFIG_FILE, {"format_version": cfg.format_version,
                                              **{k: v for k, v in cfg.to_dict().items()
                                                 if k != "format_version" and not (k == "fallback" and v is None)}})
        for d in model.domains:
            atomic_write_json(tmp / "experts" / d / "adapter_config.json",
                              peft_adapter_config(model.base_ref, model.experts[d]))
            save_tensors(tmp / "experts" / d / "adapter_model.safetensors", model.expert_state_dict(d))
        save_tensors(tmp / "router.safetensors", model.router_state_dict())
    return out_dir


def load_checkpoint(model_cls, moa_dir: str | Path, base: str | Path | None = None, *,
                    dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                    lora_dropout: float = 0.0) -> "MoAModel":
    """Load a checkpoint written by `save_checkpoint`; `base` overrides the recorded one.

    `dtype` is the base weights' and `device` where everything goes (see `moa.base.load_base`);
    the experts and routers are read into float32 whatever dtype the checkpoint was trained with.
    """
    moa_dir = Path(moa_dir)
    cfg = MoAConfig.read(moa_dir)
    base = base or cfg.base
    model, tok = load_base(base, dtype, device)
    if cfg.base_signature and base_signature(model.config) != cfg.base_signature:
        raise MoAError(f"base model {base} does not match the checkpoint's base: it is "
                       f"{base_signature(model.config)}, the checkpoint was built on {cfg.base_signature}")
    moa = model_cls(model, tok, base=base_reference(base), target_modules=cfg.target_modules, eta=cfg.eta,
                    lora_dropout=lora_dropout, routing_default=cfg.routing_default, provenance=cfg.provenance)
    for name in cfg.domains:
        moa.add_expert(name, read_adapter(moa_dir / "experts" / name), check_base=False)
    moa.load_router_state_dict(load_tensors(moa_dir / "router.safetensors"))
    attach_fallback(moa, moa_dir, cfg)
    return moa


def load_routing_part(model_cls, moa_dir: str | Path, route_layers: int | None = None,
                      base: str | Path | None = None, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> "MoAModel":
    """The part of a checkpoint that routes: embeddings, the first K = `route_layers` decoder
    layers (default: all) with their experts and routers; no LM head, no later layer.

    The result's `route(...)` decides exactly as the full model with `route_layers=K` does: in
    the routing pass each layer runs the expert its router picked, so router k reads what the
    routers were trained on (the experts cost ~1% of a layer). `routing_only` is set (forward
    and generate refuse). Router K reads the input of layer K, so layer K never runs: its
    weights are released (moved to the meta device), and what stays is the embeddings, K - 1
    layers, their experts and K small routers. Give the `device` here: a module holding meta
    tensors cannot be moved with `.to()`. `dtype` and `device` as for `load_base` (default: the
    current `moa.device.placement`).
    """
    moa_dir = Path(moa_dir)
    cfg = MoAConfig.read(moa_dir)
    base = base or cfg.base
    total = (cfg.base_signature or {}).get("num_hidden_layers") or cfg.router.get("num_layers")
    K = total if route_layers is None else route_layers
    if K is None:  # an old checkpoint that records neither: ask the base
        from transformers import AutoConfig

        K = AutoConfig.from_pretrained(resolve_base(base)).get_text_config().num_hidden_layers
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= (total or K):
        raise MoAError(f"route_layers must be an integer from 1 to {total} (the model's layers), got {K!r}")
    model, tok = load_base_prefix(base, K, dtype, device)
    signature = dict(base_signature(model.config), num_hidden_layers=total or K)
    if cfg.base_signature and signature != cfg.base_signature:
        raise MoAError(f"base model {base} does not match the checkpoint's base: it is {signature}, "
                       f"the checkpoint was built on {cfg.base_signature}")
    moa = model_cls(model, tok, base=base_reference(base), target_modules=cfg.target_modules, eta=cfg.eta,
                    routing_default=cfg.routing_default, provenance=cfg.provenance)
    # Adapter paths name modules of the causal LM (model.layers.3.self_attn.q_proj); this is its
    # inner base model (layers.3.self_attn.q_proj), holding the first K layers only.
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    for name in cfg.domains:
        adapter = read_adapter(moa_dir / "experts" / name)
        inner = {path.removeprefix(prefix): ab for path, ab in adapter.weights.items()}
        adapter.weights = {path: ab for path, ab in inner.items() if path in moa.lora_modules}
        moa.add_expert(name, adapter, check_base=False)
        moa.experts[name] = dict(cfg.experts.get(name) or moa.experts[name])
    moa.load_router_state_dict(load_tensors(moa_dir / "router.safetensors"))
    moa._layers[-1].to("meta")
    moa.routing_only = True
    attach_fallback(moa, moa_dir, cfg)
    if moa.fallback is not None and moa.fallback.layer is not None and moa.fallback.layer >= K:
        moa.fallback = None  # it reads a layer not loaded here (set_fallback(moa, "auto") says so)
    return moa


def attach_fallback(model: "MoAModel", moa_dir: Path, cfg: MoAConfig, in_force: bool = True) -> None:
    """Read the checkpoint's fallback calibration (if any) into `model.fallback_calibration` and,
    unless `in_force` is False, put it in force (`--fallback auto`)."""
    if not cfg.fallback:
        return
    from moa.fallback import FallbackConfig

    where = str(moa_dir / CONFIG_FILE)
    block = cfg.fallback
    name = block.get("file", "fallback.safetensors") if isinstance(block, dict) else ""
    if not isinstance(name, str) or "/" in name or "\\" in name or not name:
        raise MoAError(f"{where}: the fallback block names an invalid file {name!r}")
    fb = FallbackConfig.from_block(block, load_tensors(moa_dir / name), where)
    if fb.domains != list(model.domains):
        raise MoAError(f"{where}: the fallback was calibrated for domains {fb.domains}, but the checkpoint has "
                       f"{model.domains} (run `moa calibrate` again, or delete its fallback block)")
    model.fallback_calibration = fb
    if in_force:
        model.fallback = fb


def assemble(model_cls, adapter_dirs: Sequence[str | Path], domains: Sequence[str] | None = None,
             base: str | Path | None = None, *, dtype: torch.dtype | str | None = None,
             device: torch.device | str | None = None, eta: float = 1.0,
             lora_dropout: float = 0.0, seed: int = 0) -> "MoAModel":
    """Put stage-1 PEFT LoRA adapters (one per domain) side by side on their shared base.

    Domain names default to the adapter directory names. The adapters must target the same
    modules of the same base (`base` defaults to their recorded base_model_name_or_path).
    Routers start fresh (seeded small normal init).
    """
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise MoAError("from_adapters needs at least one adapter directory")
    names = [d.name for d in dirs] if domains is None else list(domains)
    if len(names) != len(dirs):
        raise MoAError(f"{len(dirs)} adapter directories but {len(names)} domain names")
    for name in names:
        check_domain_name(name)
    if len(set(names)) != len(names):
        raise MoAError(f"duplicate domain names: {names}")
    adapters = [read_adapter(d) for d in dirs]
    first = adapters[0]
    for a in adapters[1:]:
        if set(a.weights) != set(first.weights):
            raise MoAError(
                f"adapters target different modules: {first.where} targets {first.target_modules} "
                f"({len(first.weights)} modules), {a.where} targets {a.target_modules} ({len(a.weights)} modules); "
                "every stage-1 expert must use the same target_modules (add others with add_expert)"
            )
    recorded = [a for a in adapters if a.base]
    for a in recorded[1:]:
        if not same_base(a.base, recorded[0].base):
            raise MoAError(f"adapters were trained on different bases: {recorded[0].where} on "
                           f"{recorded[0].base}, {a.where} on {a.base}")
    if base is None:
        base = recorded[0].base if recorded else DEFAULT_BASE
    model, tok = load_base(base, dtype, device)
    moa = model_cls(model, tok, base=base_reference(base), target_modules=first.target_modules,
                    eta=eta, lora_dropout=lora_dropout, seed=seed)
    for name, adapter in zip(names, adapters):
        moa.add_expert(name, adapter, check_base=False)
    return moa


# --------------------------------------------------------------------------- PEFT adapters


@dataclass
class Adapter:
    """A PEFT LoRA adapter read from disk."""

    where: str
    r: int
    alpha: float
    use_rslora: bool
    base: str | None
    """base_model_name_or_path as recorded, if any."""
    weights: dict[str, tuple[Tensor, Tensor]]
    """{module path in the base model: (A (r, in), B (out, r))}."""

    @property
    def target_modules(self) -> list[str]:
        return sorted({p.rsplit(".", 1)[-1] for p in self.weights})


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    d = Path(adapter_dir)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise MoAError(f"{d} is not a PEFT adapter directory (no adapter_config.json)")
    if not weights_path.is_file():
        hint = " (only safetensors is read, never pickle)" if (d / "adapter_model.bin").exists() else ""
        raise MoAError(f"{d}: missing adapter_model.safetensors{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MoAError(f"{cfg_path}: invalid JSON ({e.msg})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MoAError(f"{d}: peft_type {cfg.get('peft_type')} is not LORA")
    for key in _UNSUPPORTED:
        if cfg.get(key) not in (None, False, [], {}):
            raise MoAError(f"{d}: adapter_config.json sets {key}={cfg[key]!r}, which MoA does not support")
    if cfg.get("bias", "none") != "none":
        raise MoAError(f"{d}: adapter_config.json sets bias={cfg['bias']!r}; MoA supports bias 'none' only")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise MoAError(f"{cfg_path}: needs integer r >= 1 and numeric lora_alpha (got r={r!r}, lora_alpha={alpha!r})")
    weights = lora_pairs(load_tensors(weights_path), weights_path)
    for path, (A, B) in weights.items():
        if A.shape[0] != r or B.shape[-1] != r:
            raise MoAError(f"{weights_path}: {path} has rank {A.shape[0]}, adapter_config.json says r={r}")
    if not weights:
        raise MoAError(f"{weights_path}: no LoRA weights")
    return Adapter(str(d), r, float(alpha) if not float(alpha).is_integer() else int(alpha),
                    bool(cfg.get("use_rslora", False)), cfg.get("base_model_name_or_path"), weights)


def lora_pairs(tensors: dict[str, Tensor], where) -> dict[str, tuple[Tensor, Tensor]]:
    """{module path: (A (r, in), B (out, r))} from PEFT adapter tensors; anything else is an error."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        if m is None:
            raise MoAError(f"{where}: unsupported tensor {key} (MoA imports LoRA A/B weights of linear layers)")
        halves.setdefault(m["path"], {})[m["ab"]] = t
    for path, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise MoAError(f"{where}: {path} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return {path: (ab["A"], ab["B"]) for path, ab in halves.items()}


def peft_adapter_config(base_ref: str, info: dict) -> dict:
    """adapter_config.json of one expert ({"r", "alpha", "target_modules"[, "use_rslora"]})."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_ref,
        "r": info["r"], "lora_alpha": info["alpha"], "target_modules": info["target_modules"],
        "lora_dropout": 0.0, "bias": "none", "use_rslora": bool(info.get("use_rslora", False)),
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def same_base(a: str, b: str) -> bool:
    """Whether two base references name the same checkpoint (same string or same directory)."""
    if str(a) == str(b):
        return True
    try:
        return resolve_base(a) == resolve_base(b)
    except MoAError:
        # One of them cannot be found here (moved or deleted): only the shape checks can tell.
        return True


def check_domain_name(name: str) -> None:
    if not isinstance(name, str) or not DOMAIN_NAME.fullmatch(name):
        raise MoAError(f"invalid domain name {name!r}: use letters, digits, '_', '-', '.', '+' "
                       "(it becomes a directory name), at most 100 characters")
