"""Explanations of a cosine similarity as maps over an image's last conv feature map.

Pure maths: tensors in, tensors out, any device, any leading batch dims. Notation follows
Liao et al., *Feature Activation Map* (arXiv 2307.05017); equation numbers are the paper's.

    feature_map  A       (..., N, h, w)   last conv activations of the image being explained
    emb          e       (..., J)         its embedding, e = head(GAP(A)) = W^T z + b
    partner_embs e_k     (..., K, J)      the K images it is compared with (K = 1: one match)
    head_weight  W       (N, J) or None   linear head; None means the identity (J = N)

Every explainer is "channel weights, then a weighted sum of activation maps" (Eq. 13); they
differ in the weights:

* ``fam``        paper FAM: cosine contributions (Eq. 15) on e, mapped back to the N channels
                 through the head, C = W C'^T (Eq. 16-18), then min-max (Eq. 12).
* ``fam-exact``  signed weights W ê_k / (‖e‖ hw): with GAP and a linear head the map sums
                 exactly to the cosine, minus the head bias' share (returned as ``offset``).
* ``gradcam``    Grad-CAM of the cosine in closed form: dS/dA^n = W (ê_k - S ê)_n / (‖e‖ hw),
                 uniform over space under GAP, so no backward pass is needed; ReLU'd map.
* ``fam-fine``   the default: the paper's FAM weights on the whole photo's map, graded by how much each cell
                 counts in the pooling, at twice the resolution (`fine_fam`; docs/eval.md says why).

The head's bias b is kept out of every map: it shifts e but lives at no location. For
``fam-exact`` its share b·ē_k/‖e‖ of the score is returned separately as the offset.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.config import COARSE_EMPHASIS_POWER, EXPLAINER_NAMES, FINE_EXPLAINER

EXPLAINERS = EXPLAINER_NAMES  # the default first
PAPER_EXPLAINERS = ("fam", "fam-exact", "gradcam")  # maps of the map z is the mean of, at its resolution
_EPS = 1e-12


def weighted_map(feature_map: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of activation maps (Eq. 13), the last step of every explainer (the paper's FAM, fam-exact,
    Grad-CAM): (..., N, h, w), (..., N) -> (..., h, w). "fam" names only the paper's whole method (`explain`)."""
    if feature_map.shape[:-2] != weights.shape:
        raise ValueError(
            f"feature_map {tuple(feature_map.shape)} and weights {tuple(weights.shape)} disagree on (..., N)"
        )
    # As a batched matrix-vector product: an expanded (repeated) feature map is read in place, where einsum
    # copied it first; (..., 1, N) @ (..., N, hw) -> (..., 1, hw)
    flat = weights.unsqueeze(-2) @ feature_map.flatten(-2)
    return flat.reshape(feature_map.shape[:-3] + feature_map.shape[-2:])


def cosine(emb: Tensor, partner_embs: Tensor) -> Tensor:
    """Cosine similarity (Eq. 14) of each emb with each of its partners: (..., J), (..., K, J) -> (..., K)."""
    emb_unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    partner_units = partner_embs / partner_embs.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return torch.einsum("...j,...kj->...k", emb_unit, partner_units)


def cosine_contributions(emb: Tensor, partner_embs: Tensor) -> Tensor:
    """Channel contributions to the K-averaged cosine (Eq. 15): (..., J), (..., K, J) -> (..., J).

    c_j = 1/K Σ_k e_j e_{k,j} / (|s(e, e_k)| ‖e‖ ‖e_k‖). Dividing by |s| makes each
    partner's contributions sum to ±1, so every match weighs the same in the average.
    """
    scores = cosine(emb, partner_embs)  # (..., K)
    norms = emb.norm(dim=-1, keepdim=True) * partner_embs.norm(dim=-1)  # (..., K)
    products = emb.unsqueeze(-2) * partner_embs  # (..., K, J)
    per_partner = products / (scores.abs() * norms).clamp_min(_EPS).unsqueeze(-1)  # (..., K, J)
    return per_partner.mean(dim=-2)


def invert_through_head(contributions: Tensor, head_weight: Tensor | None) -> Tensor:
    """Map embedding-space contributions back to channels, C = W C'^T (Eq. 18): (..., J) -> (..., N)."""
    if head_weight is None:
        return contributions
    return torch.einsum("nj,...j->...n", head_weight, contributions)


def minmax(values: Tensor) -> Tensor:
    """Min-max normalise over the last dim (Eq. 12); a constant vector becomes all zeros."""
    low = values.amin(dim=-1, keepdim=True)
    high = values.amax(dim=-1, keepdim=True)
    return (values - low) / (high - low).clamp_min(_EPS)


def fam_weights(emb: Tensor, partner_embs: Tensor, head_weight: Tensor | None = None) -> Tensor:
    """Paper FAM channel weights c̄ (Eq. 15, 18, 12): (..., J), (..., K, J) -> (..., N) in [0, 1]."""
    return minmax(invert_through_head(cosine_contributions(emb, partner_embs), head_weight))


def _mean_partner_unit(emb: Tensor, partner_embs: Tensor) -> Tensor:
    """ē = 1/K Σ_k ê_k / ‖e‖: (..., J), (..., K, J) -> (..., J)."""
    partner_units = partner_embs / partner_embs.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return partner_units.mean(dim=-2) / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def fam_exact_weights(emb: Tensor, partner_embs: Tensor, head_weight: Tensor | None, spatial_size: int) -> Tensor:
    """Signed weights whose map sums to the mean cosine minus the bias share: -> (..., N).

    With z = mean_hw A and e = W^T z + b:  S = 1/K Σ_k ê_k·e/‖e‖ = z·(W ē) + b·ē, with
    ē = mean_k ê_k / ‖e‖; spreading z over the hw cells gives weights W ē / hw.
    """
    direction = _mean_partner_unit(emb, partner_embs)  # (..., J)
    return invert_through_head(direction, head_weight) / spatial_size


def gradcam_weights(emb: Tensor, partner_embs: Tensor, head_weight: Tensor | None, spatial_size: int) -> Tensor:
    """Grad-CAM weights of the mean cosine, in closed form: -> (..., N).

    d cos(e, e_k)/de = (ê_k - s_k ê)/‖e‖; through e = W^T z + b and z = mean_hw A the
    gradient w.r.t. A^n is that vector times W, divided by hw, at every cell — so its
    spatial mean (Grad-CAM's α) is the same expression.
    """
    emb_unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (..., J)
    partner_units = partner_embs / partner_embs.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (..., K, J)
    scores = cosine(emb, partner_embs)  # (..., K)
    grads = partner_units - scores.unsqueeze(-1) * emb_unit.unsqueeze(-2)  # (..., K, J)
    direction = grads.mean(dim=-2) / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (..., J)
    return invert_through_head(direction, head_weight) / spatial_size


def bias_offset(emb: Tensor, partner_embs: Tensor, head_bias: Tensor | None) -> Tensor:
    """The part of the mean cosine carried by the head bias, b·ē: -> (...)."""
    if head_bias is None:
        return emb.new_zeros(emb.shape[:-1])
    return torch.einsum("j,...j->...", head_bias, _mean_partner_unit(emb, partner_embs))


@dataclass(frozen=True)
class FineInputs:
    """What `fine_fam` reads of a photo besides its embedding (`retrieval.encoder.Encoded` holds them):

    whole_map (..., N, h, w): the map z pools, over the whole photo (not only the cells it was pooled over)
    emphasis (..., h, w) in [0, 1]: how much each cell counts in the pooling, graded (the focus score over its
        maximum where the photo was pooled over its focus cells; 1 inside a box, 0 outside; 1 everywhere under GAP)
    fine_emphasis (..., H, W): the same on the guide's grid
    guide (..., C, H, W): features of the backbone's guide layer (stride 16: H, W = 2h, 2w)
    """

    whole_map: Tensor
    emphasis: Tensor
    fine_emphasis: Tensor
    guide: Tensor

    def __getitem__(self, index: int | slice | Tensor) -> FineInputs:
        """The same photos' inputs, indexed along the leading axis."""
        return FineInputs(self.whole_map[index], self.emphasis[index], self.fine_emphasis[index], self.guide[index])

    def repeated(self, n: int) -> FineInputs:
        """One photo's inputs as n views of them (no copy)."""
        return FineInputs(
            *(t.expand(n, *t.shape) for t in (self.whole_map, self.emphasis, self.fine_emphasis, self.guide))
        )


def joint_bilateral_upsample(coarse: Tensor, guide: Tensor, reach: float = 0.75, sigma: float = 0.2) -> Tensor:
    """Up-sample a map in the model's own finer features (joint bilateral up-sampling, Kopf et al. 2007):
    (..., h, w), (..., C, H, W) -> (..., H, W). Each fine cell averages the coarse cells near it (Gaussian of
    ``reach`` coarse cells) weighted by exp((cos - 1) / sigma), the cosine between its guide feature and the
    coarse cell's mean guide feature, so a value spreads along the object it was found on, not across its edge.

    A guide repeated along a leading axis (an expanded view, as the query side of a top-k passes its one photo's)
    has its weights computed once and shared by the maps along that axis."""
    h, w = coarse.shape[-2:]
    fine_h, fine_w = guide.shape[-2:]
    weights = _bilateral_weights(_once_per_repeat(guide), (h, w), reach, sigma)  # (..., HW, hw)
    values = weights @ coarse.reshape(*coarse.shape[:-2], h * w, 1)  # (..., HW, hw) @ (..., hw, 1) -> (..., HW, 1)
    out = values[..., 0] / weights.sum(dim=-1).clamp_min(_EPS)  # (..., HW)
    return out.reshape(*out.shape[:-1], fine_h, fine_w)


def _once_per_repeat(guide: Tensor) -> Tensor:
    """The guide (..., C, H, W) cut to length 1 along each leading axis it is only repeated along (stride 0)."""
    for dim in range(guide.dim() - 3):
        if guide.stride(dim) == 0:
            guide = guide.narrow(dim, 0, 1)
    return guide


def _bilateral_weights(guide: Tensor, coarse: tuple[int, int], reach: float, sigma: float) -> Tensor:
    """Each fine cell's weight on each coarse cell, spatial kernel times guide affinity: (..., C, H, W) ->
    (..., HW, hw), not normalised."""
    h, w = coarse
    channels, fine_h, fine_w = guide.shape[-3:]
    flat = guide.reshape(-1, channels, fine_h, fine_w)  # (B, C, H, W)
    unit = F.normalize(flat, dim=1).flatten(2)  # (B, C, HW)
    coarse_unit = F.normalize(F.adaptive_avg_pool2d(flat, (h, w)), dim=1).flatten(2)  # (B, C, hw)
    similarity = unit.transpose(1, 2) @ coarse_unit  # (B, HW, C) @ (B, C, hw) -> (B, HW, hw)
    spatial = _spatial_kernel((h, w), (fine_h, fine_w), reach, guide.dtype, guide.device)  # (HW, hw)
    weights = spatial * torch.exp((similarity - 1) / sigma)
    return weights.reshape(*guide.shape[:-3], fine_h * fine_w, h * w)


@functools.lru_cache(maxsize=16)
def _spatial_kernel(
    coarse: tuple[int, int], fine: tuple[int, int], reach: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """exp(-d² / 2 reach²) between fine and coarse cell centres, in coarse cells: -> (HW, hw). Cached: every map
    of a query (and of every query) at one input size is up-sampled with the same one; callers never write it."""
    (h, w), (fine_h, fine_w) = coarse, fine
    fine_y = (torch.arange(fine_h, dtype=dtype, device=device) + 0.5) * h / fine_h
    fine_x = (torch.arange(fine_w, dtype=dtype, device=device) + 0.5) * w / fine_w
    centre_y = torch.arange(h, dtype=dtype, device=device) + 0.5
    centre_x = torch.arange(w, dtype=dtype, device=device) + 0.5
    distance2 = (fine_y[:, None, None, None] - centre_y[None, None, :, None]) ** 2 + (
        fine_x[None, :, None, None] - centre_x[None, None, None, :]
    ) ** 2  # (H, W, h, w)
    return torch.exp(-distance2 / (2 * reach**2)).reshape(fine_h * fine_w, h * w)


def fine_fam(inputs: FineInputs, emb: Tensor, partner_embs: Tensor, head_weight: Tensor | None = None) -> Tensor:
    """The default map: the paper's FAM weights c̄ (Eq. 15, 18, 12) on the whole photo's map, emphasised where the
    photo was pooled, up-sampled in the guide features: (..., J), (..., K, J) -> (..., H, W), >= 0.

        coarse = Σ_n c̄_n A_n · e_c²          (h, w)  graded everywhere, the compared cells first
        fine   = JBU(coarse; guide) · e_f    (H, W)  twice as fine, along the object's own features
    """
    coarse = weighted_map(inputs.whole_map, fam_weights(emb, partner_embs, head_weight))
    coarse = coarse * inputs.emphasis.to(coarse) ** COARSE_EMPHASIS_POWER
    return joint_bilateral_upsample(coarse, inputs.guide.to(coarse)) * inputs.fine_emphasis.to(coarse)


def explain(
    explainer: str,
    feature_map: Tensor,
    emb: Tensor,
    partner_embs: Tensor,
    head_weight: Tensor | None = None,
    head_bias: Tensor | None = None,
    fine: FineInputs | None = None,
) -> tuple[Tensor, Tensor]:
    """Raw map and offset of one explainer: (..., N, h, w), (..., J), (..., K, J) -> (..., h, w), (...);
    ``fam-fine`` reads ``fine`` instead of ``feature_map`` and gives (..., H, W).

    The offset is the part of the mean cosine that no location carries (non-zero only for
    ``fam-exact`` with a biased head): ``map.sum((-2, -1)) + offset == mean cosine`` there.
    """
    spatial_size = feature_map.shape[-1] * feature_map.shape[-2]
    zero = emb.new_zeros(emb.shape[:-1])
    if explainer == FINE_EXPLAINER:
        if fine is None:
            raise ValueError("fam-fine needs the whole map, the emphasis and the guide features (FineInputs)")
        return fine_fam(fine, emb, partner_embs, head_weight), zero
    if explainer == "fam":
        return weighted_map(feature_map, fam_weights(emb, partner_embs, head_weight)), zero
    if explainer == "fam-exact":
        weights = fam_exact_weights(emb, partner_embs, head_weight, spatial_size)
        return weighted_map(feature_map, weights), bias_offset(emb, partner_embs, head_bias)
    if explainer == "gradcam":
        weights = gradcam_weights(emb, partner_embs, head_weight, spatial_size)
        return torch.relu(weighted_map(feature_map, weights)), zero
    raise ValueError(f"unknown explainer {explainer!r}; choose one of {', '.join(EXPLAINERS)}")


def gradcam_autograd(feature_map: Tensor, partner_embs: Tensor, embed: Callable[[Tensor], Tensor]) -> Tensor:
    """Grad-CAM of the mean cosine by a backward pass (the peer method and the oracle).

    Args:
        feature_map: (N, h, w) activations of the image being explained.
        partner_embs: (K, J) embeddings it is compared with.
        embed: maps pooled features (N,) to the embedding (J,), e.g. GAP then the head.
    Returns:
        (h, w) ReLU(Σ_n α_n A^n) with α_n the spatial mean of dS/dA^n.
    """
    activations = feature_map.detach().clone().requires_grad_(True)
    emb = embed(activations.mean(dim=(-2, -1)))  # (N, h, w) -> (N,) -> (J,)
    score = cosine(emb, partner_embs).mean()
    (grads,) = torch.autograd.grad(score, activations)  # (N, h, w)
    alphas = grads.mean(dim=(-2, -1))  # (N, h, w) -> (N,)
    return torch.relu(weighted_map(activations.detach(), alphas))
