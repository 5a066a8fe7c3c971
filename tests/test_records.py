import json

import pytest

from ablate.records import RecordExists, RunRecord, config_key, read_summary, write_atomic


def _config(seed=0):
    return {"step": {"id": "step4"}, "arch": {"name": "resnet9"}, "seed": seed, "scale": {"name": "smoke"},
            "precision": {"name": "fp32"}, "progress": True}


def test_record_lifecycle(tmp_path):
    rec = RunRecord(tmp_path, _config())
    assert read_summary(tmp_path)["status"] == "running"
    rec.epoch({"epoch": 1, "test_acc": 50.0})
    rec.epoch({"epoch": 2, "test_acc": 60.0})
    rec.finish("completed", test_acc=60.0)
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and summary["test_acc"] == 60.0
    assert summary["config_key"] == config_key(_config()) and "torch_version" in summary
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (tmp_path / "config.yaml").read_text().startswith("step:")


def test_config_key_ignores_where_the_data_cache_lives():
    """ABLATE_CACHE differs between machines and CI clones that compute the same run."""
    a, b = _config(), _config()
    a.setdefault("data", {})["cache_dir"] = "/home/me/.cache/ablate"
    b.setdefault("data", {})["cache_dir"] = "/tmp/ci/.cache/ablate"
    assert config_key(a) == config_key(b) and a["data"]["cache_dir"] == "/home/me/.cache/ablate"
    b["data"]["root"] = "/elsewhere"
    assert config_key(a) != config_key(b)


def test_config_key_ignores_progress_but_not_seed():
    a, b = _config(), _config()
    b["progress"] = False
    assert config_key(a) == config_key(b)
    assert config_key(a) != config_key(_config(seed=1))


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    write_atomic(tmp_path / "x.json", "{}")
    write_atomic(tmp_path / "x.json", '{"a": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert read_summary(tmp_path / "nowhere") is None


def test_a_completed_record_is_never_overwritten(tmp_path):
    RunRecord(tmp_path, _config()).finish("completed", test_acc=60.0)
    with pytest.raises(RecordExists, match="already holds a completed run"):
        RunRecord(tmp_path, _config(seed=1))
    assert read_summary(tmp_path)["test_acc"] == 60.0 and read_summary(tmp_path)["seed"] == 0
    failed = tmp_path / "failed"
    RunRecord(failed, _config()).finish("failed", error="x")
    RunRecord(failed, _config())  # an unfinished or failed run may be run again in place
    assert read_summary(failed)["status"] == "running"


def test_config_key_fills_fields_added_to_the_schema_later():
    from omegaconf import OmegaConf

    from ablate.config import Config

    full = OmegaConf.to_container(OmegaConf.structured(Config))
    older = OmegaConf.to_container(OmegaConf.structured(Config))
    del older["norm"]["frozen_scale"]  # a record written before this field existed
    assert config_key(older) == config_key(full)
    older["seed"] = 7
    assert config_key(older) != config_key(full)
