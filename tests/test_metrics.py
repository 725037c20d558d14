"""The metric maths (docs/DESIGN.md §7): golden cases worked out by hand, plus a few identities."""

import numpy as np
import pytest

from evaluation import metrics
from evaluation.metrics import (
    average_drop,
    average_precision,
    box_from_mask,
    box_iou,
    centre_prior,
    curve_auc,
    increase_in_confidence,
    largest_component_box,
    localisation_iou,
    localise,
    masked_image,
    mean_average_precision,
    minmax_saliency,
    proportion,
    recall_at_k,
    relevance,
    saliency_order,
    similarity_curve,
    step_masks,
    uniform_map,
)


def _mask_of(box, shape=(40, 60)):
    mask = np.zeros(shape)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1.0
    return mask


# ---------------------------------------------------------------------------- localisation
def test_a_map_equal_to_the_box_mask_scores_full_proportion_and_iou():
    box = (10, 5, 30, 25)  # x1/y1 exclusive: 20 x 20 pixels
    saliency = minmax_saliency(_mask_of(box))
    assert proportion(saliency, box) == pytest.approx(1.0)
    assert localisation_iou(saliency, box) == pytest.approx(1.0)


def test_a_uniform_map_puts_the_box_area_share_inside_the_box():
    # 20 x 20 box in a 40 x 60 image: 400 / 2400 = 1/6 of the mass, and the 0.2*max
    # threshold keeps the whole image, whose box has IoU 400 / 2400 with the truth.
    box = (10, 5, 30, 25)
    saliency = minmax_saliency(np.full((40, 60), 3.7))
    assert np.all(saliency == 1.0)
    assert proportion(saliency, box) == pytest.approx(1 / 6)
    assert localisation_iou(saliency, box) == pytest.approx(1 / 6)


def test_iou_of_two_known_boxes():
    # [0,10)x[0,10) and [5,15)x[0,10): intersection 5*10 = 50, union 100 + 100 - 50 = 150.
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching, exclusive ends


def test_iou_boxes_only_the_largest_connected_component():
    # Two blobs above 0.2*max: a 10x10 one (the truth) and a 3x3 one far away. Only the
    # largest component is boxed, so IoU is exactly 1 despite the second blob.
    heat = np.zeros((40, 60))
    heat[5:15, 5:15] = 1.0
    heat[30:33, 50:53] = 0.9
    assert largest_component_box(heat > 0.2) == (5, 5, 15, 15)
    assert localisation_iou(minmax_saliency(heat), (5, 5, 15, 15)) == pytest.approx(1.0)


def test_iou_threshold_is_a_fifth_of_the_maximum():
    # A 10x10 core at 1.0 inside a 20x20 halo at 0.15 (< 0.2): only the core survives.
    # With the halo at 0.25 (>= 0.2) the box grows to the halo: IoU with the core 100/400.
    heat = np.zeros((40, 40))
    heat[10:30, 10:30] = 0.15
    heat[15:25, 15:25] = 1.0
    core = (15, 15, 25, 25)
    assert localisation_iou(minmax_saliency(heat), core) == pytest.approx(1.0)
    heat[10:30, 10:30][heat[10:30, 10:30] < 1] = 0.25
    assert localisation_iou(minmax_saliency(heat), core) == pytest.approx(0.25)


def test_diagonal_pixels_are_one_component():
    binary = np.zeros((5, 5), dtype=bool)
    binary[0, 0] = binary[1, 1] = binary[2, 2] = True
    assert largest_component_box(binary) == (0, 0, 3, 3)


def test_proportion_of_a_half_weighted_map():
    # Left half 1.0, right half 0.5 (min-max maps 0.5 -> 0 unless the min is elsewhere):
    # here the right half becomes 0 after min-max, so a box over the left half holds it all.
    heat = np.ones((10, 10))
    heat[:, 5:] = 0.5
    assert proportion(minmax_saliency(heat), (0, 0, 5, 10)) == pytest.approx(1.0)
    # Adding a zero pixel keeps 0.5 at 0.5: box (left half) mass 50 vs total 50 + 0.5*49.
    heat[0, 9] = 0.0
    assert proportion(minmax_saliency(heat), (0, 0, 5, 10)) == pytest.approx(50 / (50 + 0.5 * 49))


def test_boxes_are_clipped_to_the_image_and_empty_ones_refused():
    saliency = np.ones((10, 10))
    assert proportion(saliency, (-5, -5, 5, 20)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        proportion(saliency, (20, 0, 30, 10))


def test_box_from_mask_has_exclusive_ends():
    assert box_from_mask(_mask_of((3, 4, 9, 7)) > 0) == (3, 4, 9, 7)


def test_centre_prior_peaks_in_the_middle_and_uniform_is_flat():
    prior = centre_prior(7, 7)
    assert prior.argmax() == 24 and prior[3, 3] == pytest.approx(1.0)
    np.testing.assert_allclose(prior, prior.T)  # symmetric on a square grid
    assert np.all(uniform_map(3, 4) == 1.0)


# ---------------------------------------------------------------------------- retrieval
def test_recall_and_map_on_a_hand_made_ranking():
    # Query "a": relevant at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 0.5.
    # Query "b": relevant at rank 1 only   -> AP = 1.
    # Query "c": nothing relevant in its ranking -> AP = 0, never recalled.
    ranked = np.array([["x", "a", "y", "a", "z"], ["b", "x", "y", "z", "w"], ["x", "y", "z", "w", "v"]])
    hits = relevance(ranked, np.array(["a", "b", "c"]))
    assert recall_at_k(hits, (1, 2, 5)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: pytest.approx(2 / 3)}
    np.testing.assert_allclose(average_precision(hits), [0.5, 1.0, 0.0])
    assert mean_average_precision(hits) == pytest.approx(0.5)


# ---------------------------------------------------------------------------- faithfulness
def test_average_drop_and_increase_on_hand_numbers():
    # s = [0.8, 0.5, 0.4, -0.2], s' = [0.4, 0.6, -0.4, 0.1]
    # drops: (0.8-0.4)/0.8 = 0.5; rise -> 0; (0.4+0.4)/0.4 = 2 capped at 1; s <= 0 left out.
    # AD = (0.5 + 0 + 1) / 3 = 0.5; IC = 1/3 (only the second rises).
    scores, masked = np.array([0.8, 0.5, 0.4, -0.2]), np.array([0.4, 0.6, -0.4, 0.1])
    drop, rise = average_drop(scores, masked), increase_in_confidence(scores, masked)
    assert drop.value == pytest.approx(0.5) and (drop.n, drop.excluded) == (3, 1)
    assert rise.value == pytest.approx(1 / 3) and (rise.n, rise.excluded) == (3, 1)


def test_deletion_curve_of_a_known_case():
    # A 2x2 image whose similarity is the sum of its pixels' weights [[0.5, 0.3], [0.2, 0.0]]
    # (s = 1). Deleting the most salient pixels first in 4 steps: s_t = 1, 0.5, 0.2, 0, 0,
    # so AUC = mean of the trapezoids (0.75 + 0.35 + 0.1 + 0) / 4 = 0.3.
    weights = np.array([[0.5, 0.3], [0.2, 0.0]])
    order = saliency_order(weights, np.zeros(4))
    masks = step_masks(order, weights.shape, steps=4)  # (5, 2, 2): True = deleted
    scores = np.array([(weights * ~m).sum() for m in masks])
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.2, 0.0, 0.0])
    assert curve_auc(similarity_curve(scores, 1.0)) == pytest.approx(0.3)


def test_ties_are_ordered_by_the_tiebreak_key():
    saliency = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert list(saliency_order(saliency, np.array([0.0, 0.3, 0.1, 0.2]))) == [0, 2, 3, 1]


def test_similarity_curves_are_shares_of_s_clipped_to_the_unit_interval():
    np.testing.assert_allclose(similarity_curve(np.array([0.5, 0.75, -0.1]), 0.5), [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="s > 0"):
        similarity_curve(np.array([0.1]), 0.0)


def test_step_masks_grow_from_nothing_to_everything():
    masks = step_masks(np.arange(12)[::-1], (3, 4), steps=3)
    assert [int(m.sum()) for m in masks] == [0, 4, 8, 12]
    assert np.all(masks[1:] >= masks[:-1])  # each step keeps the previous pixels


def test_localise_gives_proportion_and_iou_and_nans_without_a_box():
    saliency = np.zeros((20, 30))
    saliency[5:10, 10:20] = 1.0
    assert localise(saliency, (10, 5, 20, 10)) == (proportion(saliency, (10, 5, 20, 10)), 1.0)
    assert all(np.isnan(v) for v in localise(saliency, None))


def test_masking_by_a_saliency_of_ones_keeps_the_image_and_of_zeros_blacks_it_out():
    image = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    assert np.array_equal(masked_image(image, np.ones((6, 7))), image)
    assert not masked_image(image, np.zeros((6, 7))).any()
    half = masked_image(image, np.full((6, 7), 0.5))
    assert half.dtype == np.uint8 and np.abs(half.astype(int) - image / 2).max() <= 0.5


def test_pointing_game_hits_when_the_maximum_is_inside_the_box():
    saliency = np.zeros((10, 10))
    saliency[2, 7] = 1.0  # row 2, column 7: x = 7, y = 2
    assert metrics.pointing_hit(saliency, (6, 1, 9, 4)) == 1.0
    assert metrics.pointing_hit(saliency, (0, 0, 7, 10)) == 0.0  # x2 = 7 is exclusive
    assert metrics.pointing_hit(np.full((10, 10), 0.5), (0, 0, 10, 10)) == 0.0  # a constant map points nowhere
    assert np.isnan(metrics.pointing_hit(saliency, None))


def test_rank_correlation_is_spearmans_rho():
    rng = np.random.default_rng(0)
    first = rng.random((7, 7))
    assert metrics.rank_correlation(first, first**3) == pytest.approx(1.0)  # same order
    assert metrics.rank_correlation(first, -first) == pytest.approx(-1.0)
    second = rng.random((7, 7))
    from scipy.stats import spearmanr  # the oracle

    assert metrics.rank_correlation(first, second) == pytest.approx(spearmanr(first.ravel(), second.ravel())[0])
    assert np.isnan(metrics.rank_correlation(first, np.ones((7, 7))))
    with pytest.raises(ValueError, match="cannot be compared"):
        metrics.rank_correlation(first, np.ones((14, 14)))
