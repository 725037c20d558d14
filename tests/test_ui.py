"""The search UI: its helpers (pure), the engine methods it needs, and every flow through Streamlit's AppTest."""

from __future__ import annotations

import io
import random
import re
import shutil
import string
from pathlib import Path

import alembic.command
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from streamlit.testing.v1 import AppTest

from retrieval import fam
from retrieval.config import Settings
from retrieval.engine import QueryEngine, channel_shares
from retrieval.images import ImageError, load_image
from tests.conftest import HOSTILE_ALBUMS, HOSTILE_NAMES, copy_home, draw_picture, run_json
from ui import pictures, queries

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")


# ---------------------------------------------------------------------------- engine additions
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_head", [False, True])
def test_channel_shares_sum_to_the_cosine_minus_the_bias_part(seed, with_head):
    g = torch.Generator().manual_seed(seed)
    pooled = torch.rand(2, 6, generator=g, dtype=torch.float64)  # z of two photos, post-ReLU
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64) if with_head else None
    bias = torch.randn(4, generator=g, dtype=torch.float64) if with_head else None
    embs = pooled @ weight + bias if with_head else pooled  # (2, J)
    shares = channel_shares(pooled[0], embs[0], embs[1], weight)
    offset = fam.bias_offset(embs[0], embs[1:], bias)
    torch.testing.assert_close(shares.sum() + offset, F.cosine_similarity(embs[0], embs[1], dim=0))


def test_channel_shares_without_a_head_are_the_paper_contributions_times_the_score():
    g = torch.Generator().manual_seed(0)
    pooled = torch.rand(2, 5, generator=g, dtype=torch.float64)
    score = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    paper = fam.cosine_contributions(pooled[0], pooled[1:])  # Eq. 15, K = 1
    torch.testing.assert_close(channel_shares(pooled[0], pooled[0], pooled[1], None), score * paper)


def test_channel_shares_golden_one_shared_channel():
    # z = (1, 0), z_k = (1, 1): only channel 0 is on in both; cos = 1/√2 and all of it is channel 0's.
    z, z_k = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(channel_shares(z, z, z_k, None), torch.tensor([2**-0.5, 0.0], dtype=torch.float64))


@pytest.fixture
def engine(indexed: Path):
    engine = QueryEngine(Settings(indexed), device="cpu")
    yield engine
    engine.close()


def test_compare_gives_each_photos_explainer_map_against_the_other(engine, gallery):
    first, second = draw_picture(0), draw_picture(5)
    a, b = engine.embed(first), engine.embed(second)  # each photo through the model alone: the oracle
    for explainer in fam.EXPLAINERS:
        report = engine.compare(first, second, explainer)
        first_map, _ = fam.explain(
            explainer, a.feature_map, a.emb, b.emb[None], engine.head.weight, engine.head.bias, a.fine
        )
        second_map, _ = fam.explain(
            explainer, b.feature_map, b.emb, a.emb[None], engine.head.weight, engine.head.bias, b.fine
        )
        np.testing.assert_allclose(report.first_map, first_map.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(report.second_map, second_map.numpy(), rtol=1e-4, atol=1e-6)
        assert report.score == pytest.approx(float(fam.cosine(a.emb, b.emb[None])[0]), abs=1e-5)
    assert report.shares.sum() + report.offsets["first"] == pytest.approx(report.score, abs=1e-4)
    assert report.first_activations.shape[0] == report.shares.shape[0]


def test_compare_with_an_indexed_photo_uses_its_stored_vector_and_agrees_with_compare(engine, gallery):
    query = draw_picture(0)
    image_id, path = engine.indexed_paths("pic5")[0]
    for explainer in fam.EXPLAINERS:
        indexed = engine.compare_indexed(query, image_id, explainer)
        fresh = engine.compare(query, load_image(path, draft_size=engine.encoder.input_size), explainer)
        assert indexed.score == pytest.approx(fresh.score, abs=1e-5)
        np.testing.assert_allclose(indexed.first_map, fresh.first_map, rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(indexed.second_map, fresh.second_map, rtol=2e-3, atol=1e-4)  # float16 cache
    hit = next(m for m in engine.query(query, 8, "none").matches if m.image_id == image_id)
    assert indexed.score == pytest.approx(hit.score, abs=1e-5)  # the score the grid showed
    with pytest.raises(ValueError, match="no indexed image has id 999"):
        engine.compare_indexed(query, 999)


def test_indexed_paths_filter_by_name_and_list_only_ok_images(engine, gallery):
    every = [path for _, path in engine.indexed_paths()]
    assert len(every) == 8 and every == sorted(every)
    assert [Path(p).name for _, p in engine.indexed_paths("pic7")] == ["pic7.png"]
    assert engine.indexed_paths("100%_no_such") == []


def test_typed_paths_are_served_only_inside_the_indexed_roots(engine, gallery, tmp_path):
    indexed = gallery / "pic0.jpg"
    assert engine.resolve_user_path(str(indexed)) == indexed
    draw_picture(20).save(gallery / "sub" / "new.png")  # under a root, not indexed yet
    assert engine.resolve_user_path(f"  {gallery}/sub/new.png ") == (gallery / "sub" / "new.png").resolve()
    outside = tmp_path / "outside.png"
    draw_picture(21).save(outside)
    (gallery / "escape.png").symlink_to(outside)  # a link inside a root pointing out of it
    (gallery / "notes.txt").write_text("not a photo")
    refused = [
        str(outside),
        f"{gallery}/../outside.png",
        "photos/pic0.jpg",
        str(gallery / "escape.png"),
        str(gallery / "notes.txt"),
        "/etc/passwd",
        "",
        str(gallery),
    ]
    for text in refused:
        with pytest.raises(ValueError):
            engine.resolve_user_path(text)


# ---------------------------------------------------------------------------- ui helpers
def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_upload_that_is_not_an_image_is_refused_with_a_reason():
    with pytest.raises(ImageError, match="notes.jpg cannot be used as a query photo: not an image"):
        queries.read_upload("notes.jpg", b"hello, not a photo", 64)


def test_an_upload_over_the_size_cap_is_refused_before_decoding():
    with pytest.raises(ImageError, match=r"big.png is 2.0 MB; photos up to 1 MB"):
        queries.read_upload("big.png", b"\0" * (2 * 1024 * 1024), 64, max_mb=1)


def test_an_upload_over_the_megapixel_cap_is_refused():
    with pytest.raises(ImageError, match="megapixel cap"):
        queries.read_upload("wide.png", _png(Image.new("RGB", (3000, 2000))), 64, max_megapixels=5)


def test_the_same_bytes_give_the_same_query_digest():
    data = _png(draw_picture(3))
    first, second = queries.read_upload("a.png", data, 64), queries.read_upload("b.png", data, 64)
    assert first.digest == second.digest and first.image.size == (64, 64)
    assert queries.read_upload("c.png", _png(draw_picture(4)), 64).digest != first.digest


def test_a_query_jpeg_is_decoded_for_the_model_exactly_as_the_indexer_decodes_it(tmp_path):
    path = tmp_path / "big.jpg"
    draw_picture(5).resize((1600, 1200)).save(path, quality=90)
    photo = queries.read_indexed(path, 224)
    indexer_view = load_image(path, draft_size=224)  # what indexer.sync embeds (JPEG draft at input size)
    assert photo.image.size == indexer_view.size == (400, 300)
    assert photo.image.tobytes() == indexer_view.tobytes()
    assert photo.display.size == (1024, 768)  # people see it sharper than the model does


def test_the_grid_asks_for_maps_only_when_the_group_map_is_on(monkeypatch):
    monkeypatch.delenv("FAMSEARCH_RERANK", raising=False)
    assert queries.grid_request(7, "gradcam", False) == {"k": 7, "explainer": "none", "group": "none", "rerank": 50}
    assert queries.grid_request(7, "gradcam", True) == {"k": 7, "explainer": "gradcam", "group": "topk", "rerank": 50}


def test_top_channels_are_the_largest_shares_largest_first():
    shares = np.array([0.1, -0.5, 0.4, 0.0, 0.4])
    assert queries.top_channels(shares, 3).tolist() == [2, 4, 0]  # ties keep channel order
    assert len(queries.top_channels(shares, 99)) == 5
    assert queries.channel_rows(shares, 1) == [{"channel": "#2", "share of the score": 0.4}]


_UNESCAPE = re.compile(f"\\\\([{re.escape(string.punctuation)}])")  # CommonMark: a backslash before punctuation


@pytest.mark.parametrize("seed", range(5))
def test_plain_text_renders_back_to_itself_with_no_markup_left(seed):
    """Property: every ASCII punctuation mark, the only characters Markdown syntax is made of (besides the line
    breaks, which become spaces), is escaped, and CommonMark's unescaping gives back the text."""
    rng = random.Random(seed)
    texts = [*HOSTILE_NAMES, *HOSTILE_ALBUMS, string.punctuation, "".join(rng.choices(string.printable, k=200))]
    for text in texts:
        escaped = queries.plain(text)
        one_line = re.sub(r"[\r\n]+", " ", text)
        assert _UNESCAPE.sub(r"\1", escaped).replace(queries.WORD_JOINER, "") == one_line
        assert not set(_UNESCAPE.sub("", escaped)) & set(string.punctuation + "\r\n")  # nothing left unescaped


def test_plain_text_golden_cases():
    assert queries.plain("**bold**.jpg") == r"\*\*bold\*\*\.jpg"
    assert queries.plain("[a](x)") == r"\[a\]\(x\)"
    assert queries.plain("$x$ <b>&amp;\\") == r"\$x\$ \<b\>\&amp\;\\"
    assert queries.plain("two\nlines") == "two lines" and queries.plain("pic 3") == "pic 3"
    # bare URLs and e-mail addresses are linked after unescaping: a word joiner (U+2060) breaks them
    assert queries.plain("www.x.org") == "www\u2060\\.x\\.org" and queries.plain("a@b.cd") == "a\\@\u2060b\\.cd"
    assert queries.plain("HTTPS://x") == "HTTPS\\:\u2060\\/\\/x"


def test_long_file_names_are_cut_in_the_middle_to_one_line():
    assert queries.short_name("/a/pic3.png") == "pic3.png"
    assert queries.short_name("/a/motorcycle_left_rotated.jpg", 20) == "motorcycle…tated.jpg"  # 10 + 1 + 9


def test_the_timing_line_names_the_group_map_only_when_drawn():
    timing = {"embed": 90.4, "search": 2.6, "explain": 0.0, "total": 93.1}
    assert queries.timing_text(timing, False) == "answered in 93 ms (embed 90, search 3)"
    assert queries.timing_text({**timing, "explain": 40.0}, True).endswith("group map 40)")


def test_records_become_two_text_columns():
    rows = queries.key_value_rows({"roots": ["/a", "/b"], "n": 3, "model": {"x": 1}})
    assert rows == [
        {"field": "roots", "value": "/a, /b"},
        {"field": "n", "value": "3"},
        {"field": "model", "value": '{"x": 1}'},
    ]
    assert queries.key_value_rows(None) == []


def test_an_overlay_keeps_the_aspect_and_opacity_zero_is_the_photo():
    photo = draw_picture(1, size=64).resize((200, 100))
    heat = np.arange(12, dtype=np.float32).reshape(3, 4)
    drawn = pictures.heat_overlay(photo, heat, 0.5, max_side=100)
    assert drawn.size == (100, 50)
    assert pictures.heat_overlay(photo, heat, 0.0).tobytes() == photo.tobytes()
    with pytest.raises(ValueError, match="opacity"):
        pictures.heat_overlay(photo, heat, 1.5)


def test_the_legend_marks_zero_only_for_a_signed_map():
    def zero_tick_columns(legend: Image.Image) -> int:
        strip = np.asarray(legend)[:20]  # the colour strip rows
        return int((strip.sum(axis=-1) == 0).all(axis=0).sum())  # fully black columns

    assert zero_tick_columns(pictures.colour_scale(-1.0, 3.0)) >= 1
    assert zero_tick_columns(pictures.colour_scale(0.5, 3.0)) == 0


def test_the_map_range_is_taken_after_upsampling():
    heat = np.array([[0.0, 1.0]], dtype=np.float32)
    low, high = pictures.map_range(heat, (8, 1))
    assert 0.0 <= low < 0.25 and 0.75 < high <= 1.0


def test_the_colour_scale_reads_shares_of_the_score_per_cell():
    heat = np.array([[1.0, 3.0], [0.0, 4.0]], dtype=np.float32)  # cells add up to 8
    low, high = pictures.score_shares(heat, (2, 2), score=0.9, additive=False)  # drawn at its own size: the cells
    assert (low, high) == (0.0, 0.5)  # the strongest cell carries half of the score
    signed = np.array([[-0.1, 0.3], [0.2, 0.1]], dtype=np.float32)  # fam-exact: cells add up to score - offset
    assert pictures.score_shares(signed, (2, 2), score=0.6, additive=True) == pytest.approx((-0.1 / 0.6, 0.3 / 0.6))


def test_png_bytes_round_trip():
    image = draw_picture(2)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(pictures.png_bytes(image)))), np.asarray(image))


# ---------------------------------------------------------------------------- flows (AppTest)
def _app(home: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("FAMSEARCH_HOME", str(home))
    monkeypatch.delenv("FAMSEARCH_DB", raising=False)
    return AppTest.from_file(APP, default_timeout=120).run()


def _texts(at: AppTest) -> str:
    parts = [
        e.value
        for kind in ("markdown", "caption", "subheader", "title", "error", "warning", "info", "success")
        for e in getattr(at, kind)
    ]
    return "\n".join(str(p) for p in parts)


def _pick(at: AppTest, name: str) -> AppTest:
    path = next(p for p in at.selectbox(key="pick").options if p.endswith(name))
    return at.selectbox(key="pick").set_value(path).run()


def _captions(at: AppTest) -> list[str]:
    return [caption for image in at.image for caption in image.captions]


def test_picking_a_photo_shows_the_ranked_grid_and_why_opens_both_maps(indexed, monkeypatch):
    at = _app(indexed, monkeypatch)
    assert not at.exception and "Pick, upload or type a photo" in _texts(at)
    at = _pick(at, "pic3.png")
    assert not at.exception
    assert "Top 8" in _texts(at)  # k = 10 > 8 images: all of them, ranked
    grid = [b for b in at.button if b.key and b.key.startswith("why_")]
    assert len(grid) == 8
    first = at.session_state["result"].matches[0]
    assert first.path.endswith("pic3.png") and first.score == pytest.approx(1.0, abs=1e-4)

    at.button(key="why_2").click().run()
    assert not at.exception
    second = at.session_state["result"].matches[1]
    assert f"Why #2 matched: score {second.score:.4f}" in _texts(at)
    assert len(at.get("download_button")) == 2
    assert at.get("vega_lite_chart")  # the channel bar chart
    report = at.session_state["report"]
    assert report.score == pytest.approx(second.score, abs=1e-4)

    channel = at.selectbox(key="channel").options[0]
    at = at.selectbox(key="channel").set_value(channel).run()
    assert f"Channel {channel} on the query" in "\n".join(_captions(at))
    at.button(key="back").click().run()
    assert len([b for b in at.button if b.key and b.key.startswith("why_")]) == 8


def test_why_shows_the_matched_parts_as_correspondences(indexed, monkeypatch):
    at = _pick(_app(indexed, monkeypatch), "pic3.png")
    at.button(key="why_1").click().run()  # the photo itself: its cells match their own places (a drawn picture's
    assert not at.exception and "Matched parts" in _texts(at)  # flat areas have look-alike cells: most, not all)
    pairs = at.session_state["report"].correspondences
    same_place = np.isclose(pairs[:, :2], pairs[:, 2:4]).all(axis=1)
    assert len(pairs) and same_place[0] and same_place.mean() >= 0.5
    assert any("strongest matched cells" in caption for caption in _captions(at))


def test_switching_the_explainer_redraws_the_maps(indexed, monkeypatch):
    at = _pick(_app(indexed, monkeypatch), "pic1.png")
    at.button(key="why_2").click().run()
    score = at.session_state["result"].matches[1].score
    assert at.selectbox(key="explainer").value == "fam-fine"  # the default (retrieval.config.DEFAULT_EXPLAINER)
    maps = {}
    for explainer in ("fam", "fam-exact", "gradcam"):
        at.selectbox(key="explainer").set_value(explainer).run()
        assert not at.exception and f"{explainer}: " in _texts(at)
        maps[explainer] = at.session_state["report"].first_map
        assert ("sums to the score minus its offset" in _texts(at)) == (explainer == "fam-exact")
    assert not np.allclose(maps["fam"], maps["fam-exact"]) and not np.allclose(maps["fam-exact"], maps["gradcam"])
    assert maps["fam"].min() >= 0 and maps["gradcam"].min() >= 0
    assert maps["fam-exact"].sum() == pytest.approx(score, abs=1e-4)  # no head: no offset


def test_the_group_map_explains_the_query_against_the_whole_top_k(indexed, monkeypatch):
    at = _pick(_app(indexed, monkeypatch), "pic2.jpg")
    assert at.session_state["result"].group_map is None
    at.toggle(key="group").set_value(True).run()
    assert not at.exception
    assert "Group map: what all these matches have in common with it" in _captions(at)
    assert at.session_state["result"].group_map.ndim == 2


def test_a_typed_path_outside_the_indexed_folders_is_refused(indexed, monkeypatch, tmp_path):
    at = _app(indexed, monkeypatch)
    at.radio(key="source").set_value("Type a path").run()
    outside = tmp_path / "secret.png"
    draw_picture(9).save(outside)
    at.text_input(key="typed").input(str(outside)).run()
    assert not at.exception and "not an indexed photo" in at.error[0].value
    assert "result" not in at.session_state
    inside = next(p for p in (tmp_path / "photos").iterdir() if p.suffix == ".png")
    at.text_input(key="typed").input(str(inside)).run()
    assert not at.error and "Top 8" in _texts(at)


def test_a_bad_upload_gets_a_clear_message_and_a_good_one_searches(indexed, monkeypatch):
    at = _app(indexed, monkeypatch)
    at.radio(key="source").set_value("Upload a photo").run()
    at.file_uploader(key="upload").set_value(("holiday.jpg", b"this is a text file", "image/jpeg")).run()
    assert not at.exception
    assert at.error[0].value == queries.plain(
        "holiday.jpg cannot be used as a query photo: not an image (format not recognised)"
    )
    monkeypatch.setattr(queries, "MAX_UPLOAD_MB", 0.01)
    at.file_uploader(key="upload").set_value(("huge.png", b"\0" * 20000, "image/png")).run()
    assert queries.plain("photos up to 0.01 MB can be uploaded") in at.error[0].value
    monkeypatch.setattr(queries, "MAX_UPLOAD_MB", 20)
    at.file_uploader(key="upload").set_value(("mine.png", _png(draw_picture(6)), "image/png")).run()
    assert not at.error and "Top 8" in _texts(at)
    assert at.session_state["result"].matches[0].path.endswith("pic6.jpg")  # the same picture, re-encoded


def test_the_status_page_lists_counts_model_and_failed_files(capsys, gallery, home, monkeypatch):
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, summary = run_json(
        capsys,
        "index",
        gallery,
        "--home",
        home,
        "--model",
        "toy",
        "--input-size",
        "64",
        "--workers",
        "0",
        "--no-progress",
    )
    assert code == 1 and summary["failed"] == 1
    at = _app(home, monkeypatch)
    at.radio(key="page").set_value("Index status").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert (
        metrics["Images indexed"] == "8" and metrics["Failed files"] == "1" and metrics["Vectors in the index"] == "8"
    )
    assert metrics["Index type"] == "IndexFlatIP"
    model, last_run, failures = (table.value for table in at.dataframe)
    assert "toy" in model["value"].tolist()
    assert str(gallery.absolute()) in last_run.set_index("field").loc["roots", "value"]
    assert failures["path"].tolist() == [str(gallery / "broken.jpg")]
    assert failures["error"].iloc[0]


@pytest.mark.parametrize("make_home", ["missing", "empty-db"])
def test_no_index_shows_how_to_build_one_instead_of_a_traceback(make_home, tmp_path, monkeypatch, capsys):
    home = tmp_path / "nothing-here"
    if make_home == "empty-db":
        (tmp_path / "empty").mkdir()
        run_json(
            capsys,
            "index",
            tmp_path / "empty",
            "--home",
            home,
            "--model",
            "toy",
            "--input-size",
            "64",
            "--workers",
            "0",
            "--no-progress",
        )
    at = _app(home, monkeypatch)
    assert not at.exception
    assert "Nothing to search yet" in at.warning[0].value
    assert f"famsearch index PHOTO_FOLDER --home {home}" in at.code[0].value
    at.radio(key="page").set_value("Index status").run()
    assert not at.exception and "Nothing to search yet" in at.warning[0].value


def test_a_re_index_is_picked_up_without_restarting_the_ui(indexed, gallery, monkeypatch, capsys):
    at = _pick(_app(indexed, monkeypatch), "pic0.jpg")
    assert "Top 8" in _texts(at)
    draw_picture(30).save(gallery / "pic8.png")
    code, summary = run_json(
        capsys,
        "index",
        gallery,
        "--home",
        indexed,
        "--model",
        "toy",
        "--input-size",
        "64",
        "--workers",
        "0",
        "--no-progress",
    )
    assert code == 0 and summary["added"] == 1
    at.run()  # the index file was swapped: a new engine is loaded, the query re-run
    assert not at.exception and "Top 9" in _texts(at)


def test_the_engine_cache_key_is_the_committed_generation_not_the_files_on_disk(capsys, indexed, gallery, tmp_path):
    settings = Settings(home=indexed)
    committed = queries.index_stamp(settings)
    # A re-index has written its next generation's files but not committed it yet: an engine built
    # now still opens `committed`, so caching it under a newer key would keep it after the commit.
    (indexed / f"index-{committed + 1}.faiss").write_bytes(b"")
    assert queries.index_stamp(settings) == committed
    draw_picture(40).save(gallery / "new.png")
    run_json(
        capsys,
        "index",
        gallery,
        "--home",
        indexed,
        "--model",
        "toy",
        "--input-size",
        "64",
        "--workers",
        "0",
        "--no-progress",
    )
    assert queries.index_stamp(settings) == committed + 1
    empty = tmp_path / "empty-home"
    assert queries.index_stamp(Settings(home=empty)) is None and not empty.exists()  # nothing created


def test_the_index_stamp_reads_the_generation_without_migrating_or_writing(indexed, tmp_path, monkeypatch):
    def refuse_to_migrate(*args, **kwargs):
        raise AssertionError("index_stamp ran a migration")

    monkeypatch.setattr(alembic.command, "upgrade", refuse_to_migrate)
    db = indexed / "famsearch.db"
    before = db.read_bytes(), db.stat().st_mtime_ns
    assert queries.index_stamp(Settings(home=indexed)) == 1  # the first build commits generation 1
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    not_migrated = tmp_path / "not-migrated"
    not_migrated.mkdir()
    (not_migrated / "famsearch.db").touch()  # a home whose database has no tables yet
    assert queries.index_stamp(Settings(home=not_migrated)) == 0
    assert (not_migrated / "famsearch.db").stat().st_size == 0


# ---------------------------------------------------------------------------- part of the photo
def test_slider_ranges_become_a_region_and_a_box_in_the_model_images_pixels():
    assert queries.region_from_percent((0, 100), (0, 100)) is None
    region = queries.region_from_percent((25, 50), (10, 100))
    assert region == (0.25, 0.1, 0.5, 1.0)
    assert queries.box_on(region, (200, 80)) == pytest.approx((50, 8, 100, 80))
    assert queries.box_on(None, (200, 80)) is None
    with pytest.raises(ValueError, match="needs a width and a height"):
        queries.region_from_percent((30, 30), (0, 100))


def test_the_outline_frames_the_region_and_leaves_the_rest_of_the_photo():
    photo = Image.new("RGB", (200, 100), (90, 120, 30))
    framed = np.asarray(pictures.outline(photo, (0.25, 0.2, 0.75, 0.8))).astype(int)
    assert framed.shape == (100, 200, 3)
    assert (framed[50, 50] == 255).all() and (framed[20, 100] == 255).all()  # left and top edges, white
    assert (framed[50, 100] == (90, 120, 30)).all() and (framed[5, 5] == (90, 120, 30)).all()  # inside, outside


def test_searching_for_part_of_an_uploaded_photo_finds_the_picture_in_that_part(gap_indexed, monkeypatch):
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(draw_picture(2), (0, 0))
    canvas.paste(draw_picture(5), (64, 0))
    at = _app(gap_indexed, monkeypatch)
    at.radio(key="source").set_value("Upload a photo").run()
    at.file_uploader(key="upload").set_value(("two.png", pictures.png_bytes(canvas), "image/png")).run()
    for x_range, expected in (((0, 50), "pic2.jpg"), ((50, 100), "pic5.png")):
        at.slider(key="box_x").set_value(x_range).run()
        assert not at.exception and "**Query** (the framed part)" in _texts(at)
        assert at.session_state["result"].matches[0].path.endswith(expected)
    at.button(key="why_1").click().run()
    report = at.session_state["report"]
    assert np.count_nonzero(report.first_map[:, :4]) == 0  # the left half of the 8x8 map is outside the part
    at.slider(key="box_x").set_value((40, 40)).run()
    assert not at.exception and "needs a width and a height" in at.warning[0].value


def test_the_spotlight_dims_every_cell_but_the_picked_ones():
    photo = Image.new("RGB", (200, 100), (90, 120, 30))
    cells = np.zeros((2, 4), bool)
    cells[0, 1] = True  # x 50..100, y 0..50
    lit = np.asarray(pictures.spotlight(photo, cells)).astype(int)
    assert lit.shape == (100, 200, 3)
    assert (
        (lit[25, 75] == (90, 120, 30)).all()
        and (lit[75, 75] == (30, 40, 10)).all()
        and (lit[25, 10] == (30, 40, 10)).all()
    )
    assert queries.box_on(queries.AUTO, (200, 100)) == queries.AUTO


def test_picking_the_part_automatically_searches_for_what_stands_out(gap_indexed, monkeypatch):
    """The tiled photo: picture 1 eight times and picture 5 once; the whole photo finds picture 1, the
    automatic focus picture 5 (as `famsearch search --box auto` does), and the Why? maps stay on its cells.
    Ranked by cosine (FAMSEARCH_RERANK=0): the toy model's parts match at random."""
    monkeypatch.setenv("FAMSEARCH_RERANK", "0")
    canvas = Image.new("RGB", (192, 192))
    for x in range(3):
        for y in range(3):
            canvas.paste(draw_picture(5 if x == y == 0 else 1), (64 * x, 64 * y))
    at = _app(gap_indexed, monkeypatch)
    at.radio(key="source").set_value("Upload a photo").run()
    at.file_uploader(key="upload").set_value(("tiled.png", pictures.png_bytes(canvas), "image/png")).run()
    assert at.session_state["result"].matches[0].path.endswith("pic1.png")
    at.checkbox(key="box_auto").check().run()
    assert not at.exception and "(the part picked automatically: lit)" in _texts(at)
    assert at.slider(key="box_x").disabled
    assert at.session_state["result"].matches[0].path.endswith("pic5.png")
    cells = at.session_state["focus_cells"]
    at.selectbox(key="explainer").set_value("fam").run()  # the paper's map: zero off the compared cells
    at.button(key="why_1").click().run()
    assert not at.exception and np.count_nonzero(at.session_state["report"].first_map[~cells]) == 0


def _concentrated_on(fine_map: np.ndarray, cells: np.ndarray) -> bool:
    """A 2x finer map has more of its mass on the (up-sampled) cells than their share of the photo."""
    inside = np.kron(cells, np.ones((2, 2), dtype=bool))
    assert fine_map.shape == inside.shape and (fine_map >= 0).all()
    return fine_map[inside].sum() / fine_map.sum() > inside.mean()


def test_on_a_focus_index_the_query_lights_the_part_it_is_compared_by(indexed, monkeypatch):
    """The default pooling (focus) compares every photo by the part that stands out: the query photo shows
    those cells lit, the automatic-part checkbox (which would change nothing) gives way to a sentence saying
    so, and the Why? query map stays on the lit cells."""
    at = _pick(_app(indexed, monkeypatch), "pic2.jpg")
    assert not at.exception
    assert "(compared by the part that stands out: lit)" in _texts(at)
    assert "compares every photo by the part that stands out" in _texts(at)
    assert not [box for box in at.checkbox if box.key == "box_auto"]
    cells = at.session_state["focus_cells"]
    assert 0 < cells.sum() < cells.size
    at.button(key="why_1").click().run()
    # The default map (fam-fine) is graded over the whole photo, and weighs most where the photo was compared.
    assert not at.exception and _concentrated_on(at.session_state["report"].first_map, cells)
    match_cells = at.session_state["match_cells"]  # the match's compared cells, lit in the Why? view too
    assert 0 < match_cells.sum() < match_cells.size
    assert _concentrated_on(at.session_state["report"].second_map, match_cells)
    at.selectbox(key="explainer").set_value("fam").run()  # the paper's map stays on the compared cells alone
    assert np.count_nonzero(at.session_state["report"].first_map[~cells]) == 0
    assert np.count_nonzero(at.session_state["report"].second_map[~match_cells]) == 0


# ---------------------------------------------------------------------------- names are text, not markup
@pytest.fixture
def hostile_home(tmp_path, hostile_template, index_template) -> tuple[Path, Path]:
    """The gallery of markup-named photos and album folders, indexed with folder labels: (home, folder)."""
    template_home, summary = index_template(hostile_template, "--labels-from", "folders")
    assert summary["labels"]["folders"]["albums"] == len(HOSTILE_ALBUMS)
    folder = shutil.copytree(hostile_template, tmp_path / "hostile")
    return copy_home(template_home, hostile_template, folder, tmp_path / "home"), folder


def test_file_folder_and_upload_names_reach_the_page_escaped(hostile_home, monkeypatch):
    home, folder = hostile_home
    at = _app(home, monkeypatch)
    at.slider(key="k").set_value(20).run()  # every photo in the grid
    at = _pick(at, "**bold**.jpg")
    assert not at.exception and f"Top {len(HOSTILE_NAMES) + 4}" in _texts(at)
    captions = "\n".join(_captions(at))
    assert queries.plain(str(folder / "**bold**.jpg")) in captions  # the query's caption: its whole path
    for name in HOSTILE_NAMES:
        assert queries.plain(queries.short_name(name)) in captions  # the grid
    assert any(f"**{queries.plain(album)}**" in _texts(at) for album in HOSTILE_ALBUMS)  # the album line
    shown = captions + _texts(at)
    for raw in ("**bold", "](", "$x^2$", "<i>", ":smile:", ":red[", "www.example", "@example"):
        assert raw not in shown

    rank = next(m.rank for m in at.session_state["result"].matches if m.path.endswith("[link](http___x).jpg"))
    at.button(key=f"why_{rank}").click().run()
    assert not at.exception
    assert queries.plain(str(folder / "[link](http___x).jpg")) in "\n".join(c.value for c in at.caption)

    at.radio(key="source").set_value("Upload a photo").run()
    at.file_uploader(key="upload").set_value(("**evil** [x](http___y).jpg", b"not a photo", "image/jpeg")).run()
    assert at.error[0].value.startswith(queries.plain("**evil** [x](http___y).jpg cannot be used"))
    at.radio(key="source").set_value("Type a path").run()
    at.text_input(key="typed").input("$x^2$ <i>no</i>").run()
    assert at.error[0].value.startswith(queries.plain("'$x^2$ <i>no</i>'"))  # the typed text, quoted back
    shown = queries.plain(str(folder / "me@example.org.jpg")).replace("\\", "")  # as copied off the page
    assert queries.WORD_JOINER in shown
    at.text_input(key="typed").input(shown).run()
    assert not at.error and at.session_state["result"].matches[0].path.endswith("me@example.org.jpg")


def test_the_sidebar_filters_search_only_the_photos_that_pass(indexed, gallery, monkeypatch):
    at = _pick(_app(indexed, monkeypatch), "pic3.png")
    assert len(at.session_state["result"].matches) == 8
    at = at.text_input(key="filter_in").set_value(str(gallery / "sub")).run()
    assert not at.exception and "Top 1" in _texts(at)
    assert [m.path for m in at.session_state["result"].matches] == [str(gallery / "sub" / "pic7.png")]
    at = at.text_input(key="filter_in").set_value("").run()
    at = at.number_input(key="filter_min_score").set_value(0.999).run()
    assert [m.path for m in at.session_state["result"].matches] == [str(gallery / "pic3.png")]  # itself, score 1
    at = at.text_input(key="filter_in").set_value(str(gallery / "nowhere")).run()
    assert not at.exception and "no such folder" in _texts(at)
