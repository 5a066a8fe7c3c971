"""The report as files: tables (CSV, Parquet), charts, REPORT.md and a self-contained report.html.

Both documents are rendered from one list of sections, so they always say the same. Tables print
numbers rounded and a missing value as "—"; the widest ones are split so that REPORT.md reads on a
laptop screen. report.html embeds its charts and sorts any table by a click on a column header, with
no server and nothing fetched at view time.
"""
from __future__ import annotations

import base64
import html
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from ablate.records import writable_dir_problem
from ablate.report.figures import architecture_step, plot_architectures, plot_curves
from ablate.report.load import CONTENDED_SHARE, journey_steps, load_runs
from ablate.report.stats import aggregate, verdicts
from ablate.report.timeline import plot_timeline, timeline_rows
from ablate.studies import study_charts

MISSING = "—"


def _number(digits: int, thousands: bool = False) -> Callable[[object], str]:
    def fmt(x: object) -> str:
        if x is None or (isinstance(x, float) and not math.isfinite(x)) or x is pd.NA:
            return MISSING
        if isinstance(x, (int, float)):
            return f"{x:,.{digits}f}" if thousands else f"{x:.{digits}f}"
        return str(x) or MISSING
    return fmt


def _text(x: object) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return str(x) if str(x) != "" else MISSING


def _percent(x: object) -> str:
    return MISSING if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{100 * x:.0f}%"


def _interval(low: str, high: str, digits: int) -> Callable[[pd.Series], str]:
    def fmt(row: pd.Series) -> str:
        lo, hi = row.get(low), row.get(high)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)):
            return MISSING
        return f"{lo:.{digits}f}…{hi:.{digits}f}"
    return fmt


Column = tuple  # (header, column name or row function, formatter)


def table(df: pd.DataFrame, columns: Sequence[Column]) -> pd.DataFrame:
    """``df`` as strings under readable headers: each column formatted, missing values as "—"."""
    out = {}
    for header, source, fmt in columns:
        if callable(source):
            out[header] = [source(row) for _, row in df.iterrows()]
        elif source in df:
            out[header] = [fmt(v) for v in df[source]]
    return pd.DataFrame(out, index=range(len(df)))


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    image: str | None = None


def to_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for paragraph in s.text:
            lines += [paragraph, ""]
        if s.image:
            lines += [f"![{s.title}]({s.image})", ""]
        if s.table is not None and len(s.table):
            lines += [s.table.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12.5px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left}th{background:#f2f2f2;cursor:pointer;user-select:none}th:after{content:" ⇅";color:#999}
tr:nth-child(even){background:#fafafa}img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4}"""
# Sort a table by the clicked column: numbers (the first number in a cell) numerically, text otherwise.
_SCRIPT = """document.querySelectorAll("table").forEach(t=>t.querySelectorAll("th").forEach((th,i)=>{
th.onclick=()=>{const b=t.tBodies[0],rows=[...b.rows],asc=th.dataset.asc!=="1";th.dataset.asc=asc?"1":"0";
const key=r=>{const s=r.cells[i].innerText.replace(/,/g,""),m=s.match(/-?\\d+(\\.\\d+)?(e-?\\d+)?/);
return m&&s!=="—"?parseFloat(m[0]):s};rows.sort((x,y)=>{const a=key(x),c=key(y);
const r=(typeof a==="number"&&typeof c==="number")?a-c:String(a).localeCompare(String(c));return asc?r:-r});
rows.forEach(r=>b.appendChild(r))}}))"""


def _inline(paragraph: str) -> str:
    """The little markdown the report's paragraphs use: `code`, as HTML."""
    parts = html.escape(paragraph).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(title: str, sections: list[Section], out: Path) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{_inline(p)}</p>" for p in s.text]
        if s.image and (out / s.image).is_file():
            data = base64.b64encode((out / s.image).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
        if s.table is not None and len(s.table):
            body.append(s.table.to_html(index=False, border=0, escape=True))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}<script>{_SCRIPT}</script></body></html>\n")


ACCURACY = [("recipe", "label", _text), ("n", "n", _number(0)), ("acc %", "acc_mean", _number(2)),
            ("sd", "acc_std", _number(2)), ("95% CI", _interval("ci95_low", "ci95_high", 2), None),
            ("≥ target", "share_reaching", _percent), ("published %", "ref_acc", _number(2)),
            ("verdict", "verdict", _text), ("ran as", "precision_used", _text)]
TIMES = [("recipe", "label", _text), ("time s", "time_s", _number(0, True)), ("sd", "time_std", _number(0, True)),
         ("to target s", "time_to_target", _number(0, True)), ("never reached", "never_reached", _number(0)),
         ("published s", "ref_time_s", _number(1)), ("convention", "timing", _text),
         ("train s", "train_s", _number(0, True)), ("eval s", "eval_s", _number(0, True)),
         ("timing note", "timing_note", _text)]
VERDICT_TIME = [("recipe", "label", _text), ("vs", "vs", _text), ("n / n", lambda r: f"{r.n} / {r.n_vs}", None),
                ("published ×", "time_pub", _number(2)), ("measured ×", "time_ratio", _number(2)),
                ("95% CI", _interval("time_low", "time_high", 2), None), ("time verdict", "time_verdict", _text),
                ("verdict", "verdict", _text), ("seeds to settle", "seeds_needed", _number(0))]
VERDICT_ACC = [("recipe", "label", _text), ("claim", "acc_claim", _text), ("published Δ", "acc_pub", _number(2)),
               ("measured Δ", "acc_diff", _number(2)), ("95% CI", _interval("acc_low", "acc_high", 2), None),
               ("p", "acc_p", _number(3)), ("test", "acc_test", _text), ("accuracy verdict", "acc_verdict", _text),
               ("note", "note", _text)]
RUNS = [("run", "run", _text), ("status", "status", _text), ("recipe", "label", _text), ("seed", "seed", _number(0)),
        ("acc %", "test_acc", _number(2)), ("time s", "time_s", _number(0, True)), ("epochs", "epochs", _number(0)),
        ("to target s", "time_to_target", _number(0, True)), ("timing note", "timing_note", _text),
        ("device", "device", _text), ("error", "error", _text)]

EXPLAIN = ("Every number comes from the runs listed at the end, at the scale and on the device named in its "
           "row; a CPU is named with its instruction set, and no table or chart pools scales or devices. "
           "Accuracies are percent. `time s` follows the published convention of each step: Posts 1–4 count "
           "the training loop and the per-epoch evaluation, preprocessing excluded; Post 8 counts "
           "preprocessing and the training loop, evaluation excluded. Published references are one V100 at "
           "full scale. A `timing note` marks seconds that were not exclusive: `gpu shared` (parallel jobs on "
           f"one GPU) or `contended` (a CPU run whose threads got under {CONTENDED_SHARE:.0%} of their CPU "
           "time); such runs are left out of a recipe's times when it has clean ones. A recipe is labelled by "
           "how it differs from its step (`step8 · schedule.peak=0.8`).")
VERDICTS_EXPLAIN = ("Each step against the step before it that was measured on the same scale and device: the "
                    "published claim (time ratio; accuracy change, or that accuracy holds) beside the measured "
                    "ratio and difference with 95% intervals (Welch's t-test where both sides have 2+ runs; "
                    "otherwise a normal interval from the panel's pooled per-run spread, and for times each "
                    "run's epoch-to-epoch spread). `reproduced`: the measured change goes the claimed way "
                    "beyond its interval (a claim of no change: the interval lies within ±5% of the time, "
                    "±0.5 points of accuracy); `not reproduced`: significantly the other way; `inconclusive`: "
                    "neither, with the seeds per step that would settle it. An ablation (a recipe with "
                    "changes) is measured against its own step; nothing was published for it.")


JOURNEY = [("step", "step", _text), ("change", "change", _text), ("measured s", "time_s", _number(0, True)),
           ("measured %", "acc_mean", _number(2)), ("n", "n", _number(0)), ("machine", "device", _text),
           ("published s", "ref_time_s", _number(1)), ("published %", "ref_acc", _number(2))]
README_MARKERS = ("<!-- journey table: written by python -m ablate.report ... --readme; do not edit -->",
                  "<!-- end of journey table -->")


def _brief(change: str, width: int = 60) -> str:
    """A step's change in one short line for the README: its first clause, cut at a word within ``width``."""
    first = change.split(";")[0]
    return first if len(first) <= width else first[:width].rsplit(" ", 1)[0].rstrip(",:") + " …"


def journey_table(agg: pd.DataFrame) -> pd.DataFrame:
    """The measured journey in brief: each plain step (no ablations), in journey order, on each
    scale and device, beside its published time and accuracy."""
    steps = {s["id"]: s for s in journey_steps()}
    plain = agg[(agg.label == agg.step) & agg.step.isin(steps)].copy()
    plain["change"] = [_brief(steps[s].get("change", "")) for s in plain.step]
    plain["_o"] = plain.step.map({s: i for i, s in enumerate(steps)})
    return table(plain.sort_values(["scale", "_o", "device"]), JOURNEY)


def write_readme_table(readme: Path, agg: pd.DataFrame) -> None:
    """Replace the journey table between README_MARKERS in ``readme`` with the measured one."""
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"ablate.report: {readme} has no journey-table markers ({start} ... {end})")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{start}\n{journey_table(agg).to_markdown(index=False, disable_numparse=True)}\n{end}{tail}")


def build_sections(runs: pd.DataFrame, agg: pd.DataFrame, verdict: pd.DataFrame, charts: list[tuple[str, str]],
                   problems: list[str]) -> list[Section]:
    counts = runs.status.value_counts().to_dict()
    head = (f"{len(runs)} runs ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
            f"{agg.label.nunique() if len(agg) else 0} recipes of {runs.step.nunique()} steps; "
            f"scales: {', '.join(sorted(set(runs.scale.dropna())))}; "
            f"devices: {'; '.join(sorted(set(runs.device.dropna())))}; "
            f"torch {', '.join(sorted(set(runs.torch_version.dropna())))}.")
    by_recipe = agg.merge(verdict[["label", "scale", "device", "verdict"]], on=["label", "scale", "device"],
                          how="left") if len(verdict) else agg.assign(verdict=math.nan)
    sections = [Section("Summary", [head, EXPLAIN])]
    sections += [Section(title, image=name) for title, name in charts[:1]]
    for (scale, device), recipes in by_recipe.groupby(["scale", "device"], sort=True):
        where = f"scale {scale} · {device}"
        targets = sorted({f"{t:g}%" for t in recipes.target if math.isfinite(t)})
        sections += [Section(f"Recipes: accuracy · {where}", [f"Target: {', '.join(targets) or '—'}."],
                             table=table(recipes, ACCURACY)),
                     Section(f"Recipes: time · {where}", table=table(recipes, TIMES))]
    if len(verdict):
        for k, ((scale, device), v) in enumerate(verdict.groupby(["scale", "device"], sort=True)):
            where = f"scale {scale} · {device}"
            spread = sorted(set(v.sd_note) - {""})
            sections += [Section(f"Verdicts: time · {where}", [VERDICTS_EXPLAIN] if k == 0 else [],
                                 table=table(v, VERDICT_TIME)),
                         Section(f"Verdicts: accuracy · {where}",
                                 [f"Where a side has one run, the interval uses {spread[0]}."] if spread else [],
                                 table=table(v, VERDICT_ACC))]
    sections += [Section(title, image=name) for title, name in charts[1:]]
    sections.append(Section("Runs", table=table(runs, RUNS)))
    if problems:
        sections.append(Section("Records skipped or repaired", [f"* {p}" for p in problems]))
    return sections


def write_report(roots: Path | Sequence[Path], out: Path, target: float | None = None,
                 readme: Path | None = None) -> dict[str, Path]:
    """Write runs, aggregates and verdicts (CSV and Parquet), the charts, REPORT.md and report.html
    into ``out`` from the records below ``roots`` (one directory or several, pooled); return what was
    written."""
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    root = ", ".join(map(str, roots))
    out.mkdir(parents=True, exist_ok=True)
    runs, curves, problems = load_runs(roots, target)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if runs.empty:
        what = "no usable run records" if problems else "no run records (summary.json) found"
        raise SystemExit(f"ablate.report: {what} under {root}")
    agg = aggregate(runs)
    verdict = verdicts(runs)
    files = {}
    for name, df in (("runs", runs), ("aggregate", agg), ("verdicts", verdict)):
        df.to_csv(out / f"{name}.csv", index=False)
        df.to_parquet(out / f"{name}.parquet", index=False)
        files[name] = out / f"{name}.csv"
    import matplotlib

    matplotlib.use("Agg")  # files only: reports are written on machines without a display
    import matplotlib.pyplot as plt

    charts = []
    if sum(r["kind"] == "step" for r in timeline_rows(agg)) >= 2:  # a timeline needs two steps
        plt.close(plot_timeline(agg, out / "timeline.png"))
        charts.append(("Timeline", "timeline.png"))
    if architecture_step(agg) is not None:
        plt.close(plot_architectures(agg, out / "architectures.png"))
        charts.append(("Architectures", "architectures.png"))
    charts += study_charts(runs, out, curves)  # Post 5/7 studies: descent path, heat maps, BN stress test
    plt.close(plot_curves(runs, curves, out / "curves.png"))
    charts.append(("Per-epoch test accuracy", "curves.png"))
    files.update({c: out / c for _, c in charts})
    title = f"ablate report: {root}"
    sections = build_sections(runs, agg, verdict, charts, problems)
    (out / "REPORT.md").write_text(to_markdown(title, sections))
    (out / "report.html").write_text(to_html(title, sections, out))
    files.update(report=out / "REPORT.md", html=out / "report.html")
    if readme is not None:
        write_readme_table(readme, agg)
        files["readme"] = readme
    return files


def _percent(text: str) -> float:
    """``--target``: a finite percentage, 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:  # NaN fails this too
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage from 0 to 100")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ablate report",
                                     description="Tables, verdicts, charts, REPORT.md and report.html from run records.")
    parser.add_argument("runs", type=Path, nargs="+",
                        help="directories of run records (searched at any depth; several are pooled)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: <first runs dir>/report)")
    parser.add_argument("--target", type=_percent, help="accuracy target in percent (default: each run's; "
                                                     "at scale=cpu 86%%, see ablate.report.load)")
    parser.add_argument("--readme", type=Path, help="also rewrite the journey table between the markers of "
                                                    "this Markdown file (the project README's brief of the replay)")
    args = parser.parse_args(argv)
    for runs in args.runs:
        if not runs.is_dir():
            parser.error(f"{runs} is not a directory")
    out = args.out or args.runs[0] / "report"
    if problem := writable_dir_problem(out):
        parser.error(f"cannot write the report to {out} ({problem}); choose another with --out")
    files = write_report(args.runs, out, args.target, args.readme)
    for name, path in files.items():
        print(f"{name:>14}: {path}")
