"""Hostile files and faults (issue 17): no hang, no blow-up, no traceback, self-repair.

Each test here failed before its fix; bench/probe_hostile.py runs the same probes end to end as a person would.
"""

from __future__ import annotations

import pickle

import pytest

from tests.conftest import TOY_INDEX, run_cli


class _RunsCode:  # a pickle that would run a shell command when unpickled by plain pickle.load
    def __reduce__(self):
        return (print, ("unpickled: code ran",))


@pytest.fixture
def evil_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsCode()))
    return path


def _one_line_usage_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flag", ["--head", "--weights", "--pooling"])
def test_a_malicious_pickle_as_a_model_file_is_refused_in_one_line(capsys, gallery, home, evil_pickle, flag):
    value = f"attn:{evil_pickle}" if flag == "--pooling" else str(evil_pickle)
    argv = ["index", gallery, "--home", home, *TOY_INDEX, flag, value]
    if flag == "--weights":  # the toy net takes no weights file; resnet50 reads it
        argv[argv.index("toy")] = "resnet50"
    code, out, err = run_cli(capsys, *argv)
    _one_line_usage_error(code, err)
    assert "unpickled" not in out + err and str(evil_pickle) in err


def test_a_home_that_is_a_file_is_a_usage_error(capsys, gallery, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    for command in (["index", gallery, *TOY_INDEX], ["info"], ["search", gallery / "pic0.jpg"]):
        code, _, err = run_cli(capsys, *command, "--home", not_a_folder)
        _one_line_usage_error(code, err)
        assert "not a folder" in err


def test_a_database_flag_that_is_no_url_is_a_usage_error(capsys, indexed):
    code, _, err = run_cli(capsys, "info", "--home", indexed, "--db", "notaurl")
    _one_line_usage_error(code, err)
    assert "--db" in err


@pytest.mark.parametrize("command", ["search", "explain"])
def test_an_output_folder_that_is_a_file_is_a_usage_error(capsys, indexed, gallery, tmp_path, command):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    photo = gallery / "pic0.jpg"
    flag = "--maps-dir" if command == "search" else "--out"
    images = [photo] if command == "search" else [photo, photo]
    code, _, err = run_cli(capsys, command, *images, "--home", indexed, flag, a_file)
    _one_line_usage_error(code, err)
    assert flag in err
