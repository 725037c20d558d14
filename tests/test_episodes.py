"""Episodes: sampling properties over seeds, Eq. 11 decisions against a loop, the 95% CI by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.episodes import episode_scores, mean_ci95, sample_episode, sample_episodes

LABELS = np.repeat(np.arange(8), 6)  # 8 classes x 6 images
np.random.default_rng(0).shuffle(LABELS)


@pytest.mark.parametrize("seed", range(20))
def test_a_query_is_never_among_its_supports_and_every_image_has_its_class(seed):
    episode = sample_episode(LABELS, 5, 2, 3, np.random.default_rng(seed))
    supports = episode.supports.reshape(-1)
    assert not set(supports) & set(episode.queries)
    assert len(set(supports)) == 10 and len(set(episode.queries)) == 15 and len(set(episode.classes)) == 5
    assert (LABELS[episode.supports] == episode.classes[:, None]).all()
    assert (LABELS[episode.queries] == episode.classes[episode.targets]).all()


def test_the_same_seed_gives_the_same_episodes_and_another_seed_others():
    first = list(sample_episodes(LABELS, 4, 3, 1, 2, seed=7))
    again = list(sample_episodes(LABELS, 4, 3, 1, 2, seed=7))
    other = list(sample_episodes(LABELS, 4, 3, 1, 2, seed=8))
    assert all((a.queries == b.queries).all() and (a.supports == b.supports).all() for a, b in zip(first, again))
    assert any((a.queries != b.queries).any() for a, b in zip(first, other))


def test_too_few_classes_or_images_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 9 classes"):
        sample_episode(LABELS, 9, 1, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs 5 classes of >= 7 images"):
        sample_episode(LABELS, 5, 5, 2, np.random.default_rng(0))


@pytest.mark.parametrize("seed", range(3))
def test_episode_scores_equal_a_loop_over_each_classes_supports(seed):
    embs = torch.randn(len(LABELS), 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    episode = sample_episode(LABELS, 4, 3, 2, np.random.default_rng(seed))
    scores = episode_scores(embs, episode)  # (8, 4)
    for row, query in enumerate(episode.queries):
        for c in range(4):
            loop = np.mean([F.cosine_similarity(embs[query], embs[s], dim=0).item() for s in episode.supports[c]])
            assert scores[row, c].item() == pytest.approx(loop, rel=1e-12)


def test_the_95_percent_interval_matches_a_hand_computation():
    # accuracies 0.5, 1.0, 0.75: mean 0.75; sample sd = sqrt((0.25² + 0.25² + 0²) / 2) = 0.25;
    # half-width = 1.959964 * 0.25 / sqrt(3) = 0.282896...
    mean, half = mean_ci95(np.array([0.5, 1.0, 0.75]))
    assert mean == pytest.approx(0.75)
    assert half == pytest.approx(1.959963984540054 * 0.25 / math.sqrt(3))
    assert half == pytest.approx(0.2828965, abs=1e-6)
    assert math.isnan(mean_ci95(np.array([0.6]))[1])
