"""Episodes: sampling properties over seeds, Eq. 11 decisions against a loop, the 95% CI by hand."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import draw_picture, run_cli, run_json
from PIL import Image

from evaluation.episodes import episode_scores, mean_ci95, sample_episode, sample_episodes
from evaluation.fewshot import Decisions, Features, decision_maps, per_group_mean
from retrieval.fam import explain
from retrieval.head import Head

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
    cosines = (F.normalize(embs, dim=1) @ F.normalize(embs, dim=1).T).numpy()  # (M, M)
    episode = sample_episode(LABELS, 4, 3, 2, np.random.default_rng(seed))
    scores = episode_scores(cosines, episode)  # (8, 4)
    for row, query in enumerate(episode.queries):
        for c in range(4):
            loop = np.mean([F.cosine_similarity(embs[query], embs[s], dim=0).item() for s in episode.supports[c]])
            assert scores[row, c] == pytest.approx(loop, rel=1e-12)


def test_the_95_percent_interval_matches_a_hand_computation():
    # accuracies 0.5, 1.0, 0.75: mean 0.75; sample sd = sqrt((0.25² + 0.25² + 0²) / 2) = 0.25;
    # half-width = 1.959964 * 0.25 / sqrt(3) = 0.282896...
    mean, half = mean_ci95(np.array([0.5, 1.0, 0.75]))
    assert mean == pytest.approx(0.75)
    assert half == pytest.approx(1.959963984540054 * 0.25 / math.sqrt(3))
    assert half == pytest.approx(0.2828965, abs=1e-6)
    assert math.isnan(mean_ci95(np.array([0.6]))[1])


# ---------------------------------------------------------------------------- famsearch eval --episodes / --knn
def _dataset(root, labels: int = 4, views: int = 4):
    """`labels` drawn pictures, each in `views` slightly shifted copies, with a box around the picture."""
    (root / "images").mkdir(parents=True)
    lines = []
    for label in range(labels):
        for view in range(views):
            canvas = Image.new("RGB", (80, 72), (30 * view, 90, 200 - 20 * view))
            canvas.paste(draw_picture(label, size=48), (4 * view, 3 * view))
            path = f"images/c{label}_v{view}.png"
            canvas.save(root / path)
            box = [4 * view, 3 * view, 4 * view + 48, 3 * view + 48]
            lines.append(json.dumps({"path": path, "label": f"c{label}", "split": "gallery", "bbox": box}))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


TOY = ("--model", "toy", "--input-size", "64", "--no-progress")


def test_episodic_eval_is_reproducible_and_reports_every_explainer(capsys, tmp_path):
    data = _dataset(tmp_path / "data")
    argv = (
        "eval",
        data,
        "--episodes",
        "30",
        "--way",
        "3",
        "--shot",
        "2",
        "--queries",
        "2",
        "--home",
        tmp_path / "h",
        "--maps-episodes",
        "5",
        "--faithfulness-episodes",
        "2",
        *TOY,
    )
    _, first = run_json(capsys, *argv)
    assert (tmp_path / "h" / "cache").is_dir()  # the second run reads A and z from the cache
    _, again = run_json(capsys, *argv)
    assert 0 <= first["accuracy"] <= 1 and first["ci95"] > 0
    assert set(first["explainers"]) == {"fam", "fam-exact", "gradcam", "centre"}
    for row in first["explainers"].values():
        assert row["n"] > 0 and 0 <= row["proportion"] <= 1 and 0 <= row["iou"] <= 1 and row["groups"] <= 5
        assert row["faithfulness_n"] + row["faithfulness_excluded"] <= row["n"]
    for report in (first, again):  # timings aside, a warm cache gives the same report
        del report["seconds"]
        for row in report["explainers"].values():
            del row["ms_per_map"]
    assert first == again


def test_knn_eval_accuracy_equals_a_leave_one_out_loop(capsys, tmp_path):
    data = _dataset(tmp_path / "data")
    _, report = run_json(
        capsys,
        "eval",
        data,
        "--knn",
        "3",
        "--home",
        tmp_path / "h",
        "--maps-episodes",
        "1",
        "--faithfulness-episodes",
        "0",
        *TOY,
    )
    cached = np.load(next((tmp_path / "h" / "cache").glob("fewshot-*.npz")))
    pooled, labels = torch.from_numpy(cached["pooled"]).double(), np.repeat(np.arange(4), 4)
    unit = F.normalize(pooled, dim=1)
    right = 0
    for q in range(len(labels)):
        sims = (unit @ unit[q]).numpy()
        sims[q] = -np.inf  # leave the query out
        top = np.argsort(-sims, kind="stable")[:3]
        votes = np.bincount(labels[top], weights=np.exp(sims[top] / 0.07), minlength=4)
        right += votes.argmax() == labels[q]
    assert report["accuracy"] == pytest.approx(right / len(labels))
    assert all(row["faithfulness_n"] == 0 for row in report["explainers"].values())


def test_metrics_average_within_each_episode_then_over_episodes():
    # episode 0 has values 1 and 2 (mean 1.5), episode 1 has 3 (nan has no box): (1.5 + 3) / 2 = 2.25
    assert per_group_mean(np.array([1.0, 2.0, 3.0, np.nan]), np.array([0, 0, 1, 1])) == (2.25, 3, 2)


def test_eval_refuses_both_modes_at_once(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", _dataset(tmp_path / "d"), "--episodes", "2", "--knn", "3", *TOY)
    assert code == 2 and "not both" in err


@pytest.mark.parametrize("name", ["fam", "fam-exact", "gradcam"])
def test_batched_decision_maps_equal_one_explain_call_per_decision(name):
    g = torch.Generator().manual_seed(0)
    feature_maps = torch.rand(9, 6, 3, 4, generator=g, dtype=torch.float64)
    features = Features(
        [], np.zeros(9, np.int64), feature_maps, feature_maps.mean(dim=(-2, -1)), [], SimpleNamespace(head=Head())
    )
    partners = [np.array([1, 2]), np.array([3]), np.array([4, 5]), np.array([6, 7, 8])]  # K varies, as k-NN voters do
    decisions = Decisions(np.zeros(4, np.int64), np.array([0, 1, 2, 0]), partners)
    rows = np.array([3, 0, 2, 1])
    maps = decision_maps(name, features, decisions, rows, chunk=1)
    for heat, d in zip(maps, rows):
        q = decisions.query[d]
        loop, _ = explain(name, feature_maps[q], features.embs[q], features.embs[torch.from_numpy(partners[d])])
        np.testing.assert_allclose(heat, loop.numpy(), rtol=1e-6)
