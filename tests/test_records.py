import json

import pytest
from omegaconf import OmegaConf

from ablate.compose import compose
from ablate.records import RecordExists, RunRecord, config_key, read_summary, recorded_keys, write_atomic


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


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_records_are_strict_json_and_readable_by_all(tmp_path):
    """NaN in an epoch row or a result is written as null (a bare NaN is not JSON), and every file a
    record writes is 0644 whatever the umask (mkstemp alone makes 0600)."""
    import os

    old = os.umask(0o077)
    try:
        rec = RunRecord(tmp_path, _config())
        rec.epoch({"epoch": 1, "train_loss": float("nan"), "test_loss": float("inf")})
        rec.finish("failed", test_loss=float("nan"), error="Diverged: x")
    finally:
        os.umask(old)
    assert _strict((tmp_path / "metrics.jsonl").read_text()) == {"epoch": 1, "train_loss": None, "test_loss": None}
    assert _strict((tmp_path / "summary.json").read_text())["test_loss"] is None
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_a_rerun_writes_a_metrics_file_of_its_own(tmp_path):
    """A writer still holding the old metrics file (an orphan of a killed sweep) cannot reach the new one."""
    RunRecord(tmp_path, _config()).epoch({"epoch": 1})
    old = open(tmp_path / "metrics.jsonl", "a")
    rec = RunRecord(tmp_path, _config())  # the run again, in place
    old.write('{"epoch": 7}\n')
    old.close()
    rec.epoch({"epoch": 1})
    rec.finish("completed")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_record_problems_name_two_recipes_or_two_trainings_in_one_directory(tmp_path):
    from ablate.records import record_problems

    config, other = _config(), dict(_config(), tta={"flip": True})
    summary = {"status": "completed", "config_key": config_key(other)}  # the other recipe's results
    [problem] = record_problems(tmp_path, summary, config, [{"epoch": 1}, {"epoch": 2}])
    assert problem.startswith(f"{tmp_path / 'summary.json'}: written for config key {config_key(other)}")
    summary["config_key"] = config_key(config)
    assert record_problems(tmp_path, summary, config, [{"epoch": 1}, {"epoch": 2}]) == []
    for epochs in ([6, 7, 8, 1, 2], [2, 1], [1, 1, 2], [2, 3]):
        [problem] = record_problems(tmp_path, summary, config, [{"epoch": e} for e in epochs])
        assert problem.startswith(f"{tmp_path / 'metrics.jsonl'}: epochs {epochs} are not 1..{len(epochs)}")


def test_committed_records_agree_with_their_configs():
    """Every committed record was written for its config, under the key rule of its time."""
    from ablate.records import read_config, read_metrics, record_problems
    from tests.conftest import REPO

    paths = sorted(REPO.glob("tests/data/*/*/summary.json")) + sorted(REPO.glob("experiments/*/runs/*/summary.json"))
    assert len(paths) >= 4
    for path in paths:
        run = path.parent
        assert record_problems(run, read_summary(run), read_config(run), read_metrics(run)[0]) == [], run


def test_committed_journey_records_keep_their_keys_after_the_batch_group_rename():
    """The journey's records were composed when the batch sizes were the group ``batch_size``; the
    group is ``batch`` now (so that ``batch_size=<n>`` is a value). The same recipe composed today has
    the key its record's config gives, so a sweep started again finds it completed, and its record is
    labelled as its step alone (no ``batch=`` or ``batch_size=`` change)."""
    import yaml

    from ablate.records import read_config, recipe_key
    from ablate.report.labels import recipe_changes
    from ablate.sweep import find_completed, formats_used
    from tests.conftest import REPO

    runs = REPO / "experiments" / "journey-cpu" / "runs"
    record = runs / "0_step8_resnet9_cpu_s0"
    if not (record / "summary.json").is_file():
        pytest.skip(f"{record} is not committed")
    config, summary = read_config(record), read_summary(record)
    choices = yaml.safe_load((record / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]
    assert choices["batch_size"] == "512" and "batch" not in choices  # written under the old group name
    # As it was composed (its overrides.yaml): fp16 on a CPU as fp32, the data root it read.
    overrides = ["+step=step8", "scale=cpu", "precision.cpu_half=fp32", f"data.root={config['data']['root']}"]
    composed = OmegaConf.to_container(compose(overrides), resolve=True)
    assert config_key(composed) == config_key(config) and recipe_key(composed) == recipe_key(config)
    assert summary["config_key"] in recorded_keys(config)  # the key it stored, under its time's rule
    on_a_cpu = formats_used(compose([*overrides, "device=cpu"]))  # the formats it ran in
    assert find_completed(config_key(composed), runs, on_a_cpu) == record
    assert recipe_changes("step8", config, choices) == []
