"""`famsearch api` and `famsearch api-key`: every route through FastAPI's TestClient against the CLI's JSON,
the keys' life cycle, and one served process called with a real HTTP client."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.service import MAX_UPLOAD_BYTES, create_app
from retrieval.config import ENV_PREFIX, Settings
from tests.conftest import TOY_INDEX, draw_picture, run_cli, run_json

ROUTES = [
    ("post", "/search"),
    ("post", "/explain"),
    ("get", "/images/1"),
    ("get", "/images/1/thumbnail"),
    ("get", "/status"),
]


def make_key(capsys, home: Path, name: str = "script") -> str:
    code, out, err = run_cli(capsys, "api-key", "create", "--name", name, "--home", home)
    assert code == 0, err
    return out.strip()


@pytest.fixture
def key(capsys, indexed: Path) -> str:
    return make_key(capsys, indexed)


@pytest.fixture
def client(indexed: Path):
    with TestClient(create_app(Settings(home=indexed), device="cpu")) as client:
        yield client


def auth(key: str) -> dict:
    return {"x-api-key": key}


def upload(path: Path, field: str = "file") -> dict:
    return {field: (path.name, path.read_bytes())}


def decoded_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG"
    return image


def test_health_needs_no_key_and_the_openapi_page_lists_every_route(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {route for _, route in ROUTES} - set(paths) == {"/images/1", "/images/1/thumbnail"}
    assert {"/health", "/images/{image_id}", "/images/{image_id}/thumbnail"} <= set(paths)


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_every_other_route_refuses_a_request_without_a_valid_key(client, key, method, route):
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
        response = client.request(method, route, headers=headers)
        assert response.status_code == 401, headers
        assert "famsearch api-key create" in response.json()["detail"]


def test_a_key_works_as_x_api_key_and_as_a_bearer_token(client, key):
    assert client.get("/status", headers={"x-api-key": key}).status_code == 200
    assert client.get("/status", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_status_is_what_info_json_prints(capsys, client, key, indexed):
    _, info = run_json(capsys, "info", "--home", indexed, "--failures")
    assert client.get("/status", headers=auth(key), params={"failures": True}).json() == info
    assert "failures" not in client.get("/status", headers=auth(key)).json()


def test_search_by_upload_and_by_image_id_give_the_cli_top_1(capsys, client, key, indexed, gallery):
    query = gallery / "pic3.png"
    _, expected = run_json(capsys, "search", query, "--home", indexed, "-k", "3", "--device", "cpu")
    by_upload = client.post("/search", headers=auth(key), files=upload(query), data={"k": "3"}).json()
    image_id = expected["results"][0]["image_id"]  # pic3 itself: it finds itself first
    assert expected["results"][0]["path"] == str(query)
    by_id = client.post("/search", headers=auth(key), data={"image_id": str(image_id), "k": "3"}).json()
    for record in (by_upload, by_id):
        assert set(record) == set(expected)
        assert [r["image_id"] for r in record["results"]] == [r["image_id"] for r in expected["results"]]
        assert record["results"][0]["score"] == pytest.approx(expected["results"][0]["score"], abs=1e-5)
        assert (record["explainer"], record["map_shape"]) == (expected["explainer"], expected["map_shape"])
    assert by_upload["query"] == "pic3.png" and by_id["query"] == str(query)


def test_search_rows_carry_png_overlays_of_each_photo_and_no_map_files(client, key, gallery):
    record = client.post("/search", headers=auth(key), files=upload(gallery / "pic0.jpg"), data={"k": "2"}).json()
    for row in record["results"]:
        assert row["query_map"] is None and row["match_map"] is None
        assert decoded_png(row["query_overlay"]).size == (64, 64)  # drawn on the 64 px photo itself
        assert decoded_png(row["match_overlay"]).size == (64, 64)


def test_search_takes_its_fields_as_query_parameters_and_explainer_none_draws_nothing(client, key):
    response = client.post("/search", headers=auth(key), params={"image_id": 1, "k": 2, "explainer": "none"})
    record = response.json()
    assert response.status_code == 200 and len(record["results"]) == 2 and record["map_shape"] is None
    assert all(row["query_overlay"] is None and row["match_overlay"] is None for row in record["results"])


def test_search_with_a_box_echoes_it_as_the_cli_does(capsys, client, key, indexed, gallery):
    query = gallery / "pic1.png"
    _, expected = run_json(capsys, "search", query, "--home", indexed, "-k", "3", "--box", "0,0,40,40")
    record = client.post("/search", headers=auth(key), files=upload(query), data={"k": "3", "box": "0,0,40,40"}).json()
    assert record["box"] == expected["box"] == [0, 0, 40, 40]
    assert [r["image_id"] for r in record["results"]] == [r["image_id"] for r in expected["results"]]


@pytest.mark.parametrize(
    ("with_file", "data", "message"),
    [
        (False, {}, "either a photo"),
        (True, {"image_id": "1"}, "either a photo"),
        (False, {"image_id": "1", "box": "1,2,3"}, "a box is"),
        (True, {"box": "500,500,600,600"}, "lies outside"),
        (True, {"explainer": "magic"}, "unknown explainer"),
    ],
)
def test_bad_search_arguments_are_422_with_one_line(client, key, gallery, with_file, data, message):
    files = upload(gallery / "pic1.png") if with_file else None
    response = client.post("/search", headers=auth(key), files=files, data=data)
    assert response.status_code == 422 and message in response.json()["detail"]
    assert "\n" not in response.json()["detail"]


@pytest.mark.parametrize("k", ["0", "101", "ten"])
def test_k_out_of_1_to_100_is_422(client, key, k):
    assert client.post("/search", headers=auth(key), data={"image_id": "1", "k": k}).status_code == 422
    assert client.post("/search", headers=auth(key), params={"image_id": 1, "k": k}).status_code == 422


def test_an_upload_over_the_limit_is_413(client, key):
    response = client.post("/search", headers=auth(key), files={"file": ("big.jpg", b"\xff" * (MAX_UPLOAD_BYTES + 1))})
    assert response.status_code == 413 and "20 MB" in response.json()["detail"]


def test_a_body_too_large_for_any_route_is_refused_unread(client, key):
    headers = {**auth(key), "content-length": str(3 * MAX_UPLOAD_BYTES), "content-type": "multipart/form-data"}
    assert client.post("/explain", headers=headers, content=b"").status_code == 413


def test_a_file_that_is_not_a_photo_is_422_naming_it(client, key):
    response = client.post("/search", headers=auth(key), files={"file": ("notes.txt", b"not a photo at all")})
    assert response.status_code == 422
    assert response.json()["detail"] == "notes.txt: not a readable image (not an image (format not recognised))"


def test_a_photo_over_the_megapixel_cap_is_422(client, key, monkeypatch):
    import indexer.service

    monkeypatch.setattr(indexer.service, "MAX_UPLOAD_MEGAPIXELS", 0.001)  # 1,000 pixels; the photo has 4,096
    buffer = io.BytesIO()
    draw_picture(0).save(buffer, format="PNG")
    response = client.post("/search", headers=auth(key), files={"file": ("p.png", buffer.getvalue())})
    assert response.status_code == 422 and "megapixel cap" in response.json()["detail"]


def test_explain_mirrors_the_cli_with_overlays_for_its_maps(capsys, client, key, indexed, gallery, tmp_path):
    query, match = gallery / "pic0.jpg", gallery / "pic2.jpg"
    argv = ("explain", query, match, "--home", indexed, "--explain", "fam-exact", "--out", tmp_path / "out")
    _, expected = run_json(capsys, *argv)
    response = client.post(
        "/explain",
        headers=auth(key),
        files={**upload(query, "query"), **upload(match, "match")},
        data={"explainer": "fam-exact"},
    )
    record = response.json()
    assert record["score"] == pytest.approx(expected["score"], abs=1e-5)
    assert record["offset"] == pytest.approx(expected["offset"], abs=1e-5)
    assert (record["explainer"], record["map_shape"]) == (expected["explainer"], expected["map_shape"])
    assert decoded_png(record["query_overlay"]).size == decoded_png(record["match_overlay"]).size == (64, 64)


def test_explain_needs_both_photos(client, key, gallery):
    response = client.post("/explain", headers=auth(key), files=upload(gallery / "pic0.jpg", "query"))
    assert response.status_code == 422


def test_images_serves_only_indexed_photos_and_thumbnails_fit_256_px(capsys, indexed, gallery):
    Image.new("RGB", (600, 400), (10, 120, 200)).save(gallery / "big.png")
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    code, _, err = run_cli(capsys, "index", gallery, "--home", indexed, *TOY_INDEX)
    assert code == 1, err  # partial: broken.jpg failed
    with sqlite3.connect(indexed / "famsearch.db") as db:
        ids = {Path(path).name: i for i, path in db.execute("SELECT id, path FROM images")}
    key = make_key(capsys, indexed)
    with TestClient(create_app(Settings(home=indexed), device="cpu")) as client:
        response = client.get(f"/images/{ids['big.png']}", headers=auth(key))
        assert response.status_code == 200 and response.content == (gallery / "big.png").read_bytes()
        thumb = client.get(f"/images/{ids['big.png']}/thumbnail", headers=auth(key))
        assert thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (256, 171)  # 600x400 within 256: aspect kept
        for missing in (ids["broken.jpg"], max(ids.values()) + 1):  # failed to index; never indexed
            for route in (f"/images/{missing}", f"/images/{missing}/thumbnail"):
                assert client.get(route, headers=auth(key)).status_code == 404
        (gallery / "big.png").unlink()  # indexed, but gone from disk since
        assert client.get(f"/images/{ids['big.png']}", headers=auth(key)).status_code == 404
        assert client.post("/search", headers=auth(key), data={"image_id": ids["broken.jpg"]}).status_code == 404


def test_a_re_index_is_served_without_a_restart(capsys, client, key, indexed, gallery):
    assert client.post("/search", headers=auth(key), data={"image_id": "1"}).status_code == 200  # engine loaded
    draw_picture(99).save(gallery / "new.png")
    code, _, err = run_cli(capsys, "index", gallery, "--home", indexed, *TOY_INDEX)
    assert code == 0, err
    record = client.post("/search", headers=auth(key), files=upload(gallery / "new.png"), data={"k": "1"}).json()
    assert record["results"][0]["path"] == str(gallery / "new.png")  # only in the new generation's index


def test_a_home_with_nothing_indexed_is_503_saying_how_to_index(capsys, home, gallery):
    key = make_key(capsys, home)  # keys can be made before the first index
    with TestClient(create_app(Settings(home=home), device="cpu")) as client:
        response = client.post("/search", headers=auth(key), files=upload(gallery / "pic0.jpg"))
    assert response.status_code == 503 and "famsearch index" in response.json()["detail"]


def test_api_key_create_prints_the_key_once_and_only_its_hash_is_stored(capsys, indexed):
    key = make_key(capsys, indexed, "first")
    _, created = run_json(capsys, "api-key", "create", "--name", "second", "--home", indexed)
    assert set(created) == {"name", "key"} and created["name"] == "second" and created["key"] != key
    _, listed = run_json(capsys, "api-key", "list", "--home", indexed)
    assert [row["name"] for row in listed["keys"]] == ["first", "second"]
    assert all(set(row) == {"name", "created", "revoked"} and row["revoked"] is None for row in listed["keys"])
    code, out, _ = run_cli(capsys, "api-key", "list", "--home", indexed)
    assert code == 0 and "first" in out and key not in out and created["key"] not in out
    with sqlite3.connect(indexed / "famsearch.db") as db:
        stored = json.dumps(db.execute("SELECT * FROM api_keys").fetchall())
    assert key not in stored and created["key"] not in stored


def test_a_revoked_key_is_refused_and_listed_as_revoked(capsys, client, key, indexed):
    assert client.get("/status", headers=auth(key)).status_code == 200
    code, _, err = run_cli(capsys, "api-key", "revoke", "--name", "script", "--home", indexed)
    assert code == 0, err
    assert client.get("/status", headers=auth(key)).status_code == 401
    assert client.get("/status", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    _, listed = run_json(capsys, "api-key", "list", "--home", indexed)
    assert listed["keys"][0]["revoked"] is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("create", "--name", "script"), "exists"),
        (("revoke", "--name", "nobody"), "no API key is named 'nobody'"),
    ],
)
def test_api_key_mistakes_are_one_line_usage_errors(capsys, key, indexed, argv, message):
    code, out, err = run_cli(capsys, "api-key", *argv, "--home", indexed)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_revoking_twice_is_a_usage_error(capsys, key, indexed):
    assert run_cli(capsys, "api-key", "revoke", "--name", "script", "--home", indexed)[0] == 0
    code, _, err = run_cli(capsys, "api-key", "revoke", "--name", "script", "--home", indexed)
    assert code == 2 and "revoked already" in err


def _multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    """One file as a multipart/form-data body, and its content type (what browsers and requests send)."""
    boundary = "famsearch-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
    body = (
        (head + "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_served_api_answers_a_real_http_client_and_frees_its_port(capsys, key, indexed, gallery, tmp_path):
    from ui.serve import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    command = [sys.executable, "-m", "indexer.cli", "api", "--home", str(indexed), "--port", str(port)]
    with open(tmp_path / "api.log", "wb") as log:
        process = subprocess.Popen([*command, "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    assert json.load(response) == {"status": "ok"}
                    break
            except OSError:
                assert process.poll() is None, (tmp_path / "api.log").read_text()
                assert time.monotonic() < deadline, "famsearch api did not come up"
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url + "/search?image_id=1", method="POST"), timeout=10)
        assert refused.value.code == 401
        body, content_type = _multipart("file", "pic3.png", (gallery / "pic3.png").read_bytes())
        request = urllib.request.Request(
            url + "/search?k=2", data=body, headers={"Content-Type": content_type, "x-api-key": key}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            record = json.load(response)
        assert record["results"][0]["path"] == str(gallery / "pic3.png") and len(record["results"]) == 2
    finally:
        process.terminate()
        process.wait(timeout=20)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it, so the exit status says what stopped it
    assert process.returncode in (0, -signal.SIGTERM), (tmp_path / "api.log").read_text()
    assert not _port_is_open(port)
