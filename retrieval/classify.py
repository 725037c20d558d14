"""Classification by examples: which album (class) a query belongs to, and who decided it.

Pure maths: tensors in, tensors out. Two FC-free decision rules of the paper:

* ``mean``  few-shot rule (Eq. 11): an album's score is the mean cosine of the query to the
            album's images, S_c = 1/K_c Σ_k s(e, e_k); the best album wins.
* ``knn``   memory-bank rule of contrastive learning: the top-k neighbours of the query vote
            for their album, each with weight exp(s/τ) (the weighted k-NN of Wu et al. 2018
            used to evaluate contrastive models); an album's score is its share of the vote.

The K images behind a decision (the whole album for ``mean``, the album's voters for
``knn``) are what Eq. 15 averages over to explain it.

    query_embs    (Q, J)   embeddings of the photos to classify
    gallery_embs  (M, J)   embeddings of the labelled images (supports / memory bank)
    memberships   (M, C)   bool, image m is in album c (an image may be in several albums)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from retrieval.errors import UsageError
from retrieval.fam import cosine

RULES = ("mean", "knn")
DEFAULT_TEMPERATURE = 0.07


@dataclass(frozen=True)
class Decision:
    """Album scores of one query and, per album, the gallery images behind its score."""

    scores: Tensor  # (C,) per album: mean cosine (mean rule) or vote share (knn rule)
    winner: int  # album index
    runner_up: int | None  # None with a single album
    evidence: tuple[Tensor, ...]  # C tensors of gallery indices: Eq. 15's K images of each album

    @property
    def winner_images(self) -> Tensor:
        return self.evidence[self.winner]

    @property
    def runner_up_images(self) -> Tensor:
        if self.runner_up is None:
            return self.evidence[self.winner][:0]
        return self.evidence[self.runner_up]


def album_scores(query_embs: Tensor, gallery_embs: Tensor, memberships: Tensor) -> Tensor:
    """Mean cosine of each query to each album's images (Eq. 11): (Q, J), (M, J), (M, C) -> (Q, C).

    An empty album scores -inf, so it never wins.
    """
    _check(gallery_embs, memberships)
    scores = cosine(query_embs, gallery_embs[None].expand(len(query_embs), -1, -1))  # (Q, M)
    weights = memberships.to(scores.dtype)  # (M, C)
    sizes = weights.sum(dim=0)  # (C,)
    means = scores @ weights / sizes.clamp_min(1)  # (Q, M) @ (M, C) -> (Q, C)
    return means.masked_fill(sizes == 0, float("-inf"))


def knn_votes(
    query_embs: Tensor,
    gallery_embs: Tensor,
    memberships: Tensor,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
) -> tuple[Tensor, Tensor]:
    """Weighted k-NN vote shares per album: (Q, J), (M, J), (M, C) -> (Q, C) in [0, 1], (Q, k) ids.

    Each of the top-k neighbours gives exp(s/τ) to every album it belongs to; shares are
    divided by the total weight of the k neighbours. Returns the shares and the neighbours.
    """
    _check(gallery_embs, memberships)
    scores = cosine(query_embs, gallery_embs[None].expand(len(query_embs), -1, -1))  # (Q, M)
    return vote_shares(scores, memberships, k, temperature)


def vote_shares(
    scores: Tensor, memberships: Tensor, k: int, temperature: float = DEFAULT_TEMPERATURE
) -> tuple[Tensor, Tensor]:
    """`knn_votes` from given cosines (Q, M); a -inf score (e.g. the query itself) never votes."""
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    top_scores, neighbours = scores.topk(min(k, scores.shape[-1]), dim=-1)  # (Q, k), (Q, k)
    weights = torch.exp((top_scores - 1) / temperature)  # (Q, k); the -1 keeps exp() finite
    votes = torch.einsum("qk,qkc->qc", weights, memberships[neighbours].to(weights.dtype))  # (Q, C)
    return votes / weights.sum(dim=-1, keepdim=True), neighbours


def _check(gallery_embs: Tensor, memberships: Tensor) -> None:
    if memberships.ndim != 2 or memberships.shape[0] != gallery_embs.shape[0]:
        raise ValueError(
            f"memberships {tuple(memberships.shape)} must be (M, C) with M = {gallery_embs.shape[0]} gallery images"
        )


def top_two(scores: Tensor) -> tuple[int, int | None]:
    """Index of the best and second-best album of one query's (C,) scores."""
    order = scores.argsort(descending=True, stable=True)
    return int(order[0]), (int(order[1]) if len(order) > 1 else None)


def decide(
    query_emb: Tensor,
    gallery_embs: Tensor,
    memberships: Tensor,
    rule: str = "mean",
    k: int = 20,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Decision:
    """Classify one query (J,); name, per album, the gallery images behind its score."""
    if rule == "mean":
        scores = album_scores(query_emb[None], gallery_embs, memberships)[0]  # (C,)
        voters = memberships  # (M, C): the whole album stands behind its mean
        candidates = torch.arange(len(gallery_embs), device=scores.device)
    elif rule == "knn":
        shares, neighbours = knn_votes(query_emb[None], gallery_embs, memberships, k, temperature)
        scores, candidates = shares[0], neighbours[0]  # (C,), (k,)
        voters = memberships[candidates]  # (k, C): each neighbour stands behind its albums
    else:
        raise UsageError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    evidence = tuple(candidates[voters[:, c]] for c in range(memberships.shape[1]))
    return Decision(scores, *top_two(scores), evidence)
