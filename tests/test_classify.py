"""Classification by albums: Eq. 11 and k-NN decisions against loops, the maps behind them, the shells."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import copy_home, draw_picture, run_cli, run_json
from PIL import Image
from sqlalchemy import select

from indexer.cli import main
from retrieval.albums import labelled_gallery, labels_from_folders, read_labels_file, set_labels
from retrieval.classify import album_scores, decide, knn_votes
from retrieval.config import Settings
from retrieval.engine import QueryEngine
from retrieval.fam import explain
from retrieval.images import load_image
from retrieval.schema import AlbumImage
from retrieval.store import open_store


def _gallery(seed: int, m: int = 12, j: int = 6, c: int = 4):
    g = torch.Generator().manual_seed(seed)
    embs = torch.randn(m, j, generator=g, dtype=torch.float64)
    memberships = torch.zeros(m, c, dtype=torch.bool)
    memberships[torch.arange(m), torch.arange(m) % c] = True  # every album non-empty
    memberships[0, 1] = True  # an image in two albums
    query = torch.randn(3, j, generator=g, dtype=torch.float64)
    return query, embs, memberships


@pytest.mark.parametrize("seed", range(5))
def test_mean_rule_scores_equal_a_loop_over_each_albums_supports(seed):
    query, embs, memberships = _gallery(seed)
    scores = album_scores(query, embs, memberships)  # (Q, C)
    for q in range(len(query)):
        for c in range(memberships.shape[1]):
            supports = embs[memberships[:, c]]
            loop = sum(F.cosine_similarity(query[q], s, dim=0) for s in supports) / len(supports)  # Eq. 11
            torch.testing.assert_close(scores[q, c], loop)
        assert decide(query[q], embs, memberships, "mean").winner == int(scores[q].argmax())


@pytest.mark.parametrize("seed", range(5))
def test_knn_vote_shares_equal_a_loop_over_the_top_k_neighbours(seed):
    query, embs, memberships = _gallery(seed)
    k, tau = 5, 0.1
    shares, _ = knn_votes(query, embs, memberships, k, tau)
    for q in range(len(query)):
        cos = [float(F.cosine_similarity(query[q], e, dim=0)) for e in embs]
        top = sorted(range(len(embs)), key=lambda i: -cos[i])[:k]
        weights = {i: math.exp(cos[i] / tau) for i in top}
        for c in range(memberships.shape[1]):
            expected = sum(w for i, w in weights.items() if memberships[i, c]) / sum(weights.values())
            assert shares[q, c].item() == pytest.approx(expected, rel=1e-9)


def test_knn_evidence_is_the_winners_voters_and_mean_evidence_is_the_whole_album():
    query, embs, memberships = _gallery(0)
    knn = decide(query[0], embs, memberships, "knn", k=4)
    top4 = set(album_scores(query[:1], embs, torch.eye(len(embs), dtype=torch.bool))[0].topk(4).indices.tolist())
    voters = set(knn.winner_images.tolist())
    assert voters and voters <= top4 and all(memberships[i, knn.winner] for i in voters)
    mean = decide(query[0], embs, memberships, "mean")
    assert mean.winner_images.tolist() == memberships[:, mean.winner].nonzero()[:, 0].tolist()
    assert mean.runner_up != mean.winner


def test_an_empty_album_never_wins_and_a_bad_rule_is_refused():
    query, embs, memberships = _gallery(1)
    memberships = torch.cat([memberships, torch.zeros(len(embs), 1, dtype=torch.bool)], dim=1)
    assert album_scores(query, embs, memberships)[:, -1].isneginf().all()
    with pytest.raises(ValueError, match="unknown rule"):
        decide(query[0], embs, memberships, "vote")


@pytest.mark.parametrize("seed", range(3))
def test_group_map_is_the_mean_of_pair_maps_for_the_linear_explainers(seed):
    # fam-exact and closed-form Grad-CAM weights are linear in the partners' unit vectors
    # (Grad-CAM's ReLU aside), so the K-averaged map is the mean of the K pair maps.
    g = torch.Generator().manual_seed(seed)
    feature_map = torch.rand(8, 3, 4, generator=g, dtype=torch.float64)
    emb = feature_map.mean(dim=(-2, -1))
    partners = torch.randn(5, 8, generator=g, dtype=torch.float64)
    group, _ = explain("fam-exact", feature_map, emb, partners)
    pairs = torch.stack([explain("fam-exact", feature_map, emb, p[None])[0] for p in partners])
    torch.testing.assert_close(group, pairs.mean(dim=0))


# ---------------------------------------------------------------------------- albums in the DB
def test_folder_labels_take_the_first_sub_folder_under_the_root():
    paths = ["/p/birds/2023/a.jpg", "/p/flowers/b.jpg", "/p/c.jpg", "/elsewhere/d.jpg"]
    assert labels_from_folders(paths, ["/p"]) == {"/p/birds/2023/a.jpg": "birds", "/p/flowers/b.jpg": "flowers"}


def test_labels_files_read_csv_with_or_without_header_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\nx/1.jpg,cat\n\n2.jpg, dog\n")
    (tmp_path / "b.csv").write_text("x/1.jpg,cat\n")
    (tmp_path / "c.jsonl").write_text('{"path": "x/1.jpg", "label": "cat", "split": "gallery"}\n')
    first = str(tmp_path / "x" / "1.jpg")
    assert read_labels_file(tmp_path / "a.csv") == {first: "cat", str(tmp_path / "2.jpg"): "dog"}
    assert read_labels_file(tmp_path / "b.csv") == read_labels_file(tmp_path / "c.jsonl") == {first: "cat"}
    (tmp_path / "bad.csv").write_text("x/1.jpg\n")
    with pytest.raises(ValueError, match="row 1"):
        read_labels_file(tmp_path / "bad.csv")


def test_relabelling_replaces_one_sources_labels_and_deleted_images_leave_their_albums(indexed, gallery):
    settings = Settings(indexed)
    with open_store(settings.database_url) as store:
        paths = sorted(str(p) for p in gallery.rglob("*.*"))
        assert set_labels(store, {p: "a" for p in paths[:4]}, "file")["labelled"] == 4
        set_labels(store, {paths[0]: "b", "/not/indexed.jpg": "b"}, "file")
        names, ids, pooled, memberships = labelled_gallery(store)
        assert names == ["a", "b"] and memberships.sum(axis=0).tolist() == [3, 1]
        assert pooled.shape == (4, pooled.shape[1]) and not memberships.all(axis=1).any()
    Path(paths[0]).unlink()
    assert (
        main(
            [
                "index",
                str(gallery),
                "--home",
                str(indexed),
                "--model",
                "toy",
                "--input-size",
                "64",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    with open_store(settings.database_url) as store:
        with store.session() as session:
            assert len(session.scalars(select(AlbumImage)).all()) == 3  # FK cascade dropped the deleted file's row


# ---------------------------------------------------------------------------- engine and CLI
@pytest.fixture(scope="session")
def albums_template(tmp_path_factory) -> Path:
    """Six drawn photos in three album folders plus one unlabelled (drawn once; tests index copies)."""
    root = tmp_path_factory.mktemp("template") / "albums"
    for album, seeds in {"red": (0, 1, 2), "blue": (3, 4), "green": (5,)}.items():
        (root / album).mkdir(parents=True)
        for seed in seeds:
            draw_picture(seed).save(root / album / f"p{seed}.png")
    draw_picture(9).save(root / "loose.png")
    return root


def _albums_home(tmp_path, albums_template, index_template, *flags: str):
    """This test's copy of the album folders, indexed with folder labels (a copy of the session's template)."""
    template_home, summary = index_template(albums_template, "--labels-from", "folders", *flags)
    assert summary["labels"]["folders"] == {"labelled": 6, "albums": 3, "unknown": 0}
    root = shutil.copytree(albums_template, tmp_path / "albums")
    return copy_home(template_home, albums_template, root, tmp_path / "home"), root


@pytest.fixture
def albums_home(tmp_path, albums_template, index_template):
    return _albums_home(tmp_path, albums_template, index_template)


@pytest.fixture
def gap_albums_home(tmp_path, albums_template, index_template):
    """`albums_home` under GAP (photos pooled whole), for deciding on part of a photo against whole photos."""
    return _albums_home(tmp_path, albums_template, index_template, "--pooling", "gap")


def test_with_one_image_album_the_group_map_equals_the_pair_map(albums_home):
    home, root = albums_home
    engine = QueryEngine(Settings(home), device="cpu")
    try:
        query = draw_picture(11)
        result = engine.classify(query, "mean", explainer="fam")
        green = next(a for a in result.ranking if a.album == "green")
        assert len(green.image_ids) == 1
        forced = engine.classify(query, "knn", k=1, explainer="fam")  # one voter: K = 1
        voter_path = engine.store.images_by_ids(forced.winner.image_ids)[0].path
        pair = engine.compare(query, load_image(voter_path), "fam")
        np.testing.assert_allclose(forced.winner_map, pair.first_map, rtol=1e-5, atol=1e-6)
        assert forced.runner_up_map is None  # a single voter leaves the runner-up without evidence
        assert [a.score for a in result.ranking] == sorted((a.score for a in result.ranking), reverse=True)
    finally:
        engine.close()


def test_classify_cli_names_the_winner_and_runner_up_and_writes_maps(capsys, albums_home, tmp_path):
    home, root = albums_home
    query = tmp_path / "query.png"
    draw_picture(5).save(query)  # green's only photo: its mean cosine is 1, the most there is
    code, out = run_json(capsys, "classify", query, "--home", home, "--out", tmp_path / "maps")
    assert code == 0 and out["winner"]["album"] == "green" and out["winner"]["score"] == pytest.approx(1.0)
    assert out["runner_up"]["album"] != "green" and out["runner_up"]["score"] < 1
    assert [a["album"] for a in out["albums"]][0] == "green" and len(out["albums"]) == 3
    heat = np.load(out["winner"]["map"])
    assert heat.dtype == np.float32 and heat.ndim == 2
    assert (tmp_path / "maps" / "winner_overlay.png").is_file()
    code, text, _ = run_cli(capsys, "classify", query, "--home", home, "--rule", "knn", "-k", "1")
    assert code == 0 and text.startswith(f"{query}: green (1.00)")


def test_albums_cli_lists_labels_from_a_file_and_deletes_an_album(capsys, albums_home, tmp_path):
    home, root = albums_home
    labels = tmp_path / "labels.csv"
    labels.write_text(f"{root / 'loose.png'},misc\n{root / 'gone.png'},misc\n")
    code, out = run_json(capsys, "albums", "--home", home, "--from-file", labels)
    assert out["file"] == {"labelled": 1, "albums": 1, "unknown": 1}
    assert {a["album"]: a["images"] for a in out["albums"]} == {"blue": 2, "green": 1, "misc": 1, "red": 3}
    code, out = run_json(capsys, "albums", "--home", home, "--delete", "misc")
    assert out["deleted"] is True and "misc" not in {a["album"] for a in out["albums"]}
    code, _, err = run_cli(capsys, "classify", tmp_path / "nope.png", "--home", home)
    assert code == 2 and "no such file" in err


def test_the_ui_says_which_album_the_query_would_go_to_and_shows_why(albums_home, monkeypatch):
    from streamlit.testing.v1 import AppTest

    home, root = albums_home
    monkeypatch.setenv("FAMSEARCH_HOME", str(home))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "ui" / "app.py"), default_timeout=120).run()
    green = next(p for p in at.selectbox(key="pick").options if p.endswith("green/p5.png"))
    at = at.selectbox(key="pick").set_value(green).run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "would go to **green** (1.00) rather than" in text
    assert at.session_state["album_decision"].winner_map is not None
    assert any("Why green" in caption for image in at.image for caption in image.captions)


def test_classifying_part_of_a_photo_decides_on_that_part(gap_albums_home):
    """A photo with green's picture on the left and blue's on the right: each half goes to its own album."""
    home, root = gap_albums_home
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(draw_picture(5), (0, 0))
    canvas.paste(draw_picture(3), (64, 0))
    engine = QueryEngine(Settings(home), device="cpu")
    try:
        left = engine.classify(canvas, "mean", explainer="fam", box=(0, 0, 64, 64))
        right = engine.classify(canvas, "mean", explainer="fam", box=(64, 0, 128, 64))
        whole = engine.classify(canvas, "mean", explainer="fam")
        same = engine.classify(canvas, "mean", explainer="fam", box=(0, 0, 128, 64))
    finally:
        engine.close()
    assert left.winner.album == "green" and right.winner.album == "blue"
    assert np.count_nonzero(left.winner_map[:, 4:]) == 0 and np.count_nonzero(right.winner_map[:, :4]) == 0
    assert [(a.album, a.score) for a in same.ranking] == [(a.album, a.score) for a in whole.ranking]


def test_classify_cli_box_decides_on_the_boxed_part_and_refuses_a_box_off_the_photo(capsys, gap_albums_home, tmp_path):
    home, root = gap_albums_home
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(draw_picture(5), (0, 0))
    canvas.paste(draw_picture(3), (64, 0))
    query = tmp_path / "two.png"
    canvas.save(query)
    for box, album in (("0,0,64,64", "green"), ("64,0,200,64", "blue")):
        code, out = run_json(capsys, "classify", query, "--home", home, "--box", box)
        assert code == 0 and out["winner"]["album"] == album
    assert out["box"] == [64, 0, 200, 64]  # as given; the search used the part inside the photo
    code, out = run_json(capsys, "classify", query, "--home", home, "--box", "auto")
    assert code == 0 and out["box"] == "auto"  # JSON says how the photo was pooled
    code, _, err = run_cli(capsys, "classify", query, "--home", home, "--box", "0,70,10,80")
    assert code == 2 and "lies outside the 128x64 photo" in err
