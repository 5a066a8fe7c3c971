"""Statistics of the report: per-recipe aggregates, and a verdict for every step of the journey.

``aggregate``: per recipe, scale and device, n, the mean, spread and 95% interval of the test
accuracy, the share of runs reaching the target, mean times (flagged timings left out when clean
ones exist) and time to target.

``verdicts``: each journey step against the step before it that was measured in the same panel
(scale and device). The published claim (the ratio of the published times, and the accuracy change
or "accuracy holds") is set beside the measured one: the time ratio with a 95% interval, the
accuracy difference with a Welch t-test when both sides have two runs or more. Each part is
``reproduced`` (the measured change goes the claimed way, beyond its interval; for a claim of no
change, the whole interval lies within a small margin), ``not reproduced`` (significantly the other
way, or significantly beyond the margin), or ``inconclusive``, with roughly how many seeds per step
would settle it. A step whose change does nothing on the device (fp32 batch norm where fp16 already
runs as fp32) has no analogue there, and says so.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ablate.records import published_seconds
from ablate.report.labels import step_reference
from ablate.report.load import journey_order

GROUP_KEYS = ["step", "label", "arch", "scale", "device", "recipe"]  # one aggregate row per recipe
PANEL = ["scale", "device"]  # a comparison never crosses scales or devices
UNJUDGED_SCALES = ("smoke",)  # runs that only exercise code paths: their numbers are not evidence

HOLD_POINTS = 0.3  # a published accuracy change under this is a claim that accuracy holds (spread ~0.15)
ACC_MARGIN = 0.5  # ... reproduced when the measured change's 95% interval lies within +-0.5 points
TIME_TOL = 0.01  # a published time ratio within 1% of 1 claims no change in time ...
TIME_MARGIN = 0.05  # ... reproduced when the measured ratio's interval lies within 1 +- 5%
FALLBACK_SD = 0.15  # per-run accuracy spread when no recipe of the panel has two runs (journey-facts A3)
Z95, Z80 = stats.norm.ppf(0.975), stats.norm.ppf(0.8)  # 95% intervals; 80% power for seed estimates

# Post 8 times exclude evaluation. Its own baseline for the Post 4 recipe in that convention is the
# dawn.py run, 75 s (docs/references.md 0.3, A3 8.0): the published time of step4 as step 8_1 counts.
PUBLISHED_IN_CONVENTION = {("step4", "train_only"): 75.0, ("step4_10", "train_only"): 75.0}


def _clean_timings(g: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs whose seconds count for a recipe's times, and a note on what was left out: flagged
    timings (``timing_note``) are excluded when the recipe has clean ones, and marked when it has none."""
    notes = g.timing_note if "timing_note" in g else pd.Series([""] * len(g), index=g.index)
    flagged = notes.fillna("") != ""
    if not flagged.any():
        return g, ""
    kinds = ", ".join(sorted(set(notes[flagged])))
    if flagged.all():
        return g, f"all {len(g)} {kinds}"
    return g[~flagged], f"{int(flagged.sum())}/{len(g)} {kinds}, excluded"


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if values.notna().sum() > 1 else math.nan


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Per recipe, scale and device: n, mean/std/95% interval of test accuracy, the share of runs
    reaching the target, mean times (``time_std`` over seeds, ``time_spread`` within a run) and
    time-to-target (with how many runs never reached it)."""
    done = runs[runs.status == "completed"] if len(runs) else runs
    keys = [k for k in GROUP_KEYS if k in done]
    out = []
    for key, g in done.groupby(keys, sort=False, dropna=False):
        n, acc = len(g), g.test_acc.astype(float)
        timed, note = _clean_timings(g)
        mean, std = acc.mean(), _std(acc)
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        reached = g.time_to_target.notna()
        has_target = math.isfinite(g.target.iloc[0])
        out.append(dict(zip(keys, key), n=n, acc_mean=mean, acc_std=std, ci95_low=mean - half,
                        ci95_high=mean + half, target=g.target.iloc[0],
                        share_reaching=reached.mean() if has_target else math.nan,
                        train_s=timed.train_seconds.mean(), eval_s=timed.eval_seconds.mean(),
                        time_s=timed.time_s.mean(), time_std=_std(timed.time_s),
                        time_spread=timed.time_spread.mean() if "time_spread" in timed else math.nan,
                        timing=g.timing.iloc[0], timing_note=note,
                        time_to_target=timed.time_to_target[timed.time_to_target.notna()].mean()
                        if reached.any() else math.nan,
                        never_reached=int((~reached).sum()) if has_target else math.nan, epochs=g.epochs.iloc[0],
                        ref_time_s=g.ref_time_s.iloc[0], ref_acc=g.ref_acc.iloc[0],
                        ref_note=g.ref_note.iloc[0] if "ref_note" in g else "",
                        precision_used=", ".join(sorted(set(g.precision_used.dropna()))),
                        torch_version=", ".join(sorted(set(g.torch_version.dropna())))))
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------------
# Verdicts


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def published_time_ratio(step: dict, before: dict) -> float:
    """The published time of ``step`` over that of ``before``, in ``step``'s timing convention; NaN
    when a time is missing or the predecessor's is not known in that convention."""
    t, t0 = step.get("ref_time_s"), before.get("ref_time_s")
    if step.get("timing") != before.get("timing"):
        t0 = PUBLISHED_IN_CONVENTION.get((before["step"], step.get("timing")))
    return float(t) / float(t0) if _finite(t) and _finite(t0) and t0 else math.nan


def published_accuracy_claim(step: dict, before: dict) -> tuple[str, float]:
    """('change', published difference) or ('holds', 0): a step claims a change in accuracy only where
    both published accuracies are numbers HOLD_POINTS or more apart; "3/5 runs >= 94%" or no number
    claims it holds."""
    a, a0 = step.get("ref_acc"), before.get("ref_acc")
    if _finite(a) and _finite(a0) and abs(a - a0) >= HOLD_POINTS:
        return "change", float(a - a0)
    return "holds", 0.0


def _seeds_for(sd: float, effect: float, z: float = Z95 + Z80) -> int:
    """Runs per step for a difference ``effect`` between two means of per-run spread ``sd`` to stand
    out at 95% with 80% power (normal approximation: n = 2 (z sd / effect)^2)."""
    if not (_finite(sd) and _finite(effect)) or effect <= 0:
        return 0
    return max(2, math.ceil(2 * (z * sd / effect) ** 2))


def judge(low: float, high: float, claim: str, sign: float, margin: float, sd: float,
          estimate: float, published: float) -> tuple[str, int]:
    """A verdict on one measured difference (interval ``low``..``high`` around ``estimate``; no change
    is 0) against a claim: 'change' in direction ``sign``, or 'holds' within +-``margin``. Returns
    the verdict and, when inconclusive, the runs per step that would settle it."""
    if not (_finite(low) and _finite(high)):
        return "inconclusive", _seeds_for(sd, abs(estimate) if claim == "change" else margin)
    if claim == "change":
        if (low > 0 and sign > 0) or (high < 0 and sign < 0):
            return "reproduced", 0
        if (low > 0 and sign < 0) or (high < 0 and sign > 0):
            return "not reproduced", 0
        effect = abs(estimate) if estimate * sign > 0 else abs(published)
        return "inconclusive", _seeds_for(sd, effect)
    if -margin <= low and high <= margin:
        return "reproduced", 0
    if low > margin or high < -margin:
        return "not reproduced", 0
    # more runs settle it once the interval, narrowing around the estimate, clears the margin's edge
    return "inconclusive", _seeds_for(sd, max(abs(margin - abs(estimate)), margin / 4))


def combine(parts: list[str]) -> str:
    """One verdict from a step's time and accuracy verdicts ('n/a' parts ignored)."""
    judged = [p for p in parts if p != "n/a"]
    if not judged:
        return "n/a"
    if "not reproduced" in judged:
        return "not reproduced"
    return "reproduced" if all(p == "reproduced" for p in judged) else "inconclusive"


def _pooled_sd(runs: pd.DataFrame) -> tuple[float, str]:
    """The per-run accuracy spread of a panel, pooled over its recipes with two runs or more."""
    groups = [g.test_acc.astype(float) for _, g in runs.groupby("label") if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    if dof == 0:
        return FALLBACK_SD, f"σ {FALLBACK_SD} assumed (published per-run spread; no recipe here has 2 runs)"
    sd = math.sqrt(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)
    return sd, f"σ {sd:.2f} pooled over {len(groups)} recipe(s) with 2+ runs"


def accuracy_difference(a: pd.Series, b: pd.Series, pooled_sd: float) -> dict:
    """``a`` - ``b`` (percentage points): Welch's t-test when both have two runs or more, else a
    normal interval from the panel's pooled per-run spread."""
    a, b = a.astype(float), b.astype(float)
    diff = a.mean() - b.mean()
    if len(a) > 1 and len(b) > 1:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = math.sqrt(va + vb)
        dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else 1.0
        p = stats.ttest_ind(a, b, equal_var=False).pvalue if se > 0 else (1.0 if diff == 0 else 0.0)
        half = stats.t.ppf(0.975, dof) * se
        return dict(acc_diff=diff, acc_low=diff - half, acc_high=diff + half, acc_p=float(p), acc_test="Welch t",
                    acc_sd=math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
    se = pooled_sd * math.sqrt(1 / len(a) + 1 / len(b))
    p = 2 * stats.norm.sf(abs(diff) / se) if se > 0 else math.nan
    return dict(acc_diff=diff, acc_low=diff - Z95 * se, acc_high=diff + Z95 * se, acc_p=float(p),
                acc_test="normal, pooled σ", acc_sd=pooled_sd)


def _times(runs: pd.DataFrame, timing: str) -> pd.Series:
    """Each run's time in the given convention (a predecessor measured in the other one is re-counted)."""
    return pd.Series([published_seconds(r.train_seconds, r.eval_seconds, r.prep_seconds, timing)
                      for r in runs.itertuples()], index=runs.index, dtype=float)


def time_ratio(a: pd.DataFrame, b: pd.DataFrame, timing: str) -> dict:
    """Mean time of ``a`` over that of ``b`` in ``timing``, with a 95% interval on the log scale from
    the spread over seeds (two runs or more) or each run's own epoch-to-epoch spread."""
    ta, tb = _times(a, timing), _times(b, timing)
    ratio = ta.mean() / tb.mean()

    def rel_var(t: pd.Series, runs: pd.DataFrame) -> float:
        sd = t.std(ddof=1) if len(t) > 1 else runs.time_spread.mean()
        return (sd / t.mean()) ** 2 / len(t)

    se = math.sqrt(rel_var(ta, a) + rel_var(tb, b))
    rel_sd = se / math.sqrt(1 / len(ta) + 1 / len(tb)) if _finite(se) else math.nan
    return dict(time_ratio=ratio, time_low=ratio * math.exp(-Z95 * se), time_high=ratio * math.exp(Z95 * se),
                time_rel_sd=rel_sd)


def no_analogue(step: str, before: str, a: pd.DataFrame, b: pd.DataFrame) -> str:
    """Why a step's change does nothing on this device, or ''. Today: a change of precision only,
    where both steps ran in the same precision (fp16 and fp32 batch norm both run as fp32 on a CPU)."""
    ra, rb = step_reference(step), step_reference(before)
    if ra is None or rb is None:
        return ""
    fa, fb = ra[0], rb[0]
    changed = {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k) and not k.startswith("step.")}
    used = set(a.precision_used.dropna()) | set(b.precision_used.dropna())
    if changed and all(k.startswith("precision.") for k in changed) and len(used) == 1:
        return f"no analogue on this device: both steps ran {used.pop()}"
    return ""


def compare(a: pd.DataFrame, b: pd.DataFrame, step: dict, before: dict, sd: float) -> dict:
    """Recipe ``a`` (the runs of ``step``) against recipe ``b`` (of ``before``) in one panel: the
    published claim, the time ratio over the clean timings of each, the accuracy difference over all
    their completed runs."""
    ta, tb = _clean_timings(a)[0], _clean_timings(b)[0]
    claim, published = published_accuracy_claim(step, before)
    return dict(time_pub=published_time_ratio(step, before), **time_ratio(ta, tb, step["timing"]),
                **accuracy_difference(a.test_acc, b.test_acc, sd), acc_claim=claim, acc_pub=published)


def _verdict_parts(c: dict) -> dict:
    """The time and accuracy verdicts of one comparison, and the runs per step that would settle them."""
    log = {k: math.log(c[k]) if _finite(c[k]) and c[k] > 0 else math.nan
           for k in ("time_ratio", "time_low", "time_high", "time_pub")}
    if _finite(log["time_pub"]):
        claim = "holds" if abs(c["time_pub"] - 1) < TIME_TOL else "change"
        time_v, time_n = judge(log["time_low"], log["time_high"], claim, math.copysign(1, log["time_pub"]),
                               math.log(1 + TIME_MARGIN), c["time_rel_sd"], log["time_ratio"], log["time_pub"])
    else:
        time_v, time_n = "n/a", 0
    acc_v, acc_n = judge(c["acc_low"], c["acc_high"], c["acc_claim"], math.copysign(1, c["acc_pub"] or 1),
                         ACC_MARGIN, c["acc_sd"], c["acc_diff"], c["acc_pub"])
    return dict(time_verdict=time_v, acc_verdict=acc_v, verdict=combine([time_v, acc_v]),
                seeds_needed=max(time_n, acc_n) or None)


def _ref(step: str, runs: pd.DataFrame) -> dict:
    """A step's published reference as its runs recorded it."""
    r = runs.iloc[0]
    return dict(step=step, timing=r.timing, ref_time_s=r.ref_time_s, ref_acc=r.ref_acc)


def _predecessor(step: str, label: str, plain: list[str], order: dict[str, int]) -> str | None:
    """What a recipe is compared with: a plain step, the nearest earlier plain step measured in its
    panel; an ablation (a label with changes), its own plain step."""
    if label != step:
        return step if step in plain else None
    earlier = [s for s in plain if order[s] < order[step]]
    return earlier[-1] if earlier else None


def verdicts(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per measured recipe of a journey step that has something to be compared with, within
    each (scale, device) panel. An ablation is measured against its own step; nothing was published
    for it, so it gets no verdict."""
    done = runs[(runs.status == "completed") & runs.test_acc.notna()] if len(runs) else runs
    order = {s: i for i, s in enumerate(journey_order())}
    rows = []
    for (scale, device), panel in done[done.step.isin(order)].groupby(PANEL, sort=True):
        sd, sd_note = _pooled_sd(panel)
        plain = sorted({s for s, lab in zip(panel.step, panel.label) if s == lab}, key=order.get)
        recipes = sorted(panel.groupby("label"), key=lambda kv: (order[kv[1].step.iloc[0]], kv[0]))
        for label, a in recipes:
            step = a.step.iloc[0]
            before = _predecessor(step, label, plain, order)
            if before is None:
                continue
            b = panel[panel.label == before]
            c = compare(a, b, _ref(step, a), _ref(before, b), sd)
            why = no_analogue(step, before, a, b) if label == step else ""
            if label != step:
                c.update(time_pub=math.nan, acc_claim="n/a", acc_pub=math.nan)
                parts = dict(time_verdict="n/a", acc_verdict="n/a", verdict="no published claim", seeds_needed=None)
            elif why:
                parts = dict(time_verdict="n/a", acc_verdict="n/a", verdict="no analogue", seeds_needed=None)
            elif scale in UNJUDGED_SCALES:
                parts = dict(time_verdict="n/a", acc_verdict="n/a", verdict=f"not judged ({scale})",
                             seeds_needed=None)
            else:
                parts = _verdict_parts(c)
            rows.append(dict(step=step, label=label, vs=before, scale=scale, device=device, n=len(a), n_vs=len(b),
                             **c, **parts, note=why, sd_note=sd_note if c["acc_test"] != "Welch t" else ""))
    return pd.DataFrame(rows)
