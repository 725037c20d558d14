"""The Duplicates page and "More like this" (grid, Why?, Duplicates), through Streamlit's AppTest."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.test_duplicates import index_copies
from tests.test_ui import _app, _pick, _texts
from ui import queries


@pytest.fixture
def copies(tmp_path) -> tuple[Path, Path]:
    return index_copies(tmp_path / "photos")


def _duplicates_page(at: AppTest, threshold: float) -> AppTest:
    at.radio(key="page").set_value("Duplicates").run()
    return at.slider(key="dup_threshold").set_value(threshold).run()


def _button_keys(at: AppTest, prefix: str) -> list[str]:
    return [b.key for b in at.button if b.key and b.key.startswith(prefix)]


def test_the_duplicates_page_shows_each_group_keep_first_and_why_compares_a_copy_with_its_keep(copies, monkeypatch):
    home, folder = copies
    at = _duplicates_page(_app(home, monkeypatch), 0.99)
    assert not at.exception
    groups = at.session_state["dup_groups"]
    assert [len(g.images) for g in groups] == [3, 2]
    assert "2 groups** of 5 photos" in _texts(at)
    captions = [c for image in at.image for c in image.captions]
    names = [queries.plain(Path(g.path).name) for g in groups[0].images]  # captions escape Markdown
    assert captions[:3] == [
        f"keep · {names[0]}",
        *(f"{g.score:.3f} · {n}" for g, n in zip(groups[0].images[1:], names[1:])),
    ]
    assert names[0] == queries.plain("big.png")
    assert len(_button_keys(at, "dup_why_")) == 3  # one per photo that is not a keep
    assert len(_button_keys(at, "dup_more_")) == 5  # one per photo

    copy = next(image for image in groups[0].images if image.path.endswith("copy_q70.jpg"))
    at.button(key=f"dup_why_1_{copy.image_id}").click().run()
    assert not at.exception
    name, keep = queries.plain("photos/copy_q70.jpg"), queries.plain("photos/big.png")  # folder/name, escaped
    assert f"Why {name} is a near-duplicate of {keep} (the keep): score {copy.score:.4f}" in _texts(at)
    report = at.session_state["report"]
    assert report.score == pytest.approx(copy.score, abs=1e-4)  # the keep decoded as indexed: its stored vector
    assert report.first_map.shape == report.second_map.shape
    at.button(key="back").click().run()
    assert not at.exception and len(_button_keys(at, "dup_why_")) == 3

    at.slider(key="dup_threshold").set_value(1.0).run()
    assert not at.exception and "no near-duplicates at this threshold" in at.info[0].value


def test_lowering_the_threshold_joins_look_alike_pictures_into_the_groups(copies, monkeypatch):
    home, _ = copies
    at = _duplicates_page(_app(home, monkeypatch), 0.99)
    strict = sum(len(g.images) for g in at.session_state["dup_groups"])
    at.slider(key="dup_threshold").set_value(0.9).run()
    assert not at.exception and sum(len(g.images) for g in at.session_state["dup_groups"]) > strict


def test_more_like_this_in_the_grid_makes_that_match_the_query(indexed, monkeypatch):
    at = _pick(_app(indexed, monkeypatch), "pic3.png")
    second = at.session_state["result"].matches[1]
    at.button(key="more_2").click().run()
    assert not at.exception
    assert at.selectbox(key="pick").value == second.path and at.text_input(key="pick_filter").value == second.path
    first = at.session_state["result"].matches[0]
    assert first.path == second.path and first.score == pytest.approx(1.0, abs=1e-4)  # it finds itself first
    assert len(_button_keys(at, "why_")) == 8  # back on the grid


def test_more_like_this_in_the_why_view_makes_the_match_the_query(indexed, monkeypatch):
    at = _pick(_app(indexed, monkeypatch), "pic1.png")
    at.button(key="why_3").click().run()
    third = at.session_state["result"].matches[2]
    at.button(key="more_why").click().run()
    assert not at.exception
    assert at.session_state["result"].matches[0].path == third.path
    assert at.session_state["selected"] is None and len(_button_keys(at, "why_")) == 8


def test_more_like_this_on_the_duplicates_page_searches_with_that_photo(copies, monkeypatch):
    home, folder = copies
    at = _duplicates_page(_app(home, monkeypatch), 0.99)
    copy = next(i for g in at.session_state["dup_groups"] for i in g.images if i.path.endswith("pic4_again.jpg"))
    at.button(key=f"dup_more_{copy.image_id}").click().run()
    assert not at.exception and at.radio(key="page").value == "Search"
    assert at.session_state["result"].matches[0].path == copy.path == str(folder / "sub" / "pic4_again.jpg")


def test_more_like_this_after_framing_a_part_searches_the_whole_new_photo(gap_indexed, monkeypatch):
    at = _pick(_app(gap_indexed, monkeypatch), "pic2.jpg")
    at.slider(key="box_x").set_value((0, 50)).run()
    assert "(the framed part)" in _texts(at)
    at.button(key="more_1").click().run()
    assert not at.exception and at.slider(key="box_x").value == (0, 100) and "(the framed part)" not in _texts(at)
