"""vitscope.io.atomic: writes land whole or not at all."""
import csv
import json
import math
import os
import threading
import time

import pytest

from vitscope.io.atomic import atomic_link, atomic_write, atomic_write_json, json_safe, write_csv
from vitscope.io.lock import RunLockedError, run_lock


def test_failure_mid_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1})

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": 2, "b": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_json_is_strict_and_json_safe_drops_non_finite(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"v": math.nan})
    assert not (tmp_path / "x.json").exists()
    atomic_write_json(tmp_path / "x.json", json_safe({"v": [1.0, math.inf, -math.nan], "w": (2, "s")}))
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": [1.0, None, None], "w": [2, "s"]}


def test_write_csv_flattens_lists_and_unions_columns(tmp_path):
    path = write_csv(tmp_path / "sub" / "t.csv", [{"layer": "a", "heads": [1, 2]}, {"layer": "b", "extra": 3}])
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"layer": "a", "heads_0": "1", "heads_1": "2", "extra": ""},
                    {"layer": "b", "heads_0": "", "heads_1": "", "extra": "3"}]


def test_atomic_link_publishes_a_file_in_one_rename(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"weights")
    (tmp_path / "top.bin").write_bytes(b"old")
    atomic_link(src, tmp_path / "top.bin")
    assert (tmp_path / "top.bin").read_bytes() == b"weights" and os.path.samefile(src, tmp_path / "top.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "top.bin"]  # no temp file left


def test_run_lock_refuses_or_waits_and_removes_its_file(tmp_path):
    """One flock per open file: a second locker (a thread here, with its own open file) is refused naming the
    holder's pid, or waits until the holder is done; ``remove`` leaves no lock file, and a waiter that had
    opened the removed file locks the file the path names afterwards."""
    lock = tmp_path / "run.lock"
    with run_lock(lock, tmp_path / "run"):
        with pytest.raises(RunLockedError, match=f"is being trained by process {os.getpid()}"):
            with run_lock(lock, tmp_path / "run"):
                pass
    assert lock.read_text() == f"{os.getpid()}\n"  # the training lock stays (its file is never removed)
    order = []
    held = threading.Event()

    def waiter():
        held.wait()
        with run_lock(lock, wait=True, poll_s=0.01, remove=True):
            order.append("waiter")

    t = threading.Thread(target=waiter)
    t.start()
    with run_lock(lock, wait=True, remove=True):
        held.set()
        time.sleep(0.2)
        order.append("first")
    t.join(timeout=10)
    assert order == ["first", "waiter"] and not lock.exists()
