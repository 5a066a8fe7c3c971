"""Bad input at the command line: a non-zero exit, a message that names the value or file at fault,
and no traceback. One subprocess per case (a few seconds each); cases that one check reports
together share a run."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO


def _cli(*args, module="ablate.run", timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "ABLATE_DATA"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _fails_cleanly(out, *expected, code=None):
    assert out.returncode != 0 if code is None else out.returncode == code, (out.returncode, out.stderr[-2000:])
    for text in expected:
        assert text in out.stderr, (text, out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout


def _case_names():
    from tests.attack import bad_input_cases

    return [case.name for case in bad_input_cases()]


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    """Every bad-input case of the attack (tests/attack.py), each run as ``python -m ablate.run`` or
    ``ablate.report`` would, in forks of one process that imported everything once."""
    base = tmp_path_factory.mktemp("bad-input")
    env = {k: v for k, v in os.environ.items() if k != "ABLATE_DATA"}
    out = subprocess.run([sys.executable, "-m", "tests.attack", "bad-input", "--json", str(base)], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["name"]: r for r in json.loads((base / "results.json").read_text())}


@pytest.mark.parametrize("name", _case_names())
def test_bad_input_exits_2_naming_the_culprit_without_a_traceback(bad_input, name):
    """Unknown steps, networks, options and keys (``+``-appended ones too), wrong types, seeds out of
    range, Nesterov without momentum, devices that do not parse or are absent, failing interpolations,
    unparsable overrides, unwritable outputs, report arguments: exit 2, the culprit named, no
    traceback, nothing trained. A diverged run exits 1 (a failed run), recorded as failed."""
    from pathlib import Path

    r = bad_input[name]
    assert r["code"] == r["want"], (r["code"], r["output"][-2000:])
    assert "Traceback" not in r["output"], r["output"][-2000:]
    for text in r["expected"]:
        assert text in r["output"], (text, r["output"][-2000:])
    run = Path(r["tmp"]) / "run"
    if name == "diverged_run":
        summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert (summary["status"], summary["failure"]) == ("failed", "diverged")
    else:
        assert not (run / "summary.json").exists()
    message = [line for line in r["output"].splitlines() if line.startswith(("ablate:", "ablate report:"))]
    assert len(message) == 1 or name.startswith("sweep_"), r["output"][-2000:]  # one line says it all


def test_impossible_values_are_listed_together_before_training(tmp_path):
    out = _cli("+step=step8", "norm.splits=5", "schedule.lr=[0,-0.4,0]", "arch.width_mult=0",
               f"hydra.run.dir={tmp_path / 'run'}")
    _fails_cleanly(out, "norm.splits=5 does not divide batch_size=512", "has a negative learning rate",
                   "arch.width_mult=0.0 must be > 0", code=2)
    assert not (tmp_path / "run" / "summary.json").exists()


def _image(path, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (32, 32)).save(path)


def _tree(root):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for j in range(2):
                _image(root / split / cls / f"{j}.png")
    return root


def _corrupt(root):
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return bad, [f"cannot decode image {bad}"]


def _grey(root):
    bad = root / "test" / "cat" / "grey.png"
    _image(bad, mode="L")
    return bad, [f"image {bad} has mode L, expected RGB"]


def _empty(root):
    for child in root.rglob("*"):
        if child.is_file():
            child.unlink()
    for child in sorted(root.rglob("*"), reverse=True):
        child.rmdir()
    return root, [f"{root}: is empty"]


def _no_test(root):
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    return root, [f"data root {root} has no test/ folder"]


@pytest.mark.parametrize("spoil", [_corrupt, _grey, _empty, _no_test])  # missing: test_run.py
def test_bad_data_names_the_path(tmp_path, spoil):
    root = _tree(tmp_path / "data")
    _, expected = spoil(root)
    out = _cli("+step=step4", "scale=smoke", f"data.root={root}",
               "data.download=false", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}")
    _fails_cleanly(out, *expected, code=2)


@pytest.mark.parametrize("case", ["under_a_file", "read_only", "sweep_under_a_file"])
def test_unwritable_output_dir(tmp_path, case):
    blocker = tmp_path / "file"
    blocker.write_text("")
    if case == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target, key = locked / "run", "hydra.run.dir"
    else:
        target, key = blocker / "run", "hydra.sweep.dir" if case.startswith("sweep") else "hydra.run.dir"
    out = _cli(*(["-m"] if key == "hydra.sweep.dir" else []), "+step=step4", "scale=smoke", f"{key}={target}")
    _fails_cleanly(out, f"cannot write the output directory {target}", f"{key}=", code=2)


def test_report_warns_about_corrupt_records_names_them_and_goes_on(tmp_path):
    runs = tmp_path / "runs"
    good = runs / "good"
    good.mkdir(parents=True)
    (good / "config.yaml").write_text("step: {id: step4}\narch: {name: resnet9}\nseed: 0\n")
    (good / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 60.0, "train_seconds": 1.0}\n[1, 2]\n{"epo')
    (good / "summary.json").write_text(json.dumps(dict(status="completed", step="step4", arch="resnet9", seed=0,
                                                       scale="smoke", device="cpu", test_acc=60.0, epochs=1,
                                                       train_seconds=1.0, eval_seconds=0.5)))
    problems = {"torn": '{"status": "compl', "list": "[1, 2, 3]",
                "typed": json.dumps(dict(status="completed", step="step4", test_acc="high")),
                "shape": json.dumps(dict(status="completed", step="step4"))}
    for name, text in problems.items():
        (runs / name).mkdir()
        (runs / name / "summary.json").write_text(text)
    (runs / "shape" / "config.yaml").write_text("step: just-a-string\n")
    out = _cli(str(runs), "--out", str(tmp_path / "report"), module="ablate.report")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for name in problems:
        assert f"warning: {runs / name}" in out.stderr, name
    assert f"warning: {good / 'metrics.jsonl'}: a torn line was dropped" in out.stderr
    assert "test_acc='high' is not a number" in out.stderr
    report = (tmp_path / "report" / "REPORT.md").read_text()
    assert "1 runs (1 completed)" in report and "## Records skipped or repaired" in report
