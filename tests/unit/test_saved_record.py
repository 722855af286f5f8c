"""Resuming a benchmark: the saved record is read back only when it was run with the same settings."""

import json

import pytest

from distillery.report.summary import saved_record


def test_a_matching_record_is_read_and_a_missing_one_is_none(tmp_path):
    path = tmp_path / "bench.json"
    assert saved_record(path, {"seeds": [0, 1]}) is None
    path.write_text(json.dumps({"seeds": [0, 1], "steps": 600, "per_seed": {}}))
    assert saved_record(path, {"seeds": [0, 1], "steps": 600})["steps"] == 600


def test_other_settings_are_refused_naming_both_values(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"seeds": [0, 1], "steps": 600}))
    with pytest.raises(SystemExit, match=r"'steps': \(600, 300\)"):
        saved_record(path, {"seeds": [0, 1], "steps": 300})
