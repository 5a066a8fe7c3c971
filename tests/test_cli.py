"""The ``ablate`` command: its commands and their help, Hydra's help template and tab completion,
plans before sweeps, any batch size, and what the terminal shows."""
import io
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ablate.plan import format_plan, plan
from ablate.records import read_summary
from ablate.run import execute
from tests.conftest import REPO, SMOKE, make_cfg

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _ablate(*args, timeout=300, env=None, umask=None):
    return subprocess.run([sys.executable, "-m", "ablate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, preexec_fn=None if umask is None else lambda: os.umask(umask))


def test_every_command_has_real_help():
    top = _ablate("--help")
    assert top.returncode == 0
    for command in ("run", "plan", "report", "models", "eval", "bench", "demo"):
        assert f"    {command} " in top.stdout, command
    for command, says in (("models", "--json"), ("plan", "done, running, failed before, to run"),
                          ("eval", "--tta {flip,multicrop,none}"), ("report", "--out"), ("demo", "overrides"),
                          ("bench", "--only")):
        out = _ablate(command, "--help")
        text = " ".join(out.stdout.split())  # argparse wraps to the terminal's width
        assert out.returncode == 0 and f"usage: ablate {command}" in text and says in text, command
    models = subprocess.run([sys.executable, "-m", "ablate.models", "--help"], cwd=REPO, capture_output=True, text=True)
    assert models.returncode == 0 and "usage: ablate models" in models.stdout  # python -m keeps working
    assert _ablate("nosuch").returncode == 2


def test_run_help_teaches_a_run_the_groups_in_natural_order_the_steps_and_examples():
    out = _ablate("run", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "powered by Hydra" not in text and "knots:" not in text  # no stock header, no config dump
    assert "A run composes a recipe from conf/" in text
    assert "128, 256, 512*, 768, 1024, 2000" in text  # natural order, the current choice starred
    assert any(line.split()[:1] == ["step4_9"] and "Residual:L1+L3" in line for line in text.splitlines())
    steps = [line.split()[0] for line in text.split("== Steps")[1].split("== Flags")[0].splitlines()[1:] if line.strip()]
    assert steps[:3] == ["step0", "step1_1", "step1_2"] and steps.index("step4_9") < steps.index("step4_10")
    examples = text.split("== Examples ==")[1].split("==")[0]
    assert len([line for line in examples.splitlines() if line.strip().startswith("ablate ")]) == 10
    assert "  +experiment " in text and "  arch " in text  # groups the defaults leave out take a +


def test_tab_completion_works_for_the_ablate_command(tmp_path):
    """Hydra's bash completion installed for `ablate`, exercised through bash's own completion function."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ablate").write_text(f'#!/bin/sh\nexec {sys.executable} -m ablate "$@"\n')
    (bin_dir / "ablate").chmod(0o755)
    script = textwrap.dedent("""\
        eval "$(ablate run -sc install=bash)"
        complete_line() {
            COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"
            COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); hydra_bash_completion; echo "${COMPREPLY[@]}"
        }
        complete_line "ablate run +step=step8_"
        complete_line "ablate pl"
        """)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    steps, commands = out.stdout.strip().splitlines()[-2:]
    assert "+step=step8_1" in steps.split() and "+step=step8_9" in steps.split() and "+step=step4" not in steps
    assert commands.split() == ["plan"]


def test_a_sweep_config_points_to_plan_instead_of_a_traceback():
    out = _ablate("run", "-m", "+experiment=arch15", "--cfg", "job")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "ablate plan -m +experiment=arch15" in out.stderr


def test_plan_lists_the_sweep_and_then_what_already_ran(tmp_path):
    sweep = tmp_path / "arch15"
    overrides = ["+experiment=arch15", *SMOKE, f"hydra.sweep.dir={sweep}"]
    sweep_dir, _, jobs = plan(overrides)
    assert sweep_dir == sweep and len(jobs) == 15 and {j.status for j in jobs} == {"to run"}
    # backbone is step4_6's own network; the smoke runs' synthetic data is a recipe change of its own
    assert jobs[0].label == "step4_6 · data=synthetic" and jobs[1].label == "step4_6 · arch=extra_l1 · data=synthetic"
    assert [j.subdir.split("_")[0] for j in jobs] == [str(i) for i in range(15)]
    assert not sweep.exists()  # a plan writes nothing

    out = _ablate("run", "-m", *overrides, "arch=backbone,extra_l1", umask=0o077)  # two of its jobs, private umask
    assert out.returncode == 0, out.stderr[-2000:]
    private = [p for p in sweep.rglob("*") if p.is_file() and p.stat().st_mode & 0o777 != 0o644]
    assert private == []  # records, configs, Hydra's files, outcomes and locks: readable by colleagues
    _, _, jobs = plan(overrides)
    assert [j.status for j in jobs].count("done") == 2 and [j.status for j in jobs].count("to run") == 13
    assert [j.num for j in jobs if j.status == "done"] == [0, 1]
    assert all(j.estimate and j.like == "step" for j in jobs if j.status == "to run")
    text = format_plan(sweep, jobs)
    assert text.splitlines()[-1].startswith("15 jobs: 2 done, 13 to run; about ")
    assert len(text.splitlines()) == 2 + 15 + 1


def test_plan_of_an_adaptive_sweep_says_why_it_cannot_list_it():
    out = _ablate("plan", "-m", "+experiment=hparams")
    assert out.returncode == 0 and "chooses each job from the results" in out.stdout


def test_any_batch_size_from_the_command_line(tmp_path):
    summary = execute(make_cfg("+step=step4", *SMOKE, "batch_size=100"), tmp_path)
    assert summary["status"] == "completed" and read_summary(tmp_path)["config_key"]
    assert make_cfg("+step=step4", "batch_size=100").batch_size == 100
    assert make_cfg("+step=step0").batch_size == 128 and make_cfg("+step=step10").batch_size == 2000
    assert make_cfg("+step=step10", "batch_size=100").batch_size == 100  # the value beats the step's option


def test_the_epoch_bar_shows_the_running_loss_and_the_lr(monkeypatch):
    from ablate.progress import EpochBar

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = EpochBar(range(3), 3, "epoch 1/2", True, torch.device("cpu"))
    for i in bar:
        bar.show(torch.tensor(2.5 * (i + 1)), i + 1, 0.4)
        bar.bar.refresh()  # three quick steps: tqdm would not redraw by itself before the loop closes it
    bar.close()
    assert "epoch 1/2" in screen.getvalue() and "loss 2.5000 · lr 0.4" in screen.getvalue()
    quiet = EpochBar(range(3), 3, "epoch 1/2", False, torch.device("cpu"))  # progress=false
    assert list(quiet) == [0, 1, 2] and quiet.bar.disable
