"""Where the model runs and in which dtype its frozen base is held: one policy for every command.

    --device auto|cpu|cuda|cuda:N|mps     auto: CUDA when present, else CPU
    --dtype  auto|float32|bfloat16|float16 of the frozen base weights; auto: bfloat16 where the
                                           device computes it natively (CUDA with bf16, a CPU with
                                           AVX-512 bf16 or AMX), float32 elsewhere; $MOA_BF16=1/0
                                           forces bfloat16/float32

Experts, routers and optimizer state are float32 whatever the base dtype: they are the master
weights that training updates, and they are small.

The commands set a `placement` for the whole run (`moa.cli` wraps every command in one), so the
library functions that load a base deep inside a stage (`load_base`, `MoAModel.from_pretrained`,
`from_adapters`) all follow it. Explicit `device=` / `dtype=` arguments win over it; without
either, Python code gets the previous behaviour: CPU, float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

import torch

from moa.errors import MoAError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_ENV = "MOA_BF16"
"""Environment variable with the precision policy for what leaves it unset (training autocast,
`--dtype auto`): `auto` (default: bf16 where the hardware computes it natively), `1` (always
bf16, emulated where not native) or `0` (always float32)."""


def bf16_native(device: torch.device | str | None = None) -> bool:
    """Whether `device` computes bf16 matmuls natively (CUDA with bf16; a CPU with AVX-512 bf16 /
    AMX, as oneDNN reports it). None: the device `auto` picks."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:
            return False
    return False  # mps and others: float32 unless asked


def bf16_policy() -> bool | None:
    """$MOA_BF16: True (1), False (0) or None (auto: the hardware decides)."""
    policy = os.environ.get(BF16_ENV, "auto").strip().lower()
    if policy in ("", "auto"):
        return None
    if policy in ("1", "true", "yes", "on"):
        return True
    if policy in ("0", "false", "no", "off"):
        return False
    raise MoAError(f"${BF16_ENV} must be auto, 1 or 0, got {os.environ[BF16_ENV]!r}")


def resolve_bf16(flag: bool | None, device: torch.device | str | None = None) -> bool:
    """An explicit flag wins; None follows $MOA_BF16 (auto|1|0), whose `auto` is the hardware."""
    if flag is not None:
        return flag
    policy = bf16_policy()
    return bf16_native(device) if policy is None else policy


def resolve_device(spec: torch.device | str | None = None) -> torch.device:
    """auto|None -> cuda when available, else cpu; anything else must name an existing device.
    `cuda` in a launched process ($LOCAL_RANK set) is that rank's GPU."""
    if isinstance(spec, torch.device):
        return spec
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        # One process per GPU (torchrun / accelerate launch): load straight onto this rank's GPU,
        # not all ranks onto GPU 0 before accelerate moves them.
        spec = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise MoAError(f"--device must be one of {', '.join(DEVICES)}, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoAError(f"--device {spec}: no CUDA device is available here (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MoAError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise MoAError(f"--device {spec}: MPS is not available here (use --device cpu or auto)")
    elif device.type not in ("cpu", "meta"):  # meta: shapes only, for tests of the placement logic
        raise MoAError(f"--device must be one of {', '.join(DEVICES)}, got {spec!r}")
    return device


def resolve_dtype(spec: torch.dtype | str | None, device: torch.device | str | None = None) -> torch.dtype:
    """The base weights' dtype: auto|None -> bfloat16 where `device` computes it natively (or
    $MOA_BF16=1), else float32; or one of float32, bfloat16, float16."""
    if isinstance(spec, torch.dtype):
        if spec not in (torch.float32, torch.bfloat16, torch.float16):
            raise MoAError(f"--dtype must be one of {', '.join(DTYPES)}, got {spec}")
        return spec
    spec = "auto" if spec is None else str(spec).strip().lower().removeprefix("torch.")
    if spec == "auto":
        return torch.bfloat16 if resolve_bf16(None, device) else torch.float32
    if spec not in DTYPES:
        raise MoAError(f"--dtype must be one of {', '.join(DTYPES)}, got {spec!r}")
    return getattr(torch, spec)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    """Of the frozen base weights; experts and routers stay float32."""


_DEFAULT = Placement(torch.device("cpu"), torch.float32)
_current: contextvars.ContextVar[Placement] = contextvars.ContextVar("moa_placement", default=_DEFAULT)


def current() -> Placement:
    """The placement in effect: the innermost `placement(...)`, else CPU / float32."""
    return _current.get()


@contextlib.contextmanager
def placement(device: torch.device | str | None = "auto", dtype: torch.dtype | str | None = "auto"):
    """Every base loaded inside goes to `device` with weights in `dtype` (see the module doc)."""
    resolved = resolve_device(device)
    token = _current.set(Placement(resolved, resolve_dtype(dtype, resolved)))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def choose(device: torch.device | str | None, dtype: torch.dtype | str | None) -> Placement:
    """Explicit arguments win; what is left None comes from the current placement."""
    now = current()
    dev = now.device if device is None else resolve_device(device)
    dt = now.dtype if dtype is None else resolve_dtype(dtype, dev)
    return Placement(dev, dt)
