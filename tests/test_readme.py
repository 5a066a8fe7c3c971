"""The README's journey table says what conf/step/ holds: the same steps, epochs and published times."""
from __future__ import annotations

import re

import yaml

from tests.conftest import REPO


def _readme_journey() -> dict[str, tuple[float, float]]:
    """step id -> (epochs, reference seconds) from the README's journey table."""
    text = (REPO / "README.md").read_text()
    section = text.split("## The journey", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"step\d+(_\d+)?", cells[0]):
            rows[cells[0]] = (float(cells[2]), float(cells[3]))
    return rows


def _step_files() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((REPO / "conf" / "step").glob("*.yaml"))}


def _distinct(step: dict) -> bool:
    """A step that changes the recipe: not an alias (`= step4_10`) or a study step with no change."""
    change = step["step"]["change"]
    return not change.startswith("=") and not change.startswith("no change")


def test_readme_journey_table_matches_the_step_files():
    table, steps = _readme_journey(), _step_files()
    distinct = {name for name, step in steps.items() if _distinct(step)}
    assert len(distinct) == 36  # 26 of the journey, 10 of the sequel
    assert set(table) == distinct, f"README rows differ from conf/step/: {sorted(set(table) ^ distinct)}"
    for name, (epochs, seconds) in table.items():
        ref = steps[name]["step"]["ref"]
        assert (epochs, seconds) == (ref["epochs"], ref["time_s"]), name


def test_readme_replay_table_is_the_committed_records():
    """The README's brief of the CPU-scale replay is what the committed records say today:
    `python -m ablate.report experiments/journey-cpu/runs --out experiments/journey-cpu/report
    --readme README.md` rewrites it."""
    from ablate.report.document import README_MARKERS, journey_table
    from ablate.report.load import load_runs
    from ablate.report.stats import aggregate

    text = (REPO / "README.md").read_text()
    start, end = README_MARKERS
    written = text.split(start, 1)[1].split(end, 1)[0].strip()
    runs = load_runs(REPO / "experiments" / "journey-cpu" / "runs")[0]
    assert written == journey_table(aggregate(runs)).to_markdown(index=False, disable_numparse=True).strip()
    assert (REPO / "experiments" / "journey-cpu" / "report" / "timeline.png").is_file()
