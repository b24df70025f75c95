"""How close a compressed embedder stays to its original: cosine similarity and retrieval agreement.

An embedding model has no labels to be right or wrong about; what a user relies on is that each
text's vector still points where the original model's did (cosine similarity) and that searches
return the same neighbours (top-k retrieval agreement on a held-out split).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.outputs import prediction

RETRIEVAL_K = 10


@torch.no_grad()
def embed(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The model's outputs on ``inputs`` in eval mode, batch by batch, as float32 on the CPU. Texts for a model
    that pools over tokens run shortest first, each batch cut to its own longest text (the same outputs, in the
    given order; thousands of texts padded to the longest of them would cost several times the time)."""
    from ..models.text import pools_tokens, trim_padding

    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    texts = pools_tokens(model) and inputs.dim() == 3
    order = inputs[:, 1].ne(0).sum(-1).argsort(stable=True) if texts else torch.arange(len(inputs))
    try:
        outputs = []
        for i in range(0, len(inputs), batch_size):
            batch = inputs[order[i:i + batch_size]]
            outputs.append(prediction(model((trim_padding(batch) if texts else batch).to(device))).float().cpu())
        return torch.cat(outputs)[order.argsort()]
    finally:
        model.train(was_training)


def cosine_to_reference(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity (outputs flattened per sample), in float64."""
    return nn.functional.cosine_similarity(outputs.flatten(1).double(), reference.flatten(1).double(), dim=1)


def retrieval_agreement(outputs: torch.Tensor, reference: torch.Tensor, k: int = RETRIEVAL_K) -> float:
    """Mean share of each sample's ``k`` nearest neighbours (cosine, itself excluded) that the outputs and the
    reference have in common: 1.0 when every search returns the same texts."""
    k = min(k, len(outputs) - 1)
    if k < 1:
        return float("nan")

    def neighbours(vectors: torch.Tensor) -> torch.Tensor:
        unit = nn.functional.normalize(vectors.flatten(1).double(), dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.topk(k, dim=1).indices

    ours, theirs = neighbours(outputs), neighbours(reference)
    shared = (ours.unsqueeze(2) == theirs.unsqueeze(1)).any(dim=2).sum(dim=1)
    return float(shared.double().mean() / k)


def embedding_scores(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    cosine = cosine_to_reference(outputs, reference)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            f"top{RETRIEVAL_K}_agreement": retrieval_agreement(outputs, reference)}
