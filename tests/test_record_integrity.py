"""A run directory holds one training of one recipe, or it is left out: the report warns about it by
path and a sweep does not take it for a completed run (``ablate.records.record_problems``)."""
import json

import yaml

from ablate.records import config_key, read_config
from ablate.report import load_runs
from ablate.sweep import find_completed


def _record(root, name, seed):
    run = root / name
    run.mkdir(parents=True)
    config = {"step": {"id": "step4", "ref": {"time_s": 79.0, "timing": "with_eval"}}, "arch": {"name": "resnet9"},
              "seed": seed, "scale": {"name": "cpu"}, "target_acc": 94.0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [dict(epoch=i + 1, test_acc=a, train_seconds=5.0 * (i + 1), eval_seconds=0.5 * (i + 1))
            for i, a in enumerate((90.0, 94.1))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps(dict(
        status="completed", step="step4", arch="resnet9", seed=seed, scale="cpu", device="cpu", precision_used="fp32",
        torch_version="2.x", epochs=2, train_seconds=10.0, eval_seconds=1.0, test_acc=94.1, config_key=config_key(config))))
    return run


def test_the_report_leaves_out_records_of_two_recipes_or_two_trainings(tmp_path):
    """One directory holds a tta=off config with the tta=on recipe's summary; another has metrics of
    two trainings interleaved. Both are warned about by path and left out; a sweep does not take
    them for completed either."""
    runs = tmp_path / "runs"
    good, mixed, twice = (_record(runs, name, seed) for seed, name in enumerate(("good", "mixed", "twice")))
    summary = json.loads((mixed / "summary.json").read_text())
    other = config_key(dict(read_config(mixed), tta={"flip": True}))  # the other recipe's results
    (mixed / "summary.json").write_text(json.dumps(dict(summary, config_key=other)))
    rows = (twice / "metrics.jsonl").read_text().splitlines()
    (twice / "metrics.jsonl").write_text("\n".join([rows[0], rows[0], rows[1], rows[1]]) + "\n")
    table, _, problems = load_runs(runs)
    assert list(table.run) == ["good"]
    assert [p.split(":")[0] for p in problems] == [str(mixed / "summary.json"), str(twice / "metrics.jsonl")]
    assert "two recipes shared this directory" in problems[0] and "epochs [1, 1, 2, 2]" in problems[1]
    assert find_completed(config_key(read_config(mixed)), runs) is None
    assert find_completed(config_key(read_config(twice)), runs) is None
    assert find_completed(config_key(read_config(good)), runs) == good
