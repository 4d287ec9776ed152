"""The classifier's one atomic writer (rnn_fast.nsynth.atomic): contents, flushed to the disk before the rename,
a unique temporary file per writer, nothing left behind and the old file kept when a write fails."""
import json
import os
import threading

import numpy as np
import pytest

from rnn_fast.nsynth import atomic
from rnn_fast.nsynth.atomic import atomic_write, move_into_place, write_json


def test_write_json_writes_the_value_and_leaves_only_the_file(tmp_path):
    write_json(tmp_path / "value.json", {"b": [1, 2.5, None], "a": "x"})
    assert (tmp_path / "value.json").read_text() == json.dumps({"b": [1, 2.5, None], "a": "x"}, indent=2) + "\n"
    write_json(tmp_path / "compact.json", [1, {"k": 2}], indent=None)
    assert (tmp_path / "compact.json").read_text() == '[1, {"k": 2}]\n'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["compact.json", "value.json"]


def test_binary_and_text_writes_replace_the_target(tmp_path):
    target = tmp_path / "array.npy"
    target.write_bytes(b"old")
    with atomic_write(target) as handle:
        np.save(handle, np.arange(5))
    np.testing.assert_array_equal(np.load(target), np.arange(5))
    with atomic_write(tmp_path / "note.txt", text=True) as handle:
        handle.write("ünïcode\n")
    assert (tmp_path / "note.txt").read_text() == "ünïcode\n"


def test_the_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda source, target: (events.append(("replace", str(source))),
                                                               replace(source, target)))
    with atomic_write(tmp_path / "file.bin") as handle:
        handle.write(b"data")
        temporary = handle.name
    assert events == [("fsync", temporary), ("replace", temporary)]


@pytest.mark.parametrize("failure", ["in-the-block", "at-the-rename"])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path, monkeypatch, failure):
    target = tmp_path / "metrics.json"
    write_json(target, {"epoch": 1})
    def full_disk(*args):
        raise OSError("disk full")

    if failure == "at-the-rename":
        monkeypatch.setattr(atomic, "move_into_place", full_disk)
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(target, text=True) as handle:
            handle.write('{"epoch": ')
            if failure == "in-the-block":
                full_disk()
            handle.write("2}")
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


def test_concurrent_writers_of_one_target_use_their_own_temporary_files(tmp_path):
    """Four threads write the same file at once: each has its own temporary file in the target's folder, and the
    target ends as one writer's complete contents."""
    target = tmp_path / "manifest.json"
    writers = 4
    inside = threading.Barrier(writers)
    temporaries = []

    def write(index: int) -> None:
        with atomic_write(target, text=True) as handle:
            temporaries.append(handle.name)
            handle.write(json.dumps({"writer": index, "payload": [index] * 10_000}))
            inside.wait(timeout=30)  # every writer has its temporary file open at this point

    threads = [threading.Thread(target=write, args=(index,)) for index in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(temporaries)) == writers
    assert all(os.path.dirname(name) == str(tmp_path) for name in temporaries)
    written = json.loads(target.read_text())
    assert written["payload"] == [written["writer"]] * 10_000
    assert [path.name for path in tmp_path.iterdir()] == ["manifest.json"]


def test_move_into_place_renames_a_finished_file(tmp_path):
    finished = tmp_path / "work" / "audio.npy"
    finished.parent.mkdir()
    np.save(finished, np.ones(3))
    move_into_place(finished, tmp_path / "train.audio.npy")
    assert not finished.exists()
    np.testing.assert_array_equal(np.load(tmp_path / "train.audio.npy"), np.ones(3))
