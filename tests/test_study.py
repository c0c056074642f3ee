"""Studies: the study file, verdicts, the detectable difference, the operating point, diversity,
and the study command end to end (smoke: resumable, re-running nothing, identical tables)."""
import math
import os
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats

from mtml import study as study_mod
from mtml.tasks.detection_eval import f1_at_thresholds, operating_point
from mtml.tasks.diversity import classification_diversity
from mtml.runs.parameters import spec_from_parameters
from mtml.runs.study import Study, detectable_difference, verdicts


def test_study_file_refuses_unknown_keys_and_non_parameters(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntask: detection\ndata: real\nversion: tiny\nmodes: [kd]\nseeds: [0]\nepochs: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        Study.load(path)
    path.write_text("name: s\ntask: detection\ndata: real\nversion: tiny\nmodes: [kd]\nseeds: [0]\n"
                    "params: {MODE: kd}\n")
    with pytest.raises(ValueError, match="MODE"):
        Study.load(path)


@pytest.mark.parametrize("name", ["kvasir_tiny_cpu", "kvasir_tiny_cpu_split1", "synthetic_tiny_cpu", "kvasir_v1_gpu"])
def test_committed_study_files_load_with_every_mode_and_five_seeds(name):
    s = Study.load(study_mod.REPO / "studies" / f"{name}.yaml")
    assert s.name == name and set(s.modes) == {"independent", "kd", "ml", "kd_ml", "offline"}
    assert len(s.seeds) >= 5
    assert len(s.planned(smoke=True)) == 2 * len(s.modes)


def test_detectable_difference_has_the_power_it_claims():
    d = np.array([0.01, -0.02, 0.03, 0.00, 0.015])
    sd, alpha = d.std(ddof=1), 0.05 / 3
    delta = detectable_difference(d, alpha)
    # simulated paired t-tests over 5 seeds with that true difference and spread reject 80% of the time
    x = np.random.default_rng(0).normal(delta, sd, (40_000, 5))
    t_stat = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(5))
    assert np.mean(np.abs(t_stat) > scipy_stats.t.ppf(1 - alpha / 2, 4)) == pytest.approx(0.8, abs=0.01)
    central = (scipy_stats.t.ppf(1 - alpha / 2, 4) + scipy_stats.t.ppf(0.8, 4)) * sd / math.sqrt(5)
    assert delta > central  # the central-t shortcut overstates the power at 5 seeds
    assert detectable_difference(np.r_[d, d], alpha) < delta  # more seeds, smaller detectable difference
    assert detectable_difference([0.01]) != detectable_difference([0.01])  # NaN: one seed has no spread


def _runs(kd_ml_minus):
    rows = []
    for seed, delta in enumerate(kd_ml_minus):
        base = 0.5 + 0.01 * seed
        for mode, value in (("kd", base), ("ml", base - 0.01), ("independent", base - 0.02), ("kd_ml", base + delta)):
            rows.append({"version": "tiny", "mode": mode, "seed": seed, "ensemble/map50": value})
    return pd.DataFrame(rows)


def _frame_units(good: float):
    """Test units of 40 frames, one box each, one detection each: a share `good` of them hits."""
    rows = []
    for f in range(40):
        rows += [(f, "ensemble", np.nan, 0, 1), (f, "ensemble", 0.9 - 0.01 * f, int(f < 40 * good), 0)]
    return pd.DataFrame(rows, columns=["unit", "network", "score", "tp", "n_gt"])


def _units_for(runs, better):
    return {(r.version, r.mode, r.seed): _frame_units(0.9 if r.mode == better else 0.5) for r in runs.itertuples()}


def test_verdicts_confirm_refute_or_leave_inconclusive():
    runs = _runs([0.05, 0.052, 0.049, 0.051, 0.05])
    up = verdicts(runs, "map50", _units_for(runs, "kd_ml")).set_index("claim")
    assert (up["verdict"] == "confirmed").all() and (up["boot_lo"] > 0).all()
    without_units = verdicts(runs, "map50", None)
    assert (without_units["verdict"] == "inconclusive").all(), "no bootstrap interval, no verdict"
    runs = _runs([-0.06, -0.061, -0.059, -0.06, -0.062])
    down = verdicts(runs, "map50", _units_for(runs, "kd")).set_index("claim")
    assert down.loc["kd_ml ensemble > kd ensemble", "verdict"] == "refuted"
    assert down.loc["kd_ml ensemble > kd ensemble", "mean"] == pytest.approx(-0.0604)
    runs = _runs([0.05, -0.04, 0.03, -0.05, 0.02])
    noisy = verdicts(runs, "map50", _units_for(runs, "kd_ml")).set_index("claim")
    assert noisy.loc["kd_ml ensemble > kd ensemble", "verdict"] == "inconclusive"
    assert noisy.loc["kd_ml ensemble > kd ensemble", "detectable"] > 0.02


def test_holm_family_is_always_the_three_claims():
    """A study with only kd and kd_ml finished still adjusts over three claims (missing p = 1)."""
    deltas = [0.05, 0.03, 0.049, 0.02, 0.04]
    runs = _runs(deltas)
    alone = verdicts(runs[runs["mode"].isin(["kd", "kd_ml"])], "map50", None)
    assert len(alone) == 3 and alone["seeds"].tolist() == [5, 0, 0]
    raw = scipy_stats.ttest_1samp(deltas, 0.0).pvalue
    assert alone["p_holm"].tolist() == pytest.approx([min(1.0, 3 * raw), 1.0, 1.0])


def _units(rows):
    return pd.DataFrame(rows, columns=["unit", "network", "score", "tp", "n_gt"])


def test_operating_point_is_chosen_on_validation_and_applied_to_test():
    nan = np.nan
    # validation: best F1 keeping the two top detections (0.9, 0.8 true; 0.3 false)
    val = _units([(0, "ensemble", nan, 0, 1), (0, "ensemble", 0.9, 1, 0), (0, "ensemble", 0.3, 0, 0),
                  (1, "ensemble", nan, 0, 1), (1, "ensemble", 0.8, 1, 0)])
    curve = f1_at_thresholds(val, "ensemble")
    assert list(curve["threshold"]) == [0.9, 0.8, 0.3]
    assert curve["f1"].tolist() == pytest.approx([2 / 3, 1.0, 0.8])
    # test: at 0.8 one true (0.85) and one false (0.81) detection kept of 2 boxes; 0.5 dropped
    test = _units([(0, "ensemble", nan, 0, 1), (0, "ensemble", 0.85, 1, 0), (0, "ensemble", 0.5, 1, 0),
                   (1, "ensemble", nan, 0, 1), (1, "ensemble", 0.81, 0, 0)])
    op = operating_point(val, test, "ensemble")
    assert op["op_threshold"] == 0.8
    assert (op["op_precision"], op["op_recall"]) == pytest.approx((0.5, 0.5))
    nothing = _units([(0, "ensemble", nan, 0, 1), (1, "ensemble", nan, 0, 1)])  # no detection at all
    assert f1_at_thresholds(nothing, "ensemble").empty
    none_kept = operating_point(val, nothing, "ensemble")
    assert none_kept["op_recall"] == 0.0 and math.isnan(none_kept["op_precision"])
    assert math.isnan(operating_point(nothing, test, "ensemble")["op_threshold"])


def test_classification_diversity_of_equal_and_opposite_students():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    same = classification_diversity({"student_1": p, "student_2": p, "ensemble": p})
    assert same == {"disagreement": 0.0, "kl": pytest.approx(0.0, abs=1e-12)}
    opposite = classification_diversity({"student_1": p, "student_2": p[:, ::-1]})
    assert opposite["disagreement"] == 1.0 and opposite["kl"] > 0.3


def test_study_command_smoke_resumes_and_regenerates_identical_tables(tmp_path, monkeypatch):
    """The synthetic study, shrunk (one epoch of 16 px tiles; the Kvasir smoke study below runs a
    committed file as it is): two workers finish every planned run
    with its units; a second call runs nothing and writes the same tables; a stray row in runs.csv
    never enters them."""
    raw = yaml.safe_load((study_mod.REPO / "studies" / "synthetic_tiny_cpu.yaml").read_text())
    raw.update(name="synthetic_shrunk")
    raw["params"].update(EPOCHS=1, TILE_SIZE=16)
    path, out = tmp_path / "synthetic_shrunk.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(raw))
    assert study_mod.main([str(path), "--smoke", "--out", str(out), "--workers", "2"]) == 0  # two processes
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 10 and runs["spec_hash"].is_unique, "each run once, whichever worker took it"
    assert not any((out / ".claims").glob("*")), "the invocation's claims are removed"
    assert all((out / "units" / f"{h}.csv.gz").is_file() for h in runs["spec_hash"])
    tables = {name: (out / name).read_bytes() for name in ("results.csv", "verdicts.csv", "RESULTS.md", "costs.csv")}
    stray = runs.iloc[[0]].assign(spec_hash="0123456789abcdef", **{"ensemble/auroc": 0.0})
    pd.concat([runs, stray]).to_csv(out / "runs.csv", index=False)
    calls = []
    monkeypatch.setattr(study_mod, "run_one", lambda *a, **k: calls.append(a))
    assert study_mod.main([str(path), "--smoke", "--out", str(out)]) == 0
    assert calls == [], "a finished run is never run again"
    assert {name: (out / name).read_bytes() for name in tables} == tables
    verdict = pd.read_csv(out / "verdicts.csv")
    assert list(verdict["claim"]) == ["kd_ml ensemble > kd ensemble", "kd_ml ensemble > ml ensemble",
                                      "kd_ml ensemble > independent ensemble"]
    assert set(verdict["verdict"]) <= {"confirmed", "refuted", "inconclusive"}
    assert "SYNTHETIC" in (out / "RESULTS.md").read_text().splitlines()[0]


def test_smoke_needs_its_own_folder(capsys):
    with pytest.raises(SystemExit):
        study_mod.main([str(study_mod.REPO / "studies" / "synthetic_tiny_cpu.yaml"), "--smoke"])
    assert "--out" in capsys.readouterr().err


def test_kvasir_study_command_smoke_on_real_frames(tmp_path):
    """The real-data study at smoke size (CI): every mode, 2 seeds, operating point, diversity,
    costs and split hygiene reported."""
    from mtml.tasks.polyp import default_polyp_root

    if default_polyp_root()[0] is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "no Kvasir-SEG frames (../shared/data or python data_scripts/polyp.py kvasir)")
    out = tmp_path / "out"
    assert study_mod.main([str(study_mod.REPO / "studies" / "kvasir_tiny_cpu.yaml"), "--smoke", "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 10 and set(runs["mode"]) == {"independent", "kd", "ml", "kd_ml", "offline"}
    assert runs["ensemble/op_threshold"].between(0.05, 1).all()
    assert runs[["diversity/disagreement", "diversity/kl"]].ge(0).all().all()
    text = (out / "RESULTS.md").read_text()
    assert "cross_split_pairs_grouped_split: 0" in text and "| kd_ml ensemble > kd ensemble |" in text


def test_a_report_says_how_the_code_changed_between_the_commits_of_its_runs(tmp_path):
    from mtml.runs.study import code_changes

    def git(*args, day=1):  # commit dates one day apart: the report orders commits by date
        env = {**os.environ, "GIT_COMMITTER_DATE": f"2026-01-0{day}T00:00:00", "GIT_AUTHOR_DATE": f"2026-01-0{day}T00:00:00"}
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, env=env,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "mtml").mkdir()
    (tmp_path / "mtml" / "a.py").write_text("x = 1\n")
    git("add", "."), git("commit", "-qm", "one", day=1)
    first = git("rev-parse", "--short", "HEAD")
    (tmp_path / "notes.md").write_text("not code\n")
    git("add", "."), git("commit", "-qm", "two", day=2)
    docs_only = git("rev-parse", "--short", "HEAD")
    (tmp_path / "mtml" / "a.py").write_text("x = 2\ny = 3\n")
    git("add", "."), git("commit", "-qm", "three", day=3)
    last = git("rev-parse", "--short", "HEAD")
    assert code_changes([first, first], tmp_path) == ""
    assert code_changes([first, first + "+changes"], tmp_path) == "; 1 run(s) from uncommitted changes, not compared"
    assert f"from {first} to {docs_only}: unchanged" in code_changes([docs_only, first], tmp_path)
    said = code_changes([last, first + "+changes", docs_only], tmp_path)
    assert f"from {first} to {last}: 1 file changed, 2 insertions(+), 1 deletion(-)" in said
    assert said.endswith("1 run(s) from uncommitted changes, not compared")
    assert code_changes([first, "deadbee+changes"], tmp_path) == ("; mtml/ between them not compared (a commit is "
                                                                 "not in this checkout); 1 run(s) from uncommitted "
                                                                 "changes, not compared")
    assert code_changes(pd.Series([first, None, float("nan")]), tmp_path) == "; 2 run(s) without a recorded commit"


def test_workers_share_one_queue_heaviest_first(tmp_path, monkeypatch):
    """Two workers take runs from one queue (an atomic claim per run), heaviest mode first: every
    run exactly once; while one worker is busy with a long run the other takes the rest."""
    import threading
    import time

    study = Study.load(study_mod.REPO / "studies" / "synthetic_tiny_cpu.yaml")
    planned = study.planned(smoke=True)
    assert [p["MODE"] for p in study_mod.queue(planned)][:2] == ["offline", "offline"]
    assert [p["MODE"] for p in study_mod.queue(planned)][-2:] == ["independent", "independent"]
    taken, lock = [], threading.Lock()

    def fake_run(study, params, threads=1):
        with lock:
            taken.append((threading.current_thread().name, params["MODE"], params["SEED"]))
        time.sleep(1.0 if (params["MODE"], params["SEED"]) == ("offline", 0) else 0.02)
        return {"spec_hash": study_mod.spec_from_parameters(study.task, params).hash, "ensemble/auroc": 0.5,
                "train_time_s": 0.0}, pd.DataFrame({"unit": [0]})

    monkeypatch.setattr(study_mod, "run_one", fake_run)
    out, claims = tmp_path / "new" / "out", tmp_path / "claims"  # folders not there yet
    workers = [threading.Thread(target=study_mod.run_study, args=(study, out, True, k, 2, claims), name=f"w{k}")
               for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted((m, s) for _, m, s in taken) == sorted((p["MODE"], p["SEED"]) for p in planned)  # each once
    assert [m for _, m, _ in taken[:2]] == ["offline", "offline"]  # the heaviest runs are taken first
    slow = next(name for name, m, s in taken if (m, s) == ("offline", 0))
    assert sum(name != slow for name, *_ in taken) >= len(planned) - 2  # the other worker went on
    assert len(pd.read_csv(out / "runs.csv")) == len(planned)
    assert not study_mod.claim(claims, study_mod.spec_from_parameters(study.task, planned[0]).hash)  # taken
    assert study_mod.claim(None, "any")  # a single worker claims nothing


def test_gpus_get_one_worker_each_and_cpu_workers_one_thread_each(tmp_path, monkeypatch, capsys):
    """Processes sharing one GPU only take turns on it: `--workers` gives each GPU one worker (the
    visible ones, in order) and shares the cores among them; on a CPU machine it runs as asked."""
    import torch

    assert study_mod.worker_gpus(4, 0) is None
    assert study_mod.worker_gpus(5, 1) == ["0"]
    assert study_mod.worker_gpus(2, 4) == ["0", "1"]
    assert study_mod.worker_gpus(8, 2, "3, 5") == ["3", "5"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (study_mod.worker_threads(1), study_mod.worker_threads(4)) == (16, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (study_mod.worker_threads(1), study_mod.worker_threads(2), study_mod.worker_threads(32)) == (16, 8, 1)

    started = []

    class FakeWorker:
        def __init__(self, cmd, env):
            started.append((cmd[cmd.index("--worker") + 1], cmd[cmd.index("--workers") + 1], env.get("CUDA_VISIBLE_DEVICES")))

        def wait(self):
            return 0

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(study_mod.subprocess, "Popen", FakeWorker)
    monkeypatch.setattr(study_mod, "measure_costs", lambda *a: None)
    monkeypatch.setattr(study_mod, "write_results", lambda *a: "report written")
    monkeypatch.setattr(study_mod, "split_hygiene", lambda *a: None)
    study = study_mod.REPO / "studies" / "synthetic_tiny_cpu.yaml"
    assert study_mod.main([str(study), "--workers", "5", "--smoke", "--out", str(tmp_path)]) == 0
    assert started == [("0", "2", "0"), ("1", "2", "1")]
    assert "2 worker(s), one per GPU (0, 1)" in capsys.readouterr().out


COMMITTED = sorted(p.stem for p in (study_mod.REPO / "studies").glob("*.yaml")
                   if (study_mod.RESULTS / p.stem / "RESULTS.md").is_file())


@pytest.mark.parametrize("name", COMMITTED)
def test_report_regenerates_every_committed_study_byte_identical(name, tmp_path, request, monkeypatch):
    """`--report` rewrites RESULTS.md, results.csv, verdicts.csv (and variants.csv) of each committed
    study exactly as committed (from its runs.csv and units/): a change to the report code that
    changes a committed number, a word or a rounding fails here."""
    import shutil

    study = Study.load(study_mod.REPO / "studies" / f"{name}.yaml")
    if study.data == "real":  # the report names the data and measures the split's near-duplicates
        monkeypatch.setenv("MTML_SHARED_DATA", str(request.getfixturevalue("shared_data")))
    committed, out = study_mod.RESULTS / name, tmp_path / name
    shutil.copytree(committed, out)
    written = [f for f in ("RESULTS.md", "results.csv", "verdicts.csv", "variants.csv") if (committed / f).is_file()]
    for f in written:
        (out / f).unlink()
    assert study_mod.main([str(study_mod.REPO / "studies" / f"{name}.yaml"), "--report", "--out", str(out)]) == 0
    for f in written:
        made, kept = (out / f).read_text(), (committed / f).read_text()
        if f == "RESULTS.md" and "not in this checkout" in made:  # a checkout without the runs' commits (a tarball)
            made, kept = (re.sub(r"(?m)^- code: .*$", "- code:", t) for t in (made, kept))
        assert made == kept, f"{name}/{f} differs from the committed one"


def test_a_lost_units_file_stops_the_report_instead_of_changing_its_verdicts(tmp_path):
    """Every run since units exist writes them before its row: a missing file would silently drop the
    bootstrap and turn verdicts inconclusive, so the report refuses (only rows that predate units,
    without a recorded commit, may lack them)."""
    import shutil

    out = tmp_path / "synthetic_tiny_cpu"
    shutil.copytree(study_mod.RESULTS / "synthetic_tiny_cpu", out)
    lost = sorted((out / "units").iterdir())[0]
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(lost.name) + r" is missing: run \w+ cannot enter the report "
                       r"without its test units; restore it \(git checkout\) or remove the run's row to run it again$"):
        study_mod.main([str(study_mod.REPO / "studies" / "synthetic_tiny_cpu.yaml"), "--report", "--out", str(out)])
    runs = pd.read_csv(out / "runs.csv")
    runs.loc[runs["spec_hash"] == lost.name.split(".")[0], "commit"] = None  # a row from before units existed
    runs.to_csv(out / "runs.csv", index=False)
    assert study_mod.main([str(study_mod.REPO / "studies" / "synthetic_tiny_cpu.yaml"), "--report", "--out", str(out)]) == 0


# -- which runs a study takes: its plan, and the runs it reuses ---------------------------------

def _study(**kw) -> Study:
    return Study(**{**dict(name="s", task="classification", data="synthetic", version="tiny", modes=("kd",),
                           seeds=(0, 1, 2)), **kw})


def _rows(out, rows, units=()):
    """A study folder holding `rows` in runs.csv, and test units for the hashes in `units`."""
    (out / "units").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
    for h in units:
        pd.DataFrame({"unit": ["a"], "network": ["ensemble"], "score": [0.5], "label": [1]}).to_csv(
            out / "units" / f"{h}.csv.gz", index=False)


def test_a_study_reuses_only_runs_tested_on_its_split_and_with_units(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study_mod, "RESULTS", tmp_path)
    study = _study(reuse=("old", "first"), evaluate_on="validation", seeds=(0, 1, 2, 3))
    h0, h1, h2, h3 = study.plan()
    row = dict(version="tiny", mode="kd")
    _rows(tmp_path / "old", [{**row, "seed": 0, "spec_hash": h0, "evaluated_on": "test"},  # another split
                             {**row, "seed": 2, "spec_hash": h2, "evaluated_on": "validation"},  # no units
                             {**row, "seed": 1, "spec_hash": h1, "evaluated_on": "validation"}], units=(h0, h1))
    _rows(tmp_path / "first", [{**row, "seed": 3, "spec_hash": h3, "split_evaluated": "val"}], units=(h3,))  # its column
    out = tmp_path / "new"
    out.mkdir()
    assert study_mod.adopt(study, out) == 2
    assert list(study_mod.read_runs(out)["spec_hash"]) == [h1, h3] and (out / "units" / f"{h1}.csv.gz").is_file()
    assert f"not taken from old: run {h2} has no {h2}.csv.gz" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError) as err:
        study_mod.adopt(_study(reuse=("nope",)), out)
    assert str(err.value) == (f"study s reuses 'nope', but {tmp_path / 'nope' / 'runs.csv'} does not exist: "
                              "check the name under reuse:")


def test_a_study_reports_exactly_its_planned_runs_labelled_by_variant(tmp_path):
    study = _study(variants=(("hot", {"TEMPERATURE": 8.0}),), seeds=(0, 1))
    smoke = study.plan(smoke=True)
    rows = [{"version": "tiny", "mode": p["MODE"], "seed": p["SEED"], "spec_hash": h} for h, p in smoke.items()]
    _rows(tmp_path / "out", rows + [{"version": "tiny", "mode": "kd", "seed": 9, "spec_hash": "0" * 16}])
    runs, units, missing = study_mod.study_runs(study, tmp_path / "out", smoke=True)
    assert "index" not in runs.columns and len(runs) == 4
    assert list(runs["variant"]) == ["base", "base", "hot", "hot"] and missing == [] and units == {}
    stray = {"version": "tiny", "mode": "kd", "seed": 0, "spec_hash": "0" * 16}
    changed = dict(temperature=2.0, w_kd=0.5, w_ml=0.5, lr=9.0, epochs=99, batch_size=3)  # six settings differ
    planned = spec_from_parameters("classification", next(iter(study.plan().values()))).flat()
    same = {k: planned[k] for k in changed}  # a second row that differs in none of them
    for table, differ in (([{**stray, **changed}, {**stray, **same, "spec_hash": "1" * 16}],  # the first row's, five
                           "['batch_size', 'epochs', 'lr', 'temperature', 'w_kd']"),
                          ([{**stray, **same}], "the data fingerprint")):  # no setting differs
        other = tmp_path / f"other{len(table)}"
        _rows(other, table)
        with pytest.raises(ValueError) as err:
            study_mod.study_runs(study, other)
        assert str(err.value) == (f"{other / 'runs.csv'} holds {len(table)} runs, none of this study's plan on this "
                                  f"machine (first differing settings: {differ}); nothing was overwritten: check the "
                                  "data and the study file")


def test_a_smoke_plan_is_capped_and_keeps_two_seeds_variants_too():
    from mtml.tasks import task_class

    study = _study(params={"EPOCHS": 30, "TILE_SIZE": 224}, variants=(("hot", {"TEMPERATURE": 8.0}),))
    smoke, caps = study.planned(smoke=True), task_class("classification").smoke_caps
    assert len(smoke) == 4 and {p["SEED"] for p in smoke} == {0, 1}
    assert all((p["EPOCHS"], p["TILE_SIZE"]) == (caps["EPOCHS"], caps["TILE_SIZE"]) for p in smoke)
