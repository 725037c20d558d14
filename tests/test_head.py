"""Heads and pooling: PCA-whitening, GeM/GAP, head files."""

import pytest
import torch

from retrieval.head import Head, fit_pcaw, head_meta, load_head
from retrieval.pooling import POOLINGS, explained_feature_map, pool_feature_map


def _clustered(seed: int, m: int = 200, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.1, 5.0, n, dtype=torch.float64)
    return torch.randn(m, n, generator=g, dtype=torch.float64) * scales + 3.0


@pytest.mark.parametrize("seed", range(3))
def test_pcaw_without_shrinkage_whitens_its_training_data(seed):
    pooled = _clustered(seed)
    head = fit_pcaw(pooled, dim=12, shrinkage=0.0)
    embs = head(pooled.float()).double()
    torch.testing.assert_close(embs.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(embs.T), torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)


def test_pcaw_shrinkage_damps_each_component_by_lambda_over_lambda_plus_shrink():
    # Var(e_j) = λ_j / (λ_j + s·mean λ): the eigen-covariance, shrunk; no longer the identity.
    pooled = _clustered(0)
    eigvals = torch.linalg.eigvalsh(torch.cov(pooled.T)).flip(0)  # descending
    head = fit_pcaw(pooled, dim=12, shrinkage=0.5)
    cov = torch.cov(head(pooled.float()).double().T)
    expected = eigvals / (eigvals + 0.5 * eigvals.mean())
    torch.testing.assert_close(cov, torch.diag(expected), atol=1e-3, rtol=1e-3)


def test_pcaw_keeps_at_most_gallery_size_minus_one_components():
    head = fit_pcaw(_clustered(0, m=5), dim=512)
    assert head.weight.shape == (12, 4) and head.bias.shape == (4,)


@pytest.mark.parametrize("seed", range(3))
def test_gem_with_p_1_is_gap(seed):
    feature_maps = torch.rand(2, 6, 3, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(pool_feature_map(feature_maps, "gem", p=1.0), pool_feature_map(feature_maps, "gap"))


def test_gem_lies_between_gap_and_max():
    feature_maps = torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    gem = pool_feature_map(feature_maps, "gem")
    assert (gem >= pool_feature_map(feature_maps, "gap") - 1e-6).all()
    assert (gem <= feature_maps.amax(dim=(-2, -1)) + 1e-6).all()


@pytest.mark.parametrize("pooling", ["gap", "sqrt"])
def test_linear_poolings_are_the_mean_of_the_map_the_explainers_see(pooling):
    feature_maps = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    explained = explained_feature_map(feature_maps, pooling)
    torch.testing.assert_close(pool_feature_map(feature_maps, pooling), explained.mean(dim=(-2, -1)))


def test_an_unknown_pooling_is_refused():
    assert "max" not in POOLINGS
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_feature_map(torch.rand(1, 2, 2, 2), "max")


def test_a_saved_head_loads_back_with_its_meta(tmp_path):
    head = Head("linear", torch.randn(6, 3), torch.randn(3))
    head.save(tmp_path / "head.pt", meta={"pooling": "gap", "input_size": 224})
    loaded = load_head(tmp_path / "head.pt")
    assert loaded.kind == "linear" and loaded.digest == head.digest
    torch.testing.assert_close(loaded.weight, head.weight)
    assert head_meta(tmp_path / "head.pt") == {"pooling": "gap", "input_size": 224}


def test_a_file_that_is_not_a_head_is_refused(tmp_path):
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a famsearch head"):
        load_head(tmp_path / "x.pt")


def test_attention_pooling_is_the_mean_of_the_weighted_map_the_explainers_see():
    from retrieval.pooling import Objectness

    g = torch.Generator().manual_seed(2)
    feature_maps = torch.rand(2, 4, 3, 3, generator=g, dtype=torch.float64)
    probe = Objectness(torch.randn(4, generator=g, dtype=torch.float64), 0.3)
    explained = explained_feature_map(feature_maps, "attn:x", probe)
    weights = probe(feature_maps)  # (2, 3, 3), mean 1 per image
    torch.testing.assert_close(weights.mean(dim=(-2, -1)), torch.ones(2, dtype=torch.float64))
    expected = torch.einsum("bnhw,bhw->bn", feature_maps, weights / weights.sum(dim=(-2, -1), keepdim=True))
    torch.testing.assert_close(pool_feature_map(feature_maps, "attn:x", objectness=probe), expected)
    torch.testing.assert_close(explained.mean(dim=(-2, -1)), expected)
