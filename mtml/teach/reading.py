""""Reading the results": sentences computed from a run's own numbers, so that a notebook's words
can never contradict its tables. Each function returns plain facts; `reading` joins them into the
Markdown of a notebook's last results cell."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..names import students_in

SMALL_TEST_PATIENTS = 30  # below this, patient-level metrics move in large steps


def _both(values) -> str:
    values = [f"{v:.3f}" for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _r(x) -> float:
    """The value as the reading prints it (3 decimals): every comparison uses it, so a sentence
    never says "higher" of two numbers it prints equal."""
    x = float(x)
    return round(x, 3) if np.isfinite(x) else float("nan")


def _ok(*values) -> bool:
    return all(np.isfinite(v) for v in values)


def premise(history: pd.DataFrame, metric: str) -> dict | None:
    """The teacher against each student on validation at the last epoch (3 decimals); None
    without a teacher or validation columns. `holds`: the teacher beats every student; None when
    a value is missing (NaN)."""
    last = history.iloc[-1] if len(history) else None
    col = f"val/teacher/{metric}"
    if last is None or col not in history:
        return None
    columns = {c.split("/")[1]: c for c in history if c.startswith("val/") and c.endswith(f"/{metric}")}
    students = {name: _r(last[columns[name]]) for name in students_in(columns)}
    teacher = _r(last[col])
    holds = all(teacher > v for v in students.values()) if _ok(teacher, *students.values()) else None
    return {"teacher": teacher, "students": students, "holds": holds}


def paired_spread(runs: pd.DataFrame, spec_hash, mode: str, against: str = "independent",
                  metric: str = "auroc", min_seeds: int = 3) -> dict | None:
    """The seed-to-seed spread of the ensemble difference `mode` - `against` among `runs` (a runs
    table with spec_hash, mode, seed and `ensemble/<metric>`, e.g. a committed study's runs.csv)
    whose settings equal this run's: `spec_hash(mode, seed)` gives the hash a run with this run's
    settings has, so only runs of exactly these settings count (a hash recorded twice: the last
    record). None below `min_seeds` pairs."""
    col = f"ensemble/{metric}"
    if runs is None or col not in runs or "spec_hash" not in runs:
        return None
    by_hash = runs.drop_duplicates("spec_hash", keep="last").set_index("spec_hash")[col]
    diffs = []
    for seed in sorted(set(runs.loc[runs["mode"] == mode, "seed"])):
        a, b = spec_hash(mode, int(seed)), spec_hash(against, int(seed))
        if a in by_hash.index and b in by_hash.index and _ok(by_hash[a], by_hash[b]):
            diffs.append(float(by_hash[a]) - float(by_hash[b]))
    if len(diffs) < min_seeds:
        return None
    diffs = np.array(diffs)
    return {"sd": float(diffs.std(ddof=1)), "mean": float(diffs.mean()), "seeds": len(diffs)}


def _budget(budget: dict) -> str:
    return ", ".join(f"{k}={'all' if v is None else v}" for k, v in budget.items())


def reading(metrics: pd.DataFrame, metric: str, mode: str, *, history: pd.DataFrame | None = None,
            baseline: pd.DataFrame | None = None, spread: dict | None = None,
            patients: int | None = None, unit: str = "tiles") -> str:
    """The "Reading the results" Markdown of one run: teacher vs students (validation and test),
    ensemble vs best student, the run vs its independent `baseline` (metrics of the same seed),
    that difference against the seed-to-seed `spread` (`paired_spread`, plus its `source`), and a
    warning when `patients` (test patients) are too few to separate networks. Values are compared
    as printed (3 decimals); a missing value (NaN) is said to be missing."""
    m = metrics[metric].map(_r)
    students = students_in(m.index)
    lines = _teacher_lines(m, students, history, metric, mode, unit)
    if "ensemble" in m.index and len(students) > 1 and _ok(m["ensemble"], *m[students]):
        best = max(students, key=lambda n: m[n])
        gain = _r(m["ensemble"] - m[best])
        lines.append(f"**Ensemble vs best student.** The ensemble scores {m['ensemble']:.3f}, "
                     + (f"{gain:+.3f} above its best student ({best}, {m[best]:.3f}), in this one run."
                        if gain > 0 else f"not above its best student ({best}, {m[best]:.3f}): "
                        "averaging these students did not help here."))
    if baseline is not None and mode != "independent":
        lines += _baseline_lines(m, _r(baseline.loc["ensemble", metric]), spread, metric, mode)
    return "\n\n".join(lines + _small_test_set(metrics, patients))


def _teacher_lines(m: pd.Series, students: list, history, metric: str, mode: str, unit: str) -> list[str]:
    """Teacher against students: on validation at the last epoch (distillation's premise) and on test."""
    if "teacher" not in m.index:
        return [f"**No teacher.** Mode `{mode}` trains the students without a teacher."]
    lines = []
    fact = premise(history, metric) if history is not None else None
    if fact is not None:
        losers = [n for n, v in fact["students"].items() if v >= fact["teacher"]]
        verdict = ("a value is missing (NaN), so the premise cannot be checked" if fact["holds"] is None else
                   "the teacher is the stronger network, as distillation assumes" if fact["holds"] else
                   f"the teacher does not beat {', '.join(losers)}: distillation's premise, a stronger "
                   "teacher, does not hold in this run")
        lines.append(f"**Teacher vs students.** Validation {metric} at the last epoch: teacher "
                     f"{fact['teacher']:.3f}, students {_both(fact['students'].values())}; {verdict}.")
    better = [n for n in students if m[n] >= m["teacher"]]
    verb = "matches or beats" if len(better) == 1 else "match or beat"
    lines.append(f"On the test {unit} the teacher scores {m['teacher']:.3f} and the students "
                 f"{_both(m[students])}" + (f"; {', '.join(better)} {verb} it." if better else "."))
    return lines


def _baseline_lines(m: pd.Series, base: float, spread: dict | None, metric: str, mode: str) -> list[str]:
    """The run's ensemble against the independent baseline's, and that difference against seed noise."""
    diff = _r(m["ensemble"] - base)
    if not _ok(diff):
        return [f"**Against the baseline.** Not available: an ensemble {metric} is missing (NaN)."]
    lines = [f"**Against the baseline.** Independent students of the same seed (no KD, no ML) "
             f"reach an ensemble {metric} of {base:.3f}; this run's ensemble is "
             + (f"{abs(diff):.3f} {'higher' if diff > 0 else 'lower'}." if diff else "the same to three decimals.")]
    source = (spread or {}).get("source", "")
    if spread is not None and spread.get("budget"):  # another budget: context, no verdict
        lines.append(f"**Is it more than seed noise?** Not measured at this run's budget. For scale: at "
                     f"{_budget(spread['budget'])} ({source}) the difference {mode} - independent "
                     f"varied over {spread['seeds']} seeds with a standard deviation of {spread['sd']:.3f} "
                     f"(mean {spread['mean']:+.3f}); a run with less data can vary more. One seed cannot "
                     "separate a real difference from seed noise: notebooks 04 and 08 compare over seeds.")
    elif spread is not None:
        within = abs(diff) <= 2 * spread["sd"]
        lines.append(f"**Is it more than seed noise?** Over {spread['seeds']} seeds with exactly these "
                     f"settings ({source}) the difference {mode} - independent varied with a "
                     f"standard deviation of {spread['sd']:.3f} (mean {spread['mean']:+.3f}). This run's "
                     f"{diff:+.3f} is " + ("within two standard deviations of zero: one seed cannot tell "
                     "it from noise." if within else "beyond two standard deviations, but it is still "
                     "one seed.") + " Compare modes over seeds (notebooks 04 and 08).")
    else:
        lines.append("**Is it more than seed noise?** Not measured for these settings: no runs over "
                     "several seeds share them. One seed cannot separate a real difference from seed "
                     "noise; notebooks 04 and 08 compare modes over seeds with intervals.")
    return lines


def _small_test_set(metrics: pd.DataFrame, patients: int | None) -> list[str]:
    if patients is None or patients >= SMALL_TEST_PATIENTS or "patient_accuracy" not in metrics:
        return []
    right = (metrics["patient_accuracy"] * patients).round()
    if not right.notna().all():
        return []
    right = right.astype(int)
    return [f"**A small test set.** {patients} test patients: patient accuracy moves in steps of "
            f"1/{patients} = {1 / patients:.3f}" + (f", and every network gets {right.iloc[0]} of "
            f"{patients} right, so it cannot separate them here." if right.nunique() == 1 else
            f"; the networks get {right.min()} to {right.max()} of {patients} right (a difference of one "
            "or two patients can be luck).")]


def committed_spread(study: str, knobs: dict, task_name: str, mode: str, metric: str,
                     budget_keys=("EPOCHS", "TRAIN_FRAMES", "EVAL_FRAMES")) -> dict | None:
    """`paired_spread` of `mode` against independent students among the runs of the kit's
    committed study `study` (docs/results/<study>/runs.csv) that have exactly `knobs`' settings;
    failing that, with the study's own `budget_keys` values and every other setting of `knobs`
    (then `budget` in the result names the study's values)."""
    from ..runs.parameters import spec_from_parameters
    from ..runs.study import REPO, RESULTS, Study

    path = RESULTS / study / "runs.csv"
    if mode == "independent" or not path.is_file():
        return None
    runs = pd.read_csv(path)
    tries = [{}]
    study_file = REPO / "studies" / f"{study}.yaml"
    if study_file.is_file():
        params = Study.load(study_file).params
        budget = {k: params[k] for k in budget_keys if k in params and k in knobs and params[k] != knobs[k]}
        if budget:
            tries.append(budget)
    for budget in tries:
        hash_of = lambda m, seed: spec_from_parameters(  # noqa: E731
            task_name, {**knobs, **budget, "MODE": m, "SEED": seed}).hash
        spread = paired_spread(runs, hash_of, mode, metric=metric)
        if spread is not None:
            return {**spread, "budget": budget}
    return None


def read_run(result, knobs: dict, task_name: str, *, baseline=None, study: str | None = None,
             patients: int | None = None, unit: str = "tiles") -> str:
    """`reading` of a notebook's `RunResult` in its task's main metric (and its independent
    `baseline` RunResult), with the seed spread taken from the committed `study` when it holds runs
    of exactly these settings."""
    from ..tasks import task_class

    metric, mode = task_class(task_name).metric, knobs["MODE"]
    spread = committed_spread(study, knobs, task_name, mode, metric) if study else None
    if spread is not None:
        spread["source"] = f"the kit's committed study docs/results/{study}"
    return reading(result.metrics, metric, mode, history=result.history,
                   baseline=None if baseline is None else baseline.metrics, spread=spread, patients=patients, unit=unit)


def read_verdicts(verdicts: pd.DataFrame, metric: str) -> str:
    """One sentence per claim of a verdict table (`mtml.study.verdicts`), in the study's words."""
    lines = []
    for r in verdicts.itertuples():
        if not r.seeds:
            lines.append(f"**{r.claim}:** not tested (a mode is missing).")
            continue
        boot = (f", bootstrap 95% over test units [{r.boot_lo:+.3f}, {r.boot_hi:+.3f}]"
                if np.isfinite(r.boot_lo) else "")
        if r.verdict == "confirmed":
            meaning = "positive beyond the noise of these seeds and of the test sample"
        elif r.verdict == "refuted":
            meaning = "negative beyond the noise of these seeds and of the test sample: the claim does not hold here"
        elif r.p_holm < 0.05:
            meaning = ("the seeds agree, but " + ("the bootstrap interval over the test set includes 0"
                       if np.isfinite(r.boot_lo) else "this metric has no bootstrap interval over the test set"))
        else:
            meaning = "these seeds cannot tell the modes apart"
        spread = f" (± {r.ci95:.3f}, 95% t-interval over {r.seeds} seeds" if np.isfinite(r.ci95) else \
            f" ({r.seeds} seed, no interval"
        detect = f"; only differences above about {r.detectable:.3f} were detectable" if np.isfinite(r.detectable) else ""
        lines.append(f"**{r.claim}:** {r.mean:+.3f} {metric}{spread}; Holm p {r.p_holm:.3f}{boot}): "
                     f"*{r.verdict}*, {meaning}{detect}.")
    return "\n\n".join(lines)


def read_teachers(runs: pd.DataFrame, metric: str) -> str:
    """Teacher minus the students' mean per mode, paired by seed, with its 95% t-interval over
    seeds: "ahead" or "behind" only when the interval excludes 0."""
    from ..runs.report import mean_ci

    teacher, students = f"teacher/{metric}", f"students_mean/{metric}"
    if teacher not in runs or students not in runs or runs[teacher].isna().all():
        return "**Teacher vs students.** No mode here has a teacher."
    parts, behind = [], []
    by = ["version", "mode"] if "version" in runs and runs["version"].nunique() > 1 else ["mode"]
    for key, g in runs.dropna(subset=[teacher]).groupby(by, sort=False):
        mode = " ".join(map(str, key))
        mean, half, n = mean_ci(g[teacher] - g[students])
        if not np.isfinite(half):
            parts.append(f"{mode}: {mean:+.3f} ({n} seed, no interval)")
            continue
        where = "ahead" if mean - half > 0 else "behind" if mean + half < 0 else "not separable from 0"
        parts.append(f"{mode}: {mean:+.3f} ± {half:.3f} over {n} seeds, {where}")
        behind += [mode] if where == "behind" else []
    verdict = (f" In {', '.join(behind)} the students beat their teacher: distillation's premise, a stronger "
               "teacher, does not hold there." if behind else
               " Distillation assumes a stronger teacher: only an interval above 0 shows one.")
    return ("**Teacher minus the students' mean (test, paired by seed, 95% t-interval).** "
            + "; ".join(parts) + "." + verdict)


def describe_detections(preds: dict, targets: list, thresholds: dict, frames) -> str:
    """What a detection figure shows, in words: per network, the boxes it keeps at its threshold
    on `frames` and the ground-truth polyps they find (IoU >= 0.5, one box per polyp, matched as
    the recall of the operating-point table is)."""
    from ..tasks.detection_eval import match_counts

    frames = list(frames)
    polyps = sum(len(targets[i]["boxes"]) for i in frames)
    parts = []
    for name, per_frame in preds.items():  # a NaN threshold (no validation detection) keeps no box
        counts = [match_counts(per_frame[i], targets[i], thresholds[name]) for i in frames]
        found, kept = sum(c[0] for c in counts), sum(c[1] for c in counts)
        parts.append(f"{name} keeps {kept} box{'' if kept == 1 else 'es'} and finds {found}")
    where = "this frame" if len(frames) == 1 else f"these {len(frames)} frames"
    return (f"On {where} ({polyps} polyp{'' if polyps == 1 else 's'}): "
            + "; ".join(parts) + ".")
