"""Post 5 study: the coordinate-descent driver, its Hydra sweeper, and the study charts."""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from ablate.records import read_summary
from ablate.report import write_report
from ablate.descent import CoordinateDescentSweeper, Point, coordinate_descent, moved_axis, replay
from ablate.studies import study_charts
from tests.conftest import REPO, SMOKE, make_cfg

START = Point(lr=0.001, momentum=0.5, weight_decay=0.01)  # Post 5's bad start
# Smaller than SMOKE alone: one epoch on 512 images keeps every end-to-end run near a second.
TINY = [*SMOKE, "scale.epochs=1", "scale.train_size=512", "scale.test_size=256"]


def move_coordinates(p: Point) -> tuple[float, float, float]:
    """(a, b, c) = base-2 logs, relative to START, of (λα/(1−ρ), 1−ρ, α): each move of the search
    changes exactly one of them by ±1 (a λ move a, a ρ move b, an α move c)."""
    b = math.log2((1 - p.momentum) / (1 - START.momentum))
    c = math.log2(p.weight_decay / START.weight_decay)
    return math.log2(p.invariant / START.invariant), b, c


def quadratic(p: Point) -> float:
    """A quadratic in log2-space with its top (94) at a = 6, b = -2, c = -4, i.e. λ = 0.001·2^8 = 0.256,
    1−ρ = 0.5/4 (ρ = 0.875), α = 0.01/16 = 0.000625: reachable from START by doublings."""
    a, b, c = move_coordinates(p)
    return 94.0 - ((a - 6) ** 2 + (b + 2) ** 2 + (c + 4) ** 2)


class Counting:
    """An objective that remembers every point it was asked about."""

    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, p: Point) -> float:
        self.calls.append(p)
        return self.f(p)


def test_descent_reaches_the_optimum_in_the_hand_counted_number_of_runs():
    # Worked by hand in (a, b, c), start (0, 0, 0):
    #  cycle 1  λ: a = 1..6 improve, a = 7 worse                 1 start + 7 = 8 runs
    #           ρ: doubling 1−ρ would give ρ = 0 (skipped, not run); b = -1, -2 improve, -3 worse: 3 -> 11
    #           α: c = +1 worse; c = -1..-4 improve, -5 worse:                                   6 -> 17
    #  cycle 2  λ: a = 7, 5 worse (new points): 2 -> 19;  ρ: b = -1, -3 worse: 2 -> 21
    #           α: c = -3 and -5 were both run in cycle 1 (cached): 0 -> 21; nothing improved: stop.
    objective = Counting(quadratic)
    result = coordinate_descent(objective, START)
    assert len(result.history) == len(objective.calls) == 21
    assert result.converged
    assert result.best.score == 94.0
    assert result.best.point == Point(0.256, 0.875, 0.000625)  # exact: every move is a power of 2
    assert [t.move for t in result.history[:9]] == ["start"] + ["λ×2"] * 7 + ["1−ρ÷2"]
    assert all(0 < t.point.momentum < 1 for t in result.history)  # ρ = 0 was never run


def test_rho_and_alpha_moves_keep_lambda_alpha_over_one_minus_rho_fixed():
    history = coordinate_descent(quadratic, START).history
    kept = {"momentum", "weight_decay"}
    for prev, cur in zip(history, history[1:]):
        axis, factor = moved_axis(cur.parent, cur.point)
        assert factor in (2.0, 0.5)  # one doubling or halving away from the point it moved from
        if axis in kept:
            assert cur.point.invariant == pytest.approx(cur.parent.invariant, rel=1e-12)
            if moved_axis(prev.parent, prev.point)[0] in kept:  # both in one cycle's ρ/α passes
                assert cur.point.invariant == pytest.approx(prev.point.invariant, rel=1e-12)
        else:  # a λ move is the only one that changes it
            assert cur.point.invariant / cur.parent.invariant == pytest.approx(factor)


def test_the_cache_never_evaluates_a_point_twice():
    objective = Counting(quadratic)
    result = coordinate_descent(objective, START)
    assert len(set(objective.calls)) == len(objective.calls) == len(result.history)
    # On a flat objective nothing improves: the start and its six neighbours less ρ = 0, once each.
    flat = Counting(lambda p: 50.0)
    result = coordinate_descent(flat, START)
    assert result.converged and len(flat.calls) == len(set(flat.calls)) == 6
    assert result.best.point == START


def test_max_runs_stops_the_search_and_says_so():
    objective = Counting(quadratic)
    result = coordinate_descent(objective, START, max_runs=5)
    assert len(objective.calls) == 5 and not result.converged
    assert result.best == result.history[-1]  # still climbing in λ when the budget ran out
    with pytest.raises(ValueError):
        coordinate_descent(quadratic, Point(0.4, 1.0, 5e-4))


def test_replay_rebuilds_the_moves_from_the_runs_alone():
    """The report labels the path from run records: each run moved from the best run before it."""
    history = coordinate_descent(quadratic, START).history
    assert replay([t.point for t in history], [t.score for t in history]) == history


def test_sweeper_refuses_sweeps_and_the_searched_keys():
    sweeper = CoordinateDescentSweeper(lr=0.001, momentum=0.5, weight_decay=0.01, max_runs=3,
                                       params={"+step": "step5", "seed": "0"})
    assert sweeper.fixed_overrides(["scale=smoke", "seed=1"]) == ["+step=step5", "seed=1", "scale=smoke"]
    for bad in ("seed=0,1", "optim.momentum=0.9", "schedule.peak=0.4"):
        with pytest.raises(HydraException):
            sweeper.fixed_overrides([bad])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ablate.run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_sweeper_end_to_end_records_resumes_and_reports(tmp_path):
    sweep = tmp_path / "hparams"
    command = ["-m", "+experiment=hparams", *TINY, "hydra.sweeper.max_runs=3", f"hydra.sweep.dir={sweep}"]
    out = _cli(*command)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 3
    records = [read_summary(p.parent) for p in summaries]
    assert all(r["status"] == "completed" and r["choices"]["experiment"] == "hparams" for r in records)
    configs = [yaml.safe_load((p.parent / "config.yaml").read_text()) for p in summaries]
    assert configs[0]["schedule"]["peak"] == 0.001 and configs[0]["optim"]["momentum"] == 0.5
    assert len({(c["schedule"]["peak"], c["optim"]["momentum"], c["optim"]["weight_decay"]) for c in configs}) == 3

    before = [p.read_bytes() for p in summaries]
    again = _cli(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("not run again") == 3
    assert [p.read_bytes() for p in sorted(sweep.glob("*/summary.json"))] == before

    files = write_report(sweep, tmp_path / "report")
    assert (tmp_path / "report" / "hparams_path.png").stat().st_size > 0
    assert "](hparams_path.png)" in files["report"].read_text()


def test_grid_end_to_end_draws_the_lr_wd_heat_map(tmp_path):
    sweep = tmp_path / "grid"
    out = _cli("-m", "+experiment=hparams_lr_wd", *TINY, "schedule.peak=0.2,0.4",
               "optim.weight_decay=2.5e-4,5e-4", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list(sweep.glob("*/summary.json"))) == 4
    files = write_report(sweep, tmp_path / "report")
    assert (tmp_path / "report" / "hparams_lr_wd.png").stat().st_size > 0
    assert "](hparams_lr_wd.png)" in files["report"].read_text()


def test_lr_bs_grid_sweeps_batch_sizes_as_values_and_draws_a_heat_map(tmp_path):
    params = yaml.safe_load((REPO / "conf/experiment/hparams_lr_bs.yaml").read_text())["hydra"]["sweeper"]["params"]
    [override] = OverridesParser.create().parse_overrides([f"batch_size={params['batch_size']}"])
    choices = list(override.sweep_string_iterator())
    assert [make_cfg("+step=step5", f"batch_size={c}").batch_size for c in choices] == [128, 256, 512, 1024]

    runs = pd.DataFrame([dict(run=f"{i}", status="completed", test_acc=90.0 - abs(math.log2(lr / 0.4 * 512 / n)),
                              lr_peak=lr, momentum=0.9, weight_decay=5e-4, batch_size=n, scale="smoke",
                              device="cpu", **{"choice.experiment": "hparams_lr_bs"})
                         for i, (lr, n) in enumerate((lr, n) for lr in (0.2, 0.4) for n in (256, 512))])
    assert study_charts(runs, tmp_path) == [("Post 5 grid: max LR × batch size", "hparams_lr_bs.png")]
    assert (tmp_path / "hparams_lr_bs.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------
# The airbench additivity study (sota-facts 2.2)
# ---------------------------------------------------------------------------------------------------

def test_airbench_loo_recipes_carry_the_papers_epochs():
    from ablate.studies.airbench_loo import published_epochs, recipe_order

    published = published_epochs()
    assert list(published) == recipe_order() and len(published) == 19
    # make_figures.py's data, transcribed in sota-facts 2.2
    assert (published["all_on"], published["no_whiten"], published["all_off"], published["only_scalebias"],
            published["whiten_lookahead"]) == (9.9, 22, 34, 34, 20.2)
    listed = yaml.safe_load((REPO / "conf/experiment/airbench_loo.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert listed["+airbench_loo"].split(",") == recipe_order()


def test_airbench_additivity_reproduces_the_papers_bars():
    """make_figures.py: additive prediction no_f - all_on, multiplicative all_off (1 - all_on / no_f),
    observed all_off - only_f; the same from the whitening-only base."""
    from ablate.studies.airbench_loo import FEATURES, additivity, published_epochs

    bars = additivity(published_epochs(), "all_off", FEATURES)
    assert bars["additive"][0] == pytest.approx(22 - 9.9) and bars["observed"][0] == pytest.approx(34 - 21)
    assert bars["multiplicative"][0] == pytest.approx(34 * (1 - 9.9 / 22))
    second = additivity(published_epochs(), "only_whiten", FEATURES[1:])
    assert second["observed"] == pytest.approx([21 - 18, 21 - 16.5, 21 - 20.2, 21 - 18.1, 21 - 20.0])


def test_epochs_to_target_is_the_first_epoch_of_the_seed_mean(tmp_path):
    import pandas as pd

    from ablate.studies.airbench_loo import epochs_to_target, plot_additivity

    runs = pd.DataFrame([dict(run=f"r{s}", seed=s, status="completed", scale="cpu", device="cpu", target=86.0,
                              test_acc=87.0, **{"choice.airbench_loo": name, "choice.experiment": "airbench_loo"})
                         for name in ("all_on", "no_tta") for s in (0, 1)])
    curves = {"r0": pd.DataFrame(dict(epoch=[1, 2, 3], test_acc=[80.0, 86.5, 87.0], epochs_trained=[1, 2, 2.9])),
              "r1": pd.DataFrame(dict(epoch=[1, 2, 3], test_acc=[81.0, 85.0, 86.5], epochs_trained=[1, 2, 2.9]))}
    # mean over seeds: 80.5, 85.75, 86.75 -> first reaches 86 at the third (fractional) epoch
    assert epochs_to_target(runs[runs["choice.airbench_loo"] == "all_on"], curves, 86.0) == (2.9, False)
    epochs, censored = epochs_to_target(runs.iloc[:2], curves, 90.0)
    assert math.isnan(epochs) and censored
    fig = plot_additivity(runs, curves, tmp_path / "loo.png")
    assert (tmp_path / "loo.png").stat().st_size > 10_000 and (tmp_path / "loo.csv").is_file()
    assert any(ln.get_marker() == "D" for ax in fig.axes for ln in ax.get_lines())  # measured diamonds
