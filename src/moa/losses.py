"""The language-modelling loss, once: next-token negative log-likelihood of the label tokens.

Every LM loss in moa derives from `label_nll`: the training losses (stage 1, stage 2, the
baselines) sum it and divide by the global batch's label-token count, `MoAModel.forward`
averages it, and `moa score` sums it per row. The vocabulary projection can be run on the
label positions only (`hidden` + `head`): most tokens of a batch are prompt or padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moa.data import IGNORE_INDEX


def label_nll(labels: Tensor, *, logits: Tensor | None = None, hidden: Tensor | None = None,
              head: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Next-token NLL at every label position.

    Args:
        labels: (B, T) token ids, IGNORE_INDEX where there is no label; position t+1 is
            predicted from position t (shifted here, as in transformers).
        logits: (B, T, V) the model's logits; or instead
        hidden / head: (B, T, H) final hidden states and the output projection, applied only
            at the label positions.
    Returns:
        (nll (N,) float32 over the N label tokens in row-major order, keep (B, T-1) bool: where they are).
    """
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    if logits is not None:
        at_labels = logits[:, :-1][keep]  # (N, V)
    elif hidden is not None and head is not None:
        at_labels = head(hidden[:, :-1][keep])  # (N, V)
    else:
        raise ValueError("label_nll needs logits, or hidden states and the output head")
    targets = labels[:, 1:][keep].to(at_labels.device)  # (N,)
    return F.cross_entropy(at_labels.float(), targets, reduction="none"), keep


def per_row_sums(values: Tensor, keep: Tensor) -> Tensor:
    """Sum `values` (N,) of `label_nll` per row: (B,) float64."""
    rows = keep.nonzero()[:, 0]  # (N,) the row of each label token
    out = torch.zeros(keep.shape[0], dtype=torch.float64, device=values.device)
    return out.index_add_(0, rows.to(values.device), values.double())
