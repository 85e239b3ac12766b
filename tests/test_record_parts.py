"""The typed record: its parts, old records read into them, and hooks written against dict records."""

from __future__ import annotations

import json
import warnings

import pytest

from harness import Efficiency, Environment, ErrorInfo, Job, Record, RunInfo, WeightUse
from harness.results.records import DamagedRecordError, load_record, write_record
from harness.results.tables import tidy_table
from record_helpers import sample_record, write_sample_record


def test_a_version_1_record_reads_into_typed_parts_and_writes_back_unchanged(tmp_path):
    data = sample_record("padim", 3, 0.9, fps=42.0)
    record = Record.from_dict(data)
    assert isinstance(record.job, Job) and record.job.method == "padim" and record.job.seed == 3
    assert isinstance(record.efficiency, Efficiency) and record.efficiency.fps == 42.0
    assert record.efficiency.params_by_network == {"net": 2_500_000}
    assert isinstance(record.run, RunInfo) and record.run.shows_result and record.is_result
    assert record.error is None and record.schema == 2
    again = record.to_dict()
    assert {k: again[k] for k in data if k != "schema"} == {k: v for k, v in data.items() if k != "schema"}


def test_keys_a_part_does_not_declare_survive_a_round_trip(tmp_path):
    data = sample_record("padim", 0, 0.9)
    data["efficiency"]["joules_per_image"] = 0.5
    data["run"] = {"dev_run": False, "weights": "pretrained", "ray": {"attempts": 2}}
    data["environment"] = {"torch": "2.9", "git": "abc"}  # harness 0.1 called the revision "git"
    path = tmp_path / "r.json"
    write_record(path, data)
    record = load_record(path)
    assert record.efficiency.extra == {"joules_per_image": 0.5}
    assert record.run.extra["ray"] == {"attempts": 2} and record.environment.extra == {"git": "abc"}
    write_record(path, record)
    assert json.loads(path.read_text())["efficiency"]["joules_per_image"] == 0.5
    assert json.loads(path.read_text())["run"]["ray"] == {"attempts": 2}


def test_a_field_set_to_none_is_written_as_null_and_an_unset_one_is_left_out():
    efficiency = Efficiency(fps=10.0)
    assert efficiency.to_dict() == {"fps": 10.0}
    efficiency.update(limit_share=None)  # the device's limit is unknown: a fact worth writing
    assert efficiency.to_dict() == {"fps": 10.0, "limit_share": None} and "limit_share" in efficiency
    del efficiency["limit_share"]
    assert "limit_share" not in efficiency and efficiency.get("limit_share", "absent") == "absent"
    loaded = Efficiency.from_dict({"fps": None, "cudnn": None})
    assert loaded.to_dict() == {"fps": None, "cudnn": None}


def test_a_part_is_also_the_mapping_of_its_json_form():
    run = RunInfo(executor="inprocess")
    run["resumed_from"] = {"all": {"step": 3}}
    run.setdefault("notes", []).append("a note")
    assert run.resumed_from == {"all": {"step": 3}} and run.notes == ["a note"]
    assert run == {"dev_run": False, "weights": "pretrained", "executor": "inprocess",
                   "resumed_from": {"all": {"step": 3}}, "notes": ["a note"]}
    assert dict(WeightUse(key="sd", sha256="0" * 64)) == {"key": "sd", "sha256": "0" * 64}


def test_plain_dicts_given_to_the_constructor_become_parts():
    record = Record(job={"method": "m", "dataset": "d", "protocol": "multiclass", "shots": None, "seed": 0,
                         "profile": "tiny", "overrides": {"k": 1}},
                    error={"phase": "fit", "type": "RuntimeError", "message": "boom"},
                    run={"dev_run": True}, environment={"torch": "2.9"}, weights=[{"key": "a"}])
    assert record.job.overrides == (("k", 1),) and isinstance(record.error, ErrorInfo)
    assert record.error.phase == "fit" and record.run.dev_run and not record.run.shows_result
    assert isinstance(record.environment, Environment) and record.environment.torch == "2.9"
    assert record.weights[0].key == "a"


def test_a_record_whose_job_is_garbled_is_damaged_and_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"job": {"dataset": "d"}, "status": "ok"}))
    with pytest.raises(DamagedRecordError, match="bad.json"):
        load_record(path)


def test_a_hook_written_against_dict_records_keeps_working_and_is_told_what_to_change():
    record = Record.from_dict(sample_record("padim", 0, 0.9))

    def old_hook(job, record):  # as a harness 0.3 plugin wrote it
        return record["status"], record.get("run")["dev_run"], json.dumps(dict(record))

    with pytest.warns(DeprecationWarning, match=r"record\.status"):
        status, dev_run, text = old_hook(None, record)
    assert status == "ok" and dev_run is False and json.loads(text)["job"]["method"] == "padim"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert record.status == "ok" and record.efficiency["fps"] == 100.0  # the typed way warns nothing


def test_old_records_still_show_on_the_leaderboard(tmp_path):
    for seed, base in ((0, 0.9), (1, 0.8)):
        write_sample_record(tmp_path, sample_record("padim", seed, base))
    table = tidy_table(tmp_path)
    row = table[(table["category"] == "mean") & (table["metric"] == "image_auroc")].iloc[0]
    assert row["n_seeds"] == 2 and row["mean"] == pytest.approx(84.0)
    fps = table[(table["metric"] == "fps")].iloc[0]
    assert fps["mean"] == pytest.approx(100.0)
