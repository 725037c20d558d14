"""The default map (fam-fine): joint bilateral up-sampling in the model's own features, graded emphasis, packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval import fam
from retrieval.encoder import Encoded, load_encoder
from retrieval.modelspec import ModelSpec
from tests.conftest import draw_picture


def _jbu_loop(coarse: torch.Tensor, guide: torch.Tensor, reach: float = 0.75, sigma: float = 0.2) -> torch.Tensor:
    """The oracle: joint bilateral up-sampling written out cell by cell, (h, w), (C, H, W) -> (H, W)."""
    h, w = coarse.shape
    _, fine_h, fine_w = guide.shape
    mean_features = torch.nn.functional.adaptive_avg_pool2d(guide, (h, w))  # (C, h, w)
    out = torch.zeros(fine_h, fine_w, dtype=coarse.dtype)
    for i in range(fine_h):
        for j in range(fine_w):
            y, x = (i + 0.5) * h / fine_h, (j + 0.5) * w / fine_w
            total = norm = 0.0
            for k in range(h):
                for m in range(w):
                    spatial = np.exp(-((y - k - 0.5) ** 2 + (x - m - 0.5) ** 2) / (2 * reach**2))
                    cos = torch.nn.functional.cosine_similarity(guide[:, i, j], mean_features[:, k, m], dim=0)
                    weight = spatial * torch.exp((cos - 1) / sigma)
                    total, norm = total + weight * coarse[k, m], norm + weight
            out[i, j] = total / norm
    return out


@pytest.mark.parametrize("seed", range(3))
def test_joint_bilateral_upsampling_equals_the_loop_over_its_definition(seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, 4, generator=g, dtype=torch.float64)
    guide = torch.rand(5, 6, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fam.joint_bilateral_upsample(coarse, guide), _jbu_loop(coarse, guide))


def test_joint_bilateral_upsampling_is_batched_like_a_loop_and_keeps_a_constant():
    g = torch.Generator().manual_seed(0)
    coarse, guide = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 7, 8, 8, generator=g)
    batched = fam.joint_bilateral_upsample(coarse, guide)  # (2, 3, 8, 8)
    looped = torch.stack(
        [torch.stack([fam.joint_bilateral_upsample(coarse[a, b], guide[a, b]) for b in range(3)]) for a in range(2)]
    )
    torch.testing.assert_close(batched, looped)
    flat = fam.joint_bilateral_upsample(torch.full((4, 4), 0.7), guide[0, 0])  # weights sum to 1 per fine cell
    torch.testing.assert_close(flat, torch.full((8, 8), 0.7))


def test_joint_bilateral_upsampling_of_one_guide_repeated_equals_it_for_each_copy():
    """The query side of a top-k up-samples k maps in one photo's guide, an expanded view of it (no copy): the
    same as the guide copied k times, for a float64 and a float32 guide of other sizes in turn (nothing kept from
    one call is used for another)."""
    g = torch.Generator().manual_seed(1)
    for dtype, (h, w), (fine_h, fine_w) in ((torch.float64, (4, 4), (8, 8)), (torch.float32, (3, 5), (6, 10))):
        coarse = torch.rand(5, h, w, generator=g, dtype=dtype)
        guide = torch.rand(7, fine_h, fine_w, generator=g, dtype=dtype)
        repeated = fam.joint_bilateral_upsample(coarse, guide.expand(5, *guide.shape))  # (5, H, W)
        copied = torch.stack([fam.joint_bilateral_upsample(coarse[i], guide.clone()) for i in range(5)])
        torch.testing.assert_close(repeated, copied)
        torch.testing.assert_close(repeated[2], _jbu_loop(coarse[2], guide).to(dtype))


def test_a_value_spreads_along_its_features_not_across_an_edge():
    # Golden: left half of the guide one feature, right half another; a coarse map lit on the left column of
    # cells only. Up-sampled, the right half (other features) stays near 0 even next to the edge.
    guide = torch.zeros(2, 8, 8)
    guide[0, :, :4], guide[1, :, 4:] = 1.0, 1.0
    coarse = torch.zeros(4, 4)
    coarse[:, :2] = 1.0
    fine = fam.joint_bilateral_upsample(coarse, guide)
    assert fine[:, :4].min() > 0.99 and fine[:, 4:].max() < 0.01


def test_fine_fam_under_gap_is_the_up_sampled_paper_fam_of_the_whole_map():
    g = torch.Generator().manual_seed(1)
    whole, guide = torch.rand(6, 3, 3, generator=g), torch.rand(4, 6, 6, generator=g)
    emb, partners = torch.rand(6, generator=g), torch.rand(2, 6, generator=g)
    inputs = fam.FineInputs(whole, torch.ones(3, 3), torch.ones(6, 6), guide)
    paper = fam.weighted_map(whole, fam.fam_weights(emb, partners))
    torch.testing.assert_close(fam.fine_fam(inputs, emb, partners), fam.joint_bilateral_upsample(paper, guide))
    zero_outside = fam.FineInputs(whole, torch.ones(3, 3), (torch.arange(6)[:, None] < 3).float().expand(6, 6), guide)
    assert fam.fine_fam(zero_outside, emb, partners)[3:].abs().max() == 0  # no emphasis, no map


def test_fam_fine_needs_its_inputs():
    with pytest.raises(ValueError, match="FineInputs"):
        fam.explain("fam-fine", torch.rand(4, 2, 2), torch.rand(4), torch.rand(1, 4))


@pytest.mark.parametrize("pooling", ["focus", "gap"])
def test_an_encoded_batch_packs_and_unpacks_to_itself(pooling):
    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling=pooling))
    encoded = encoder.encode_full([draw_picture(0), draw_picture(1)])
    back = Encoded.unpack(encoded.pack(), encoded.pooled.shape[1], encoded.pooled)
    for name in ("whole_maps", "regions", "emphasis", "fine_emphasis", "guides"):
        torch.testing.assert_close(getattr(back, name), getattr(encoded, name))
    torch.testing.assert_close(back.explained_maps.mean(dim=(-2, -1)), encoded.pooled)  # z is still its mean


def test_the_fine_map_is_twice_as_fine_and_zero_outside_a_box():
    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling="gap"))
    photo = draw_picture(3)
    boxed = encoder.encode_full([photo], [(0.0, 0.0, 32.0, 64.0)])  # the left half of the 64 x 64 photo
    partner = encoder.encode_full([draw_picture(4)])
    heat = fam.fine_fam(boxed.fine()[0], boxed.pooled[0], partner.pooled)  # no head: e = z
    h, w = boxed.whole_maps.shape[-2:]
    assert heat.shape == (2 * h, 2 * w)
    assert heat[:, w:].abs().max() == 0 and heat[:, :w].max() > 0
