"""The explainers' maths: golden hand-derived cases, loop oracles and identities."""

import pytest
import torch
import torch.nn.functional as F

from retrieval.fam import (
    cosine_contributions,
    explain,
    fam_weights,
    gradcam_autograd,
    minmax,
    weighted_map,
)


def _random_case(seed: int, n: int = 8, j: int = 5, k: int = 3, h: int = 4, w: int = 6):
    g = torch.Generator().manual_seed(seed)
    feature_map = torch.rand(n, h, w, generator=g, dtype=torch.float64)  # post-ReLU, >= 0
    weight = torch.randn(n, j, generator=g, dtype=torch.float64)
    bias = torch.randn(j, generator=g, dtype=torch.float64)
    partner_embs = torch.randn(k, j, generator=g, dtype=torch.float64)
    return feature_map, weight, bias, partner_embs


def _embed(feature_map, weight, bias):
    z = feature_map.mean(dim=(-2, -1))  # (N, h, w) -> (N,)  GAP
    return z if weight is None else z @ weight + bias


def _case_with_optional_head(seed: int, with_head: bool):
    """A random case through a biased linear head (J = 5), or with no head (J = N = 8)."""
    feature_map, weight, bias, partner_embs = _random_case(seed, j=5 if with_head else 8)
    weight, bias = (weight, bias) if with_head else (None, None)
    return feature_map, weight, bias, partner_embs, _embed(feature_map, weight, bias)


def test_fam_on_one_active_channel_in_one_cell_is_that_cell():
    # Two channels on a 2x2 map. Channel 0 fires only at (0, 0); channel 1 fires only at (1, 1).
    # z = GAP = [0.25, 0.25]. Match embedding [1, 0]: only channel 0 is shared, so
    # Eq. 15 gives c = [z0*1/(|s|‖z‖‖e_k‖), 0] = [1, 0] (it carries the whole cosine),
    # Eq. 12 keeps [1, 0], Eq. 13 gives channel 0's map: 1 at (0, 0), 0 elsewhere.
    feature_map = torch.zeros(2, 2, 2, dtype=torch.float64)
    feature_map[0, 0, 0] = 1.0
    feature_map[1, 1, 1] = 1.0
    emb = feature_map.mean(dim=(-2, -1))
    partner = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    heat, offset = explain("fam", feature_map, emb, partner)
    torch.testing.assert_close(heat, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert offset == 0


def test_contributions_of_identical_vectors_are_their_squared_shares():
    # e = e_k = [3, 4]: s = 1, ‖e‖‖e_k‖ = 25, c = [9, 16] / 25.
    emb = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(cosine_contributions(emb, emb[None]), torch.tensor([0.36, 0.64], dtype=torch.float64))


def _fam_by_loops(feature_map, emb, partner_embs, weight):
    """Eq. 14, 15, 18, 12, 13 written out with Python loops."""
    n, j = weight.shape
    k = partner_embs.shape[0]
    contrib = [0.0] * j
    for kk in range(k):
        other = partner_embs[kk]
        dot = sum(float(emb[i] * other[i]) for i in range(j))
        norm_a = sum(float(emb[i]) ** 2 for i in range(j)) ** 0.5
        norm_b = sum(float(other[i]) ** 2 for i in range(j)) ** 0.5
        s = dot / (norm_a * norm_b)  # Eq. 14
        for i in range(j):
            contrib[i] += float(emb[i] * other[i]) / (abs(s) * norm_a * norm_b) / k  # Eq. 15
    channel = [sum(float(weight[c, i]) * contrib[i] for i in range(j)) for c in range(n)]  # Eq. 18
    lo, hi = min(channel), max(channel)
    normed = [(v - lo) / (hi - lo) for v in channel]  # Eq. 12
    out = torch.zeros(feature_map.shape[1:], dtype=torch.float64)
    for c in range(n):
        out += normed[c] * feature_map[c]  # Eq. 13
    return out


@pytest.mark.parametrize("seed", range(4))
def test_fam_through_a_head_equals_the_equations_written_as_loops(seed):
    feature_map, weight, bias, partner_embs = _random_case(seed)
    emb = _embed(feature_map, weight, bias)
    heat, _ = explain("fam", feature_map, emb, partner_embs, weight, bias)
    torch.testing.assert_close(heat, _fam_by_loops(feature_map, emb, partner_embs, weight))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_head", [False, True])
def test_exact_map_plus_offset_sums_to_the_mean_cosine(seed, with_head):
    feature_map, weight, bias, partner_embs, emb = _case_with_optional_head(seed, with_head)
    heat, offset = explain("fam-exact", feature_map, emb, partner_embs, weight, bias)
    mean_cosine = F.cosine_similarity(emb[None], partner_embs, dim=-1).mean()
    torch.testing.assert_close(heat.sum() + offset, mean_cosine)
    if not with_head:
        assert offset == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_head", [False, True])
def test_closed_form_gradcam_equals_autograd(seed, with_head):
    feature_map, weight, bias, partner_embs, emb = _case_with_optional_head(seed, with_head)
    heat, _ = explain("gradcam", feature_map, emb, partner_embs, weight, bias)
    head = (lambda z: z) if weight is None else (lambda z: z @ weight + bias)
    torch.testing.assert_close(heat, gradcam_autograd(feature_map, partner_embs, head))


@pytest.mark.parametrize("explainer", ["fam", "fam-exact", "gradcam"])
def test_batched_explanations_equal_looped_ones(explainer):
    cases = [_random_case(seed) for seed in range(3)]
    feature_maps = torch.stack([c[0] for c in cases])
    weight, bias = cases[0][1], cases[0][2]
    partner_embs = torch.stack([c[3] for c in cases])
    embs = _embed(feature_maps, weight, bias)
    heats, offsets = explain(explainer, feature_maps, embs, partner_embs, weight, bias)
    for b in range(3):
        heat, offset = explain(explainer, feature_maps[b], embs[b], partner_embs[b], weight, bias)
        torch.testing.assert_close(heats[b], heat)
        torch.testing.assert_close(offsets[b], offset)


def test_the_bias_never_enters_the_fam_weights():
    feature_map, weight, bias, partner_embs = _random_case(0)
    other_bias = torch.randn(bias.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    emb = _embed(feature_map, weight, bias)
    # Same e, same W: whatever b produced e, the map is the one the weights of e and W give, for either bias or none.
    heat_a, _ = explain("fam", feature_map, emb, partner_embs, weight, bias)
    heat_b, _ = explain("fam", feature_map, emb, partner_embs, weight, other_bias)
    heat_none, _ = explain("fam", feature_map, emb, partner_embs, weight, None)
    torch.testing.assert_close(heat_a, weighted_map(feature_map, fam_weights(emb, partner_embs, weight)))
    torch.testing.assert_close(heat_a, heat_b)
    torch.testing.assert_close(heat_a, heat_none)
    # The two biases differ where an explainer that uses b sees them: fam-exact's offset moves.
    _, offset_a = explain("fam-exact", feature_map, emb, partner_embs, weight, bias)
    _, offset_b = explain("fam-exact", feature_map, emb, partner_embs, weight, other_bias)
    assert abs(float(offset_a - offset_b)) > 1e-3


def test_minmax_maps_to_unit_interval_and_constant_to_zero():
    torch.testing.assert_close(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(minmax(torch.tensor([5.0, 5.0])), torch.tensor([0.0, 0.0]))


def test_fam_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        weighted_map(torch.zeros(3, 2, 2), torch.zeros(4))


def test_unknown_explainer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown explainer"):
        explain("lime", torch.zeros(2, 2, 2), torch.ones(2), torch.ones(1, 2))
