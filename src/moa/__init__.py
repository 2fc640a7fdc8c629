"""moa: Mixture-of-LoRAs (arXiv 2403.03432) for one frozen base LLM and many domain experts."""

# No environment variable is set here: whether the hub is reachable (HF_HUB_OFFLINE) is the
# user's choice; the `moa` command quiets the libraries it drives in moa.cli.

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import moa` (and the CLI's --help) stays fast: torch loads on first use.
    if name == "MoAModel":
        from moa.model import MoAModel

        return MoAModel
    raise AttributeError(f"module 'moa' has no attribute {name!r}")


__all__ = ["MoAModel", "__version__"]
