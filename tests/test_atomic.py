"""vitscope.io.atomic: writes land whole or not at all."""
import csv
import json
import math

import pytest

from vitscope.io.atomic import atomic_write, atomic_write_json, json_safe, write_csv


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
