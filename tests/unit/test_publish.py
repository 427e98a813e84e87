"""Atomic publishing: versions appear whole or not at all; numbering never collides."""

from __future__ import annotations

import threading

import pytest

from headmaster.errors import RepositoryError
from headmaster.repository.publish import (
    prune_versions,
    publish_version,
    published_versions,
    replace_version,
    repository_lock,
    versions,
    write_file,
)


def writer(text):
    def build(folder, version):
        (folder / "model.txt").write_text(f"{text} v{version}")

    return build


def test_versions_count_up_from_one(tmp_path):
    assert [publish_version(tmp_path, "m", writer("x")) for _ in range(3)] == [1, 2, 3]
    assert versions(tmp_path / "m") == [1, 2, 3]
    assert (tmp_path / "m" / "2" / "model.txt").read_text() == "x v2"


def test_a_failed_build_publishes_nothing(tmp_path):
    publish_version(tmp_path, "m", writer("x"))

    def broken(folder, version):
        (folder / "model.txt").write_text("half")
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        publish_version(tmp_path, "m", broken)
    assert versions(tmp_path / "m") == [1]
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]  # no staging left behind


def test_existing_versions_are_never_overwritten(tmp_path):
    publish_version(tmp_path, "m", writer("x"))
    with pytest.raises(RepositoryError, match="already exists; versions are never overwritten"):
        publish_version(tmp_path, "m", writer("y"), version=1)


def test_concurrent_writers_under_the_lock_take_distinct_versions(tmp_path):
    taken = []

    def work():
        with repository_lock(tmp_path):
            taken.append(publish_version(tmp_path, "m", writer("x")))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(1, 9))


def test_replace_version_swaps_the_folder_whole(tmp_path):
    publish_version(tmp_path, "m", writer("old"))
    replace_version(tmp_path, "m", 1, writer("new"))
    assert (tmp_path / "m" / "1" / "model.txt").read_text() == "new v1"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    for _ in range(6):
        publish_version(tmp_path, "m", writer("x"))
    assert prune_versions(tmp_path, "m", keep=3, protect={2}) == [1, 3]
    assert versions(tmp_path / "m") == [2, 4, 5, 6]


def test_write_file_replaces_and_leaves_identical_files_untouched(tmp_path):
    path = tmp_path / "config.pbtxt"
    write_file(path, "a")
    first = path.stat().st_mtime_ns
    write_file(path, "a")
    assert path.stat().st_mtime_ns == first
    write_file(path, "b")
    assert path.read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["config.pbtxt"]


def test_the_highest_version_a_command_wrote_is_recorded_per_model(tmp_path):
    assert published_versions(tmp_path) == {}
    for _ in range(3):
        publish_version(tmp_path, "m", writer("x"))
    publish_version(tmp_path, "n", writer("x"))
    assert published_versions(tmp_path) == {"m": 3, "n": 1}
    (tmp_path / ".headmaster" / "published.json").write_text("{not json")
    assert published_versions(tmp_path) == {}  # unreadable: the watcher falls back to the live versions
