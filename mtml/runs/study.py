"""A study is a file: `studies/<name>.yaml` names the task, its data, a version, the modes, the
seeds, every parameter and a time budget. One command runs it, collects exactly its runs and
writes `docs/results/<name>/`:

    python -m mtml.runs.study studies/kvasir_tiny_cpu.yaml --workers 2   # runs what is missing, then reports
    python -m mtml.runs.study studies/kvasir_tiny_cpu.yaml --report      # the report only
    python -m mtml.runs.study studies/kvasir_tiny_cpu.yaml --smoke --out /tmp/s   # a tiny subset (CI)

`runs.csv` holds one row per finished run with its spec hash, and is the study's resume state:
a run whose hash is in it is never run again, so a study can be finished across sessions and
machines by committing the CSV (and `units/`, each run's test predictions for bootstrap
intervals) as it grows. `RESULTS.md` and the figures are generated from them; never edit them.
"""
from __future__ import annotations

import argparse
import fcntl
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ..cli import Parser
from ..tasks import task_class, task_names
from .parameters import (config_from_parameters, smoke_parameters, spec_from_parameters,
                         task_from_parameters, typed)
from .report import mean_ci, paired_differences, sets_in, summarise, summarise_sets

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"
CLAIMS = (("kd_ml", "kd"), ("kd_ml", "ml"), ("kd_ml", "independent"))
ALPHA, POWER = 0.05, 0.80
KEYS = {"name", "title", "task", "data", "version", "modes", "seeds", "params", "budget_minutes",
        "target_difference", "notes", "external", "claims", "reuse", "variants", "evaluate_on", "written_after_runs"}
BASE = "base"  # the variant of the study's own params
# knobs only the distillation terms read: a variant changing only these takes independent training
# from the base (same training, though not the same spec hash); any other change trains it again
DISTILLATION_KNOBS = {"TEMPERATURE", "W_KD", "W_ML", "DISTILL_WARMUP_EPOCHS", "DISTILL_WEIGHTING", "W_DISTILL_CLS",
                      "W_DISTILL_BOX", "W_DISTILL_CTR", "W_FEAT", "FEATURE_LEVELS", "TEACHER_KNOWLEDGE", "PEER_KNOWLEDGE"}
SPLIT_KNOBS = {"DATA_DIR", "SPLIT_SEED", "SPLIT_BY", "TRAIN_FRAMES", "EVAL_FRAMES"}  # never a variant: one split per study


@dataclass(frozen=True)
class Study:
    name: str
    task: str
    data: str                     # real | synthetic; "notebook" in a grid (mtml.runs.reproduce): its notebooks load the data
    version: str
    modes: tuple
    seeds: tuple
    params: dict = field(default_factory=dict)
    budget_minutes: float = 120.0
    target_difference: float = 0.02  # the difference the study should be able to detect
    title: str = ""
    notes: str = ""
    external: tuple = ()          # prepared folders every run is also tested on (mtml.external)
    claims: tuple = CLAIMS        # ((a, b), ...): "a ensemble > b ensemble", Holm over all of them
    reuse: tuple = ()             # other studies whose finished runs of this plan are taken as they are
    variants: tuple = ()          # ((name, {PARAM: value}), ...): params changed; every mode but independent runs each
    evaluate_on: str = "test"     # or "validation": the test split is never loaded (a study that chooses settings)
    written_after_runs: bool = False  # a file that reports runs made before it (no plan, budget or target beforehand)

    @classmethod
    def load(cls, path) -> "Study":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(raw) - KEYS
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a study has {sorted(KEYS)}")
        missing = {"name", "task", "data", "version", "modes", "seeds"} - set(raw)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        if raw["task"] not in task_names() or raw["data"] not in ("real", "synthetic"):
            raise ValueError(f"{path}: task must be one of {'|'.join(task_names())} and data real|synthetic")
        bad = [k for k in raw.get("params", {}) if not k.isupper() or k in ("MODE", "SEED", "VERSION")]
        if bad:
            raise ValueError(f"{path}: params {bad} are not notebook parameters (UPPER_CASE; mode, "
                             "seed and version have their own keys)")
        for key in ("modes", "seeds"):
            if len(set(raw[key])) != len(raw[key]):
                raise ValueError(f"{path}: {key} {raw[key]} repeat an entry; list each once")
        if raw["name"] != Path(path).stem:
            raise ValueError(f"{path}: name {raw['name']!r} must be the file's name {Path(path).stem!r}")
        external = raw.get("external") or []
        if not isinstance(external, list) or not all(isinstance(f, str) for f in external):
            raise ValueError(f"{path}: external must be a list of prepared data folders")
        if "claims" in raw:
            claims = tuple(tuple(c) for c in raw["claims"] or ())
            if not claims or any(len(c) != 2 or not set(c) <= set(raw["modes"]) or c[0] == c[1] for c in claims):
                raise ValueError(f"{path}: claims must be pairs [a, b] of two of the study's modes {raw['modes']}")
        else:  # the default claims whose modes the study has
            claims = tuple(c for c in CLAIMS if set(c) <= set(raw["modes"]))
        reuse = raw.get("reuse") or []
        return cls(**{**raw, "modes": tuple(raw["modes"]), "seeds": tuple(raw["seeds"]),
                      "params": raw.get("params", {}), "external": tuple(external), "claims": claims,
                      "reuse": tuple([reuse] if isinstance(reuse, str) else reuse),
                      "variants": _variants(path, raw), "evaluate_on": _evaluate_on(path, raw)})

    @property
    def metric(self) -> str:
        return task_class(self.task).metric

    def parameters(self, mode: str, seed: int, smoke: bool = False, change: dict | None = None) -> dict:
        params = {**self.params, **(change or {}), "VERSION": self.version, "MODE": mode, "SEED": seed}
        return typed(smoke_parameters(self.task, params) if smoke else params)

    def planned(self, smoke: bool = False, smoke_seeds: int | None = 2) -> list[dict]:
        """Every run's parameters: each mode and seed at the study's params, then (a study with
        variants) each variant's runs: every mode, but independent only when the change is not
        limited to DISTILLATION_KNOBS. A variant's runs carry its name under the lower-case key
        "variant", which no run identity reads. See `plan` for one entry per run identity.
        A smoke plan keeps the first `smoke_seeds` seeds (None: all)."""
        seeds = self.seeds[:smoke_seeds] if smoke else self.seeds
        runs = [self.parameters(mode, seed, smoke) for seed in seeds for mode in self.modes]
        for name, change in self.variants:
            modes = [m for m in self.modes if m != "independent" or not set(change) <= DISTILLATION_KNOBS]
            runs += [{**self.parameters(mode, seed, smoke, change), "variant": name} for seed in seeds for mode in modes]
        return runs

    def plan(self, smoke: bool = False) -> dict:
        """{spec hash: parameters}, one entry per run identity: a variant's run that is the same
        computation as an earlier one (kd_ml when a variant changes only W_FEAT) is that run."""
        plan: dict = {}
        for params in self.planned(smoke):
            plan.setdefault(spec_from_parameters(self.task, params).hash, params)
        return plan

    @property
    def split(self) -> str:
        """The split every run is tested on: "test", or "validation" for a study that chooses settings."""
        return self.evaluate_on


def _variants(path, raw: dict) -> tuple:
    """The study file's `variants:` ({name: {PARAM: value}}) as ((name, change), ...), checked."""
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(c, dict) and c for c in variants.values()):
        raise ValueError(f"{path}: variants must map a name to the parameters it changes, e.g. {{'tau 2': {{'TEMPERATURE': 2.0}}}}")
    bad = [k for change in variants.values() for k in change
           if not k.isupper() or k in ("MODE", "SEED", "VERSION") or k in SPLIT_KNOBS]
    if bad or BASE in variants:
        raise ValueError(f"{path}: variants change notebook parameters (UPPER_CASE, not MODE, SEED, VERSION or the "
                         f"split's {sorted(SPLIT_KNOBS)}) and none is named {BASE!r} (the study's own params): {bad or BASE}")
    return tuple((str(name), dict(change)) for name, change in variants.items())


def _evaluate_on(path, raw: dict) -> str:
    where = raw.get("evaluate_on", "test")
    if where not in ("test", "validation"):
        raise ValueError(f"{path}: evaluate_on must be test or validation, got {where!r}")
    return where


# data ------------------------------------------------------------------------------------------
_DATA: dict = {}


def load_data(study: Study, params: dict):
    """(train, val, test, description, augment) for a run's parameters, cached per process (every
    run of a study sees the same data); the networks come from the task."""
    key = (study.task, params.get("DATA_DIR"), params.get("FRAME_SIZE"), params.get("TILE_SIZE"),
           params.get("TRAIN_FRAMES"), params.get("EVAL_FRAMES"), params.get("SPLIT_SEED"), params.get("SPLIT_BY"),
           study.split)
    if key not in _DATA:  # a validation study never loads a test item
        _DATA[key] = task_class(study.task).load_splits(params, study.data, f"study {study.name}",
                                                         with_test=study.split == "test")
    return _DATA[key]


def external_sets(study: Study, task, params: dict) -> dict:
    """The study's external sets (`mtml.external.load_sets`), loaded once per process."""
    from .external import load_sets

    key = ("external", study.external, getattr(task, "size", None), params.get("TILE_SIZE"))
    if key not in _DATA:
        _DATA[key] = load_sets(task, [Path(f) if Path(f).is_absolute() else REPO / f for f in study.external],
                               params.get("TILE_SIZE", 224))
    return _DATA[key]


# one run ---------------------------------------------------------------------------------------
def run_one(study: Study, params: dict, threads: int = 1) -> tuple[dict, pd.DataFrame]:
    """Trains and tests one run: its record (metrics on the test split, the operating point chosen
    on validation for detection, the students' diversity, the ensemble gain) and its test units."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_and_record(study, params, threads)
    finally:
        torch.set_num_threads(before)  # a caller's own setting (a test, a notebook) stays as it was


def _train_and_record(study: Study, params: dict, threads: int) -> tuple[dict, pd.DataFrame]:
    import torch

    from ..core.cohort import deterministic_cuda
    from .experiment import RunOptions, run_cohort

    train, val, test, label, augment = load_data(study, params)
    task = task_from_parameters(study.task, params)
    spec = spec_from_parameters(study.task, params)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_cohort(config_from_parameters(params, study.task), task, train, val, test, spec=spec,
                        options=RunOptions(device, augment or task.augment, progress=False,
                                           external=external_sets(study, task, params)))
    row = result.record(data=label, train_time_s=round(time.perf_counter() - start, 1),
                        commit=current_commit(), machine=machine_label(threads))
    row = {k: v for k, v in row.items() if not k.startswith("task.wbf")}
    if study.variants:
        row["variant"] = params.get("variant", BASE)
    if study.split != "test":
        row["evaluated_on"] = study.split
    with deterministic_cuda(device == "cuda"):  # its forwards, as the run's
        extra, units = task.study_record(result, val, test if test is not None else val)
    row.update(extra)
    row["ensemble_gain"] = row[f"ensemble/{study.metric}"] - row[f"students_mean/{study.metric}"]
    return row, units


def current_commit() -> str:
    """HEAD's short hash, with "+changes" when tracked files differ from it (the run used code
    that no commit holds as it was)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mtml", "notebooks"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def code_changes(commits, repo=REPO) -> str:
    """How `mtml/` differs between the oldest and newest of `commits` (git's shortstat), since a
    spec hash covers settings and data, not code, and how many runs used uncommitted code ("+changes",
    which no commit holds); "" for one clean commit."""
    recorded = [c for c in commits if isinstance(c, str) and c.strip() and c != "unknown"]
    dirty = sum(c.endswith("+changes") for c in recorded)
    uncommitted = (f"; {dirty} run(s) from uncommitted changes, not compared" if dirty else "") + (
        f"; {len(commits) - len(recorded)} run(s) without a recorded commit" if len(recorded) < len(commits) else "")
    found = sorted({c.removesuffix("+changes") for c in recorded})
    if len(found) < 2:
        return uncommitted
    dated = subprocess.run(["git", "log", "--no-walk=sorted", "--format=%h", *found], cwd=repo,
                           capture_output=True, text=True)
    order = dated.stdout.split()
    if dated.returncode or len(order) != len(found):
        return "; mtml/ between them not compared (a commit is not in this checkout)" + uncommitted
    stat = subprocess.run(["git", "diff", "--shortstat", order[-1], order[0], "--", "mtml"], cwd=repo,
                          capture_output=True, text=True).stdout.strip()
    return f"; mtml/ from {order[-1]} to {order[0]}: {stat or 'unchanged'} (a spec hash does not cover code){uncommitted}"


def machine_label(threads: int) -> str:
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {threads} torch thread(s) per run"
    return f"{platform.machine()}, {os.cpu_count()} cores, {where}"


# state -----------------------------------------------------------------------------------------
def read_runs(out: Path) -> pd.DataFrame:
    csv = out / "runs.csv"
    return pd.read_csv(csv, dtype={"spec_hash": str}) if csv.is_file() else pd.DataFrame({"spec_hash": []})


def done_hashes(out: Path) -> set:
    return set(read_runs(out)["spec_hash"])


def append(out: Path, row: dict, units: pd.DataFrame) -> None:
    """Adds a finished run: its units first, then its row (so a row always has its units)."""
    (out / "units").mkdir(parents=True, exist_ok=True)
    units.to_csv(out / "units" / f"{row['spec_hash']}.csv.gz", index=False,
                 compression={"method": "gzip", "mtime": 0})
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        csv, table = out / "runs.csv", read_runs(out)
        if row["spec_hash"] in set(table["spec_hash"]):  # another worker or command finished it
            return
        table = pd.concat([table, pd.DataFrame([row])]) if len(table) else pd.DataFrame([row])
        tmp = csv.with_suffix(".tmp")
        table.to_csv(tmp, index=False)
        os.replace(tmp, csv)


def adopt(study: Study, out: Path) -> int:
    """Takes the finished runs of the studies in `study.reuse` whose spec hash this study plans
    (the same run identity: the same computation) into `out`, with their test units; returns how
    many were taken; a run tested on another split (a validation study's) is not taken. They
    carry only the sets they were tested on: a study that names `external`
    sets trains its runs itself or tests reused ones with `python -m mtml.runs.external`."""
    planned = set(study.plan())
    taken = 0
    for other in study.reuse:
        source = RESULTS / other
        if not (source / "runs.csv").is_file():
            raise FileNotFoundError(f"study {study.name} reuses {other!r}, but {source / 'runs.csv'} does not exist: "
                                    "check the name under reuse:")
        table = read_runs(source)
        for row in table[table["spec_hash"].isin(planned - done_hashes(out))].to_dict("records"):
            tested_on = row.get("evaluated_on", row.get("split_evaluated"))  # the first ablation's column name
            tested_on = {"val": "validation"}.get(tested_on, tested_on if isinstance(tested_on, str) else "test")
            if tested_on != study.split:  # same training, tested on another split
                continue
            units_file = source / "units" / f"{row['spec_hash']}.csv.gz"
            if not units_file.is_file():  # a row without its test units cannot enter the report
                print(f"not taken from {other}: run {row['spec_hash']} has no {units_file.name}", file=sys.stderr)
                continue
            units = pd.read_csv(units_file)
            append(out, {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}, units)
            taken += 1
    return taken


# heaviest first, so that no worker is left with the long runs at the end (measured per run on
# 2 CPU cores, detection: independent and ml about 140 s, kd and kd_ml about 300 s; offline
# pre-trains its teacher first)
HEAVIEST_FIRST = ("offline", "kd_ml_styles", "kd_ml", "kd", "ml", "independent")


def queue(runs: list[dict]) -> list[dict]:
    """The planned runs in the order workers take them: heaviest mode first, then by seed."""
    rank = {mode: i for i, mode in enumerate(HEAVIEST_FIRST)}
    return sorted(runs, key=lambda p: (rank.get(p["MODE"], -1), p["SEED"]))  # unknown modes: first


def claim(claims: Path | None, spec_hash: str) -> bool:
    """True for the one worker that takes this run: an atomic create in `claims`, the folder one
    invocation's workers share (None: a single worker, which takes every run)."""
    if claims is None:
        return True
    claims.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(claims / spec_hash, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def worker_threads(workers: int) -> int:
    """Torch threads of each of `workers`: on a CPU machine one each (the cores run the runs side by
    side), or every core a single worker has (taskset-aware); on GPUs, the cores shared out."""
    import torch

    cores = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        return max(1, cores // workers)
    return 1 if workers > 1 else cores


def worker_gpus(asked: int, gpus: int, visible: str | None = None) -> list[str] | None:
    """The GPU each worker of an invocation gets (CUDA_VISIBLE_DEVICES), or None on a CPU machine:
    one worker per GPU, at most `asked`, since processes sharing one GPU only take turns on it
    (five tiny detection runs on one H200 took 3 to 5 minutes each, no faster than a CPU core)."""
    if gpus == 0:
        return None
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else [str(i) for i in range(gpus)]
    return ids[:max(1, min(asked, gpus, len(ids)))]


def run_study(study: Study, out: Path, smoke: bool = False, worker: int = 0, workers: int = 1,
              claims: Path | None = None) -> int:
    """Takes missing runs from the queue until none is left; returns how many failed. The workers
    of one invocation share `claims` (`main` gives each invocation its own folder)."""
    runs = queue([{**params, "spec_hash": h} for h, params in study.plan(smoke).items()])  # lower case: no knob
    failed = 0
    for i, params in enumerate(runs):
        spec_hash = params["spec_hash"]
        if spec_hash in done_hashes(out) or not claim(claims, spec_hash):
            continue
        what = f"[{worker}] {i + 1}/{len(runs)} {params['MODE']} seed {params['SEED']}" + (
            f" ({params['variant']})" if "variant" in params else "")
        try:
            row, units = run_one(study, params, threads=worker_threads(workers))
        except Exception as err:  # one failed run never stops the study; it is listed and retried
            failed += 1
            print(f"{what}: FAILED {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            continue
        append(out, row, units)
        print(f"{what}: ensemble {study.metric} {row[f'ensemble/{study.metric}']:.3f} "
              f"({row['train_time_s']:.0f} s)", flush=True)
    return failed


# report ----------------------------------------------------------------------------------------
def study_runs(study: Study, out: Path, smoke: bool = False) -> tuple[pd.DataFrame, dict, list]:
    """Exactly this study's finished runs (rows whose hash a planned run has), their test units
    keyed (version, mode, seed), and the planned runs still missing. A study with variants labels
    each row with the variant the plan gives its hash (the base, for a run the base shares)."""
    planned = study.plan(smoke)
    table = read_runs(out)
    runs = table[table["spec_hash"].isin(planned)].reset_index(drop=True)
    if study.variants:
        runs["variant"] = [planned[h].get("variant", BASE) for h in runs["spec_hash"]]
    if len(table) and runs.empty:
        first = spec_from_parameters(study.task, next(iter(planned.values())))
        stored = table.iloc[0]
        differ = sorted(k for k, v in first.flat().items() if k in stored and str(stored[k]) != str(v))
        raise ValueError(f"{out / 'runs.csv'} holds {len(table)} runs, none of this study's plan on this "
                         f"machine (first differing settings: {differ[:5] or 'the data fingerprint'}); "
                         "nothing was overwritten: check the data and the study file")
    missing = [p for h, p in planned.items() if h not in set(runs["spec_hash"])]
    base = runs[runs["variant"] == BASE] if study.variants else runs  # the verdicts use the base runs
    legacy = base["commit"].isna() if "commit" in base else pd.Series(True, index=base.index)
    units = {}
    for r, old in zip(base.itertuples(), legacy):
        f = out / "units" / f"{r.spec_hash}.csv.gz"
        if f.is_file():
            units[(r.version, r.mode, r.seed)] = pd.read_csv(f)
        elif not old:  # every run since units exist writes them before its row: a missing file is damage
            raise FileNotFoundError(f"{f} is missing: run {r.spec_hash} cannot enter the report without its test "
                                    "units; restore it (git checkout) or remove the run's row to run it again")
    return runs, units, missing


def detectable_difference(differences, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean paired difference a two-sided paired t-test at `alpha` detects with
    probability `power` (exact: the noncentral t's tails, integrated over the chi-square of the
    spread), taking the observed spread of the differences as the true one, for their number."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    d = np.asarray(differences, float)
    n = len(d)
    if n < 2:
        return math.nan
    sd, df = d.std(ddof=1), n - 1
    if sd == 0:
        return 0.0
    crit, norm, chi2 = scipy_stats.t.ppf(1 - alpha / 2, df), scipy_stats.norm, scipy_stats.chi2

    def shortfall(nc):  # P(|T| > crit) - power, T noncentral t with df and nc
        tails = lambda v: (norm.sf(crit * math.sqrt(v / df) - nc)  # noqa: E731
                           + norm.cdf(-crit * math.sqrt(v / df) - nc)) * chi2.pdf(v, df)
        return quad(tails, 0, math.inf)[0] - power

    high = 4.0
    while shortfall(high) < 0:
        high *= 2
    return float(brentq(shortfall, 0.0, high, xtol=1e-10) * sd / math.sqrt(n))


def verdicts(runs: pd.DataFrame, metric: str, units: dict | None, claims=CLAIMS) -> pd.DataFrame:
    """One row per claim "a ensemble > b ensemble" (all of them, whether or not its runs exist;
    by default kd_ml against kd, ml and independent): paired mean difference over seeds, its 95%
    t-interval, the paired t-test p adjusted by Holm over the k claims (a claim without a p counts
    as p = 1), the 95% bootstrap interval over test units, the detectable difference at the
    Bonferroni level 0.05 / k (a bound for Holm), and the verdict: confirmed when the difference is positive, p_holm < 0.05 and the
    bootstrap interval lies above 0; refuted when negative by the same rule; else inconclusive
    (also whenever there is no bootstrap interval)."""
    from .stats import holm

    present = [c for c in claims if {c[0], c[1]} <= set(runs["mode"])]
    table = paired_differences(runs, metric, "ensemble", units, pairs=present) if present else pd.DataFrame()
    found = {(r["a"], r["b"]): r for r in table.to_dict("records")}
    wide = runs.pivot(index="seed", columns="mode", values=f"ensemble/{metric}")
    p = [found[c]["p_value"] if c in found and np.isfinite(found[c]["p_value"]) else 1.0 for c in claims]
    rows = []
    for claim, p_holm in zip(claims, holm(p)):
        r = found.get(claim, {})
        mean = r.get("mean(ensemble a-b)", math.nan)
        lo, hi = r.get("boot_lo", math.nan), r.get("boot_hi", math.nan)
        if p_holm < ALPHA and mean > 0 and lo > 0:
            verdict = "confirmed"
        elif p_holm < ALPHA and mean < 0 and hi < 0:
            verdict = "refuted"
        else:
            verdict = "inconclusive"
        d = (wide[claim[0]] - wide[claim[1]]).dropna() if claim in found else []
        rows.append({"claim": f"{claim[0]} ensemble > {claim[1]} ensemble", "seeds": r.get("seeds", 0),
                     "mean": mean, "ci95": r.get("ci95", math.nan), "p_holm": p_holm, "boot_lo": lo,
                     "boot_hi": hi, "detectable": detectable_difference(d, ALPHA / len(claims)),
                     "verdict": verdict})
    return pd.DataFrame(rows)


def _holm_phrase(n: int) -> str:
    if n == 1:
        return "p of the paired t-test (one claim: Holm leaves it as it is)"
    return f"p of the paired t-test, Holm-adjusted over the {({2: 'two', 3: 'three'}).get(n, str(n))} claims"


def _interval(lo, hi, sign="") -> str:
    return f"[{lo:{sign}.3f}, {hi:{sign}.3f}]" if np.isfinite(lo) and np.isfinite(hi) else "-"  # no units, no bootstrap


def _pm(mean, half, digits=3, sign="") -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:{sign}.{digits}f}" + (f" ± {half:.{digits}f}" if np.isfinite(half) else "")


def write_results(study: Study, out: Path, smoke: bool = False, costs: pd.DataFrame | None = None,
                  hygiene: dict | None = None) -> Path:
    """RESULTS.md, results.csv (one row per mode), verdicts.csv and the figures, from runs.csv and units/."""
    import matplotlib

    matplotlib.use("Agg")
    everything, units, missing = study_runs(study, out, smoke)
    runs = everything[everything["variant"] == BASE] if study.variants and len(everything) else everything
    title = study.title or study.name
    head = [f"# {title}" + (" (SYNTHETIC data)" if study.data == "synthetic" and "SYNTHETIC" not in title else ""), "",
            f"Generated by `python -m mtml.runs.study studies/{study.name}.yaml{' --smoke' if smoke else ''}` "
            f"from `runs.csv`{' and `units/`' if units else ''}; do not edit.", ""]
    if runs.empty:
        (out / "RESULTS.md").write_text("\n".join(head + ["No finished runs yet."]) + "\n")
        return out / "RESULTS.md"
    runs = runs.assign(order=runs["mode"].map(study.modes.index)).sort_values(["order", "seed"]).drop(columns="order")
    summary = summarise(runs, study.metric, units)
    summary = summary.set_index("mode").loc[[m for m in study.modes if m in set(runs["mode"])]].reset_index()
    summary.to_csv(out / "results.csv", index=False, float_format="%.6g")
    decided = verdicts(runs, study.metric, units, study.claims)
    decided.to_csv(out / "verdicts.csv", index=False, float_format="%.6g")
    base_missing = sum(p.get("variant", BASE) == BASE for p in missing)
    lines = head + _about(study, everything, missing, smoke) + _verdict_lines(study, decided, len(runs), base_missing, bool(units))
    lines += _mode_lines(runs, summary, study.metric, study.split)
    if study.variants:
        lines += _variant_lines(study, everything, out)
    if costs is not None:
        lines += _cost_lines(costs, getattr(task_class(study.task), "item", "item"))
    if sets_in(runs.columns):
        lines += _external_lines(runs, study.metric, out)
    if hygiene:
        lines += ["", "## Split hygiene", ""] + [f"- {k}: {v}" for k, v in hygiene.items()]
    lines += ["", "## Figures", ""]
    for name, draw in _figures(out, runs, summary, costs, study.metric, study.split).items():
        lines.append(f"- `{name}`: {draw}")
    if missing:
        lines += ["", "## Missing runs", "", *[f"- {p['MODE']} seed {p['SEED']}" + (f" ({p['variant']})" if "variant" in p
                                                                                  else "") for p in missing],
                  "", "Run the command again to add them; finished runs are never re-run."]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    return out / "RESULTS.md"


def _about(study: Study, runs: pd.DataFrame, missing: list, smoke: bool) -> list[str]:
    """The report's first block: data, task, seeds, code, machine, time, parameters, notes."""
    data = re.sub(r"/\S*/(?=[^/\s()]+)", "", str(runs["data"].iloc[0]))  # no local folders
    if "data.manifest_sha256" in runs:
        data += f"; manifest sha256 {runs['data.manifest_sha256'].iloc[0]}"
    used = {k: v for k, v in study.parameters(study.modes[0], study.seeds[0], smoke).items()
            if k not in ("MODE", "SEED", "VERSION")}
    recorded = runs.reindex(columns=["commit", "machine"])  # runs before 2026-11-29 recorded neither
    commits = ", ".join(sorted(set(recorded["commit"].dropna().astype(str)))) or "not recorded"
    machines = "; ".join(sorted(set(recorded["machine"].dropna().astype(str)))) or "not recorded"
    lines = [
        f"- data: {data}", f"- task: {study.task}, version {study.version}; metric: {study.metric} of the student "
        f"ensemble on the {study.split.upper()} split, each run tested once"
        + ("" if study.split == "test" else " (the test split is never loaded)")
        + ("; the study file was written after its runs, to report them" if study.written_after_runs
           else "; every parameter fixed in the study file beforehand"),
        f"- seeds: {', '.join(map(str, sorted(set(runs['seed']))))}; runs: {len(runs)} of "
        f"{len(runs) + len(missing)} planned" + (f" (MISSING: {len(missing)})" if missing else ""),
        f"- code: commit(s) {commits}{code_changes(list(recorded['commit']))}; machine: {machines}",
        f"- time: {runs['train_time_s'].sum() / 60:.0f} min of training and testing summed over the runs' own "
        "clocks (parallel workers overlap, so the wall time is shorter)"
        + ("" if study.written_after_runs else f"; budget: {study.budget_minutes:.0f} min of wall time"),
        f"- parameters: {', '.join(f'{k}={v}' for k, v in sorted(used.items()))}", ""]
    return lines + ([study.notes.strip(), ""] if study.notes else [])


def _verdict_lines(study: Study, decided: pd.DataFrame, done: int, missing: int, with_units: bool = True) -> list[str]:
    """The claims' table, with how it was computed and the verdict rule."""
    too_coarse = decided["detectable"].gt(study.target_difference).any() or decided["detectable"].isna().any()
    lines = ["## Verdicts" + (f" (PROVISIONAL: {done} of {done + missing} runs)" if missing else "")
             + ("" if study.split == "test" else " on validation: for choosing settings, not findings"), "",
             f"Paired by seed; mean difference of the ensembles' {study.metric} with its 95% t-interval over seeds; "
             f"{_holm_phrase(len(study.claims))}; the 95% bootstrap "
             f"interval over {study.split} {getattr(task_class(study.task), 'bootstrap_unit', 'units')} (one shared "
             f"resampling of the {study.split} set, the networks fixed); detectable: the smallest true difference a "
             f"paired t-test at alpha 0.05 / {len(study.claims)} "
             "finds with power 0.8 given the observed spread and number of seeds. Confirmed: positive, "
             "p_holm < 0.05 and a bootstrap interval above 0; refuted: negative by the same rule; otherwise "
             "inconclusive." + ("" if study.written_after_runs else f" The study aimed to detect {study.target_difference}"
                                + (": it cannot for every claim (more seeds needed)." if too_coarse else ", and can for every claim."))
             + (" No run kept its per-item predictions (`units/`): there is no bootstrap interval, so by this rule "
                "every claim is inconclusive." if not with_units else ""), "",
             "| claim | seeds | difference | p (Holm) | bootstrap 95% | detectable | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in decided.itertuples():
        lines.append(f"| {r.claim} | {r.seeds} | {_pm(r.mean, r.ci95)} | {r.p_holm:.3f} | "
                     f"{_interval(r.boot_lo, r.boot_hi, '+')} | {r.detectable:.3f} | **{r.verdict}** |")
    return lines


def _mode_lines(runs: pd.DataFrame, summary: pd.DataFrame, metric: str, split: str = "test") -> list[str]:
    """One row per mode: teacher, students, ensemble (with its bootstrap), operating point, gain, diversity, time."""
    per_mode = runs.groupby("mode", sort=False)
    extra = {col: {m: mean_ci(g[col]) for m, g in per_mode}
             for col in ("ensemble/op_f1", "ensemble/op_precision", "ensemble/op_recall", "diversity/disagreement",
                         "diversity/kl", "ensemble_gain", "train_time_s") if col in runs}
    lines = ["", "## Every mode", "", f"{split.capitalize()} {metric}, mean ± 95% t-interval over seeds; the ensemble's "
             f"bootstrap interval over the {split} set; ensemble gain = ensemble minus the students' mean; "
             "diversity between the students (see `mtml.diversity`).", ""]
    cols = ["mode", "seeds", "teacher", "students' mean", "ensemble", "ensemble bootstrap"]
    op = "ensemble/op_f1" in extra
    cols += (["ensemble F1 at val operating point", "precision", "recall"] if op else [])
    cols += ["ensemble gain", "disagreement", "KL", "minutes per run"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary.itertuples():
        cells = [r.mode, str(r.seeds), _pm(getattr(r, "teacher_mean", math.nan), getattr(r, "teacher_ci95", math.nan)),
                 _pm(r.students_mean_mean, r.students_mean_ci95), _pm(r.ensemble_mean, r.ensemble_ci95),
                 _interval(r.ensemble_boot_lo, r.ensemble_boot_hi)]
        cell = lambda col, digits=3: _pm(*extra[col][r.mode][:2], digits=digits) if col in extra else "-"  # noqa: E731
        if op:
            cells += [cell(c) for c in ("ensemble/op_f1", "ensemble/op_precision", "ensemble/op_recall")]
        cells += [cell("ensemble_gain"), cell("diversity/disagreement"), cell("diversity/kl", digits=4),
                  f"{extra['train_time_s'][r.mode][0] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _variant_lines(study: Study, runs: pd.DataFrame, out: Path) -> list[str]:
    """A study with variants: each variant's ensemble per mode and its difference from the base
    run of the same mode and seed, then the study's claims within each variant, where a mode the
    variant leaves as it is (independent; a run whose identity the change does not touch) is the
    base's run; variants.csv holds the numbers."""
    metric, rows = f"ensemble/{study.metric}", []
    base = runs[runs["variant"] == BASE].set_index(["mode", "seed"])[metric]
    for name, change in [(BASE, {}), *study.variants]:
        for mode in study.modes:
            g = runs[(runs["variant"] == name) & (runs["mode"] == mode)]
            if g.empty:
                continue
            m, h, n = mean_ci(g[metric])
            sm, sh, _ = mean_ci(g[f"students_mean/{study.metric}"])
            dm, dh, dn = mean_ci((g.set_index(["mode", "seed"])[metric] - base).dropna()) if name != BASE else (math.nan,) * 3
            rows.append({"variant": name, "change": ", ".join(f"{k}={v}" for k, v in change.items()) or "-",
                         "mode": mode, "seeds": n, "ensemble": m, "ensemble_ci95": h, "students_mean": sm,
                         "students_mean_ci95": sh, "minus_base": dm, "minus_base_ci95": dh, "pairs": dn})
    table = pd.DataFrame(rows)
    table.to_csv(out / "variants.csv", index=False, float_format="%.6g")
    word = lambda r: ("higher" if r.minus_base - r.minus_base_ci95 > 0 else "lower" if r.minus_base + r.minus_base_ci95 < 0  # noqa: E731
                      else "not separated") if np.isfinite(r.minus_base_ci95) else "-"
    lines = ["", "## Variants", "", "Each variant changes the study's params as listed and runs every mode; "
             "independent only when the change is more than distillation settings (which independent training "
             "does not read: otherwise the base's independent runs stand in), and a run that is the same "
             "computation as the base's (same run identity) is the base's run. "
             f"{study.split.capitalize()} {study.metric} of the student ensemble, mean ± 95% t-interval over "
             "seeds; variant - base: paired by seed with the base run of the same mode, its 95% t-interval; higher or "
             "lower when that interval lies above or below 0 (each interval on its own: with many variants and modes, "
             "one such interval is expected by chance).", "",
             "| variant | change | mode | seeds | ensemble | students' mean | variant - base (paired) | |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.variant} | {r.change} | {r.mode} | {r.seeds} | {_pm(r.ensemble, r.ensemble_ci95)} | "
                     f"{_pm(r.students_mean, r.students_mean_ci95)} | {_pm(r.minus_base, r.minus_base_ci95, sign='+')} | {word(r)} |")
    lines += ["", f"The study's claims within each variant (paired by seed; {study.split} ensemble {study.metric}; "
              "a mode the variant does not change: the base's runs):", "",
              "| variant | " + " | ".join(f"{a} - {b}" for a, b in study.claims) + " |",
              "|---|" + "---|" * len(study.claims)]
    for name, _ in [(BASE, {}), *study.variants]:
        own = runs[runs["variant"] == name]
        kept = runs[(runs["variant"] == BASE) & ~runs["mode"].isin(own["mode"])]
        wide = pd.concat([own, kept]).pivot(index="seed", columns="mode", values=metric)
        cells = [_pm(*mean_ci((wide[a] - wide[b]).dropna())[:2], sign="+") if {a, b} <= set(wide) else "-"
                 for a, b in study.claims]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _cost_lines(costs: pd.DataFrame, item: str) -> list[str]:
    lines = ["", "## What compression buys", "", f"Per {item} "
             f"at batch 1, CPU, {int(costs['threads'].iloc[0])} torch thread ({costs['machine'].iloc[0]}; median "
             "of timed forwards; FLOPs of matmuls and convolutions from torch.utils.flop_counter):", "",
             "| model | parameters | GFLOPs | latency ms (IQR) |", "|---|---|---|---|"]
    for who, c in costs.iterrows():
        lines.append(f"| {who} | {int(c['params']):,} | {c['flops'] / 1e9:.3f} | "
                     f"{c['latency_ms']:.1f} ({c['latency_iqr_ms']:.1f}) |")
    return lines


def _external_lines(runs: pd.DataFrame, metric: str, out: Path) -> list[str]:
    per_set = summarise_sets(runs, metric)
    per_set.to_csv(out / "results_external.csv", index=False, float_format="%.6g")
    lines = ["", "## External test sets", "", f"The same networks tested on other data (`external` in the "
             f"study file; test: the runs' own test split). {metric}, mean ± 95% t-interval over seeds.", "",
             "| set | mode | seeds | teacher | students' mean | ensemble |", "|---|---|---|---|---|---|"]
    for r in per_set.itertuples():
        lines.append(f"| {r.eval_set} | {r.mode} | {r.seeds} | "
                     f"{_pm(getattr(r, 'teacher_mean', math.nan), getattr(r, 'teacher_ci95', math.nan))} | "
                     f"{_pm(r.students_mean_mean, r.students_mean_ci95)} | {_pm(r.ensemble_mean, r.ensemble_ci95)} |")
    return lines


def _figures(out: Path, runs, summary, costs, metric, split: str = "test") -> dict:
    import matplotlib.pyplot as plt

    from .figures import plot_accuracy_vs_cost

    from ..io import save_figure

    made = {}
    if "diversity/disagreement" in runs:  # a task's study_record may not measure diversity
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, g in runs.groupby("mode", sort=False):
            ax.scatter(g["diversity/disagreement"], g["ensemble_gain"], label=mode)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel=f"disagreement between students ({split})", ylabel=f"ensemble gain ({metric})",
               title="Ensemble gain against the students' diversity (one point per run)")
        ax.legend()
        made["gain_vs_diversity.png"] = (fig, "ensemble gain against the students' disagreement, per run")
    fig, ax = plt.subplots(figsize=(6, 4))
    modes = list(runs["mode"].unique())
    wide = runs.pivot(index="seed", columns="mode", values=f"ensemble/{metric}")[modes]
    for i, (seed, values) in enumerate(wide.iterrows()):  # one line per seed: the pairing the verdicts rest on
        ax.plot(range(len(modes)), values.to_numpy(), marker="o", color=f"C{i}", lw=1, label=f"seed {seed}")
    ax.set_xticks(range(len(modes)), modes)
    ax.set(ylabel=f"ensemble {metric} ({split})", title="Every run, one line per seed")
    ax.legend(fontsize=7)
    made["ensemble_by_mode.png"] = (fig, f"each run's ensemble {metric} by mode, one line per seed (the pairing)")
    if costs is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_accuracy_vs_cost(summary, costs, metric, ax=ax)
        made["accuracy_vs_cost.png"] = (fig, f"{metric} against CPU latency per frame/tile, per mode")
    for name, (fig, _) in made.items():
        save_figure(fig, out / name)
        plt.close(fig)
    return {name: text for name, (_, text) in made.items()}


def measure_costs(study: Study, out: Path, smoke: bool) -> pd.DataFrame | None:
    """costs.csv, measured once per study (kept, so a report regenerates identical tables)."""
    from .costs import network_costs

    params = study.parameters(study.modes[0], study.seeds[0], smoke)
    task = task_class(study.task)
    size = params.get(task.size_parameter)
    setting = f"{study.task} {study.version} size {size} students {int(params.get('N_STUDENTS', 2))}"
    revision = getattr(task, "network_revision", lambda version: None)(study.version)
    if revision:  # the tiny widths changed once (mtml.models)
        setting += " widths " + revision
    path = out / "costs.csv"
    if path.is_file():
        kept = pd.read_csv(path, index_col=0)
        if "setting" in kept and kept["setting"].iloc[0] == setting:
            return kept
    costs = network_costs(study.task, study.version, int(params.get("N_STUDENTS", 2)), size=size,
                          repeats=5 if smoke else 50)
    costs = costs.assign(setting=setting, machine=machine_label(int(costs["threads"].iloc[0])).split(", CPU")[0])
    costs.to_csv(path, float_format="%.6g")
    return costs


def split_hygiene(study: Study, smoke: bool) -> dict | None:
    measure = getattr(task_class(study.task), "split_hygiene", None)
    if measure is None or study.data != "real":
        return None
    return measure(study.parameters(study.modes[0], 0, smoke))


def committed(name: str) -> dict:
    """The kit's committed results of study `name` (docs/results/<name>/), for the notebooks:
    {"folder", "about" (RESULTS.md's header lines), "verdicts", "modes" (the per-mode table)}."""
    folder = RESULTS / name
    if not (folder / "verdicts.csv").is_file():
        raise FileNotFoundError(f"no committed results in {folder}: python -m mtml.runs.study studies/{name}.yaml")
    text = (folder / "RESULTS.md").read_text().splitlines()
    about = [line for line in text[:text.index("## Verdicts")] if line.startswith(("#", "-"))]
    return {"folder": folder, "about": "\n".join(about), "verdicts": pd.read_csv(folder / "verdicts.csv"),
            "modes": pd.read_csv(folder / "results.csv")}


def main(argv=None) -> int:
    p = Parser(prog="python -m mtml.runs.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study file, e.g. studies/kvasir_tiny_cpu.yaml")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at once: on CPUs one torch thread each; with GPUs at most one per GPU")
    p.add_argument("--report", action="store_true", help="write the results only, run nothing")
    p.add_argument("--smoke", action="store_true", help="2 seeds at the notebooks' smoke caps (CI)")
    p.add_argument("--out", help="results folder (default docs/results/<name>; --smoke needs one)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--claims", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    study = Study.load(args.study)  # a bad study file: one line, exit 2 (mtml.cli)
    if args.smoke and not args.out:
        p.error("--smoke writes a tiny study: give --out FOLDER (the committed results stay as they are)")
    out = Path(args.out) if args.out else RESULTS / study.name
    out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        claims = Path(args.claims) if args.claims else None
        return 1 if run_study(study, out, args.smoke, args.worker, args.workers, claims) else 0
    failed = 0
    start = time.perf_counter()
    if not args.report and not args.smoke and study.reuse:
        print(f"taken from {', '.join(study.reuse)}: {adopt(study, out)} finished run(s) of this plan")
    if not args.report:
        import torch

        from ..core.cohort import CUBLAS_WORKSPACE

        if torch.cuda.device_count():  # before any cuBLAS use, here and in the workers it starts
            os.environ.setdefault(*CUBLAS_WORKSPACE)
        gpus = worker_gpus(args.workers, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        workers = args.workers if gpus is None else len(gpus)
        if workers < args.workers:
            print(f"{workers} worker(s), one per GPU ({', '.join(gpus)}): workers sharing a GPU only take turns on it")
        if workers > 1:  # this invocation's own claims: a stopped or concurrent one never blocks a run
            claims = out / ".claims" / f"{os.getpid()}-{time.time_ns()}"
            cmd = [sys.executable, "-m", "mtml.runs.study", args.study, "--out", str(out), "--workers", str(workers),
                   "--claims", str(claims)]
            procs = [subprocess.Popen(cmd + ["--worker", str(k)] + (["--smoke"] if args.smoke else []),
                                      env={**os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[k]} if gpus else {})})
                     for k in range(workers)]
            failed = sum(proc.wait() != 0 for proc in procs)
            shutil.rmtree(claims, ignore_errors=True)
        else:
            failed = run_study(study, out, args.smoke)
    costs = measure_costs(study, out, args.smoke)
    print(write_results(study, out, args.smoke, costs, split_hygiene(study, args.smoke)),
          f"({time.perf_counter() - start:.0f} s)")
    if failed:
        print("some runs failed (listed above); run the same command again to retry them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from ..cli import run_main

    sys.exit(run_main(main, prog="python -m mtml.runs.study"))

