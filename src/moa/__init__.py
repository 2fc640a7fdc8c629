"""moa: Mixture-of-LoRAs (arXiv 2403.03432) for one frozen base LLM and many domain experts."""

import os as _os

# No network at run time: the Hub libraries must never try to download anything.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import moa` (and the CLI's --help) stays fast: torch loads on first use.
    if name == "MoAModel":
        from moa.model import MoAModel

        return MoAModel
    raise AttributeError(f"module 'moa' has no attribute {name!r}")


__all__ = ["MoAModel", "__version__"]
