"""Every command against the database `--db` names: SQLite in the home, and a real PostgreSQL server
(tests/postgres.py): index, info, search, albums, classify, api-key, the HTTP API and the UI."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from streamlit.testing.v1 import AppTest

from indexer.service import create_app
from tests.conftest import TOY_INDEX, draw_picture, run_cli, run_json

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")


def test_every_command_keeps_its_state_in_the_database_url(capsys, database, gallery, home, monkeypatch):
    code, summary = run_json(capsys, "index", gallery, "--home", home, *TOY_INDEX, "--labels-from", "folders")
    assert (
        code == 0
        and summary["added"] == 8
        and summary["labels"]["folders"]
        == {
            "labelled": 1,
            "albums": 1,
            "unknown": 0,
        }
    )
    assert (home / "famsearch.db").exists() == (database.url(home) is None)  # PostgreSQL: no SQLite file made

    _, info = run_json(capsys, "info", "--home", home, "--failures")
    assert (info["images"], info["vectors"], info["failures"]) == (8, 8, [])

    _, result = run_json(capsys, "search", gallery / "pic1.png", "--home", home, "-k", "3", "--explain", "none")
    assert result["results"][0]["path"] == str(gallery / "pic1.png")
    assert result["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)

    _, albums = run_json(capsys, "albums", "--home", home)
    assert albums["albums"] == [{"album": "sub", "images": 1}]
    _, decision = run_json(capsys, "classify", gallery / "sub" / "pic7.png", "--home", home, "--explain", "none")
    assert decision["winner"]["album"] == "sub" and decision["winner"]["score"] == pytest.approx(1.0, abs=1e-5)
    _, deleted = run_json(capsys, "albums", "--home", home, "--delete", "sub")
    assert deleted["deleted"] is True and deleted["albums"] == []

    code, key, err = run_cli(capsys, "api-key", "create", "--name", "script", "--home", home)
    assert code == 0, err
    with TestClient(create_app(database.settings(home), device="cpu")) as client:
        response = client.post("/search", params={"k": 2, "explainer": "none"}, data={"image_id": 1},
                               headers={"x-api-key": key.strip()})  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["image_id"] == 1
        assert run_cli(capsys, "api-key", "revoke", "--name", "script", "--home", home)[0] == 0
        assert client.get("/status", headers={"x-api-key": key.strip()}).status_code == 401

    monkeypatch.setenv("FAMSEARCH_HOME", str(home))  # what `famsearch ui --home H --db URL` gives the app
    if database.url(home):
        monkeypatch.setenv("FAMSEARCH_DB", database.url(home))
    else:
        monkeypatch.delenv("FAMSEARCH_DB", raising=False)
    at = AppTest.from_file(APP, default_timeout=120).run()
    path = next(p for p in at.selectbox(key="pick").options if p.endswith("pic3.png"))
    at = at.selectbox(key="pick").set_value(path).run()
    assert not at.exception
    assert at.session_state["result"].matches[0].path == str(gallery / "pic3.png")


def test_a_database_that_cannot_be_opened_is_one_line_on_stderr_without_the_password(capsys, tmp_path):
    url = f"postgresql+psycopg://famsearch:s3cret@/famsearch?host={tmp_path}"  # no server listens there
    draw_picture(0).save(tmp_path / "q.jpg")
    for argv in (("info",), ("search", tmp_path / "q.jpg"), ("albums",), ("api-key", "list")):
        code, out, err = run_cli(capsys, *argv, "--home", tmp_path / "home", "--db", url)
        assert code == 2 and out == "", err
        assert len(err.strip().splitlines()) == 1 and "cannot open the database" in err and "s3cret" not in err
