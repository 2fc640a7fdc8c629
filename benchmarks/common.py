"""Set-up shared by the benchmarks: the embedded base with random rank-r experts, and cache cropping."""
import tempfile

import torch
from peft import LoraConfig, get_peft_model

from moa.base import load_base
from moa.model import MoAModel

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_expert_dirs(base: str, out: str, num_experts: int = 4, r: int = 8) -> list[str]:
    """`num_experts` random rank-r PEFT LoRAs of `base` (a name or directory `load_base` takes) on
    the 7 projections, expert k seeded with k, saved as OUT/e0, OUT/e1, ...; their directories."""
    dirs = []
    for k in range(num_experts):
        b, _ = load_base(base, dtype="float32", device="cpu")
        torch.manual_seed(k)
        cfg = LoraConfig(r=r, lora_alpha=16, init_lora_weights=False, target_modules=ALL_PROJECTIONS)
        get_peft_model(b, cfg).save_pretrained(f"{out}/e{k}")
        dirs.append(f"{out}/e{k}")
    return dirs


def random_experts_moa(num_experts: int = 4, r: int = 8) -> MoAModel:
    """SmolLM2-135M (the embedded model) with `random_expert_dirs`' experts, domains d0, d1, ...;
    in eval mode."""
    dirs = random_expert_dirs("smollm2-135m", tempfile.mkdtemp(), num_experts, r)
    return MoAModel.from_adapters(dirs, domains=[f"d{k}" for k in range(num_experts)], base="smollm2-135m").eval()


def crop(cache, length: int) -> None:
    """Cut a transformers KV cache back to its first `length` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
