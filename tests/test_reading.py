"""The generated "Reading the results" text and the knowledge-flow diagram."""
import matplotlib
import pandas as pd
import pytest

from mtml.teach.reading import describe_detections, paired_spread, premise, read_teachers, reading

matplotlib.use("Agg")


def table(**networks):
    return pd.DataFrame({"auroc": networks}).rename_axis("network")


def history(teacher, s1, s2):
    return pd.DataFrame({"epoch": [1, 2], "val/teacher/auroc": [0.5, teacher],
                         "val/student_1/auroc": [0.5, s1], "val/student_2/auroc": [0.5, s2]})


def test_premise_reads_the_last_epoch():
    assert premise(history(0.9, 0.8, 0.85), "auroc")["holds"]
    fact = premise(history(0.8, 0.7, 0.81), "auroc")
    assert not fact["holds"] and fact["students"] == {"student_1": 0.7, "student_2": 0.81}
    assert premise(pd.DataFrame({"epoch": [1], "val/student_1/auroc": [0.5]}), "auroc") is None


def test_reading_names_a_student_that_beats_the_teacher():
    m = table(teacher=0.79, student_1=0.75, student_2=0.80, ensemble=0.78)
    text = reading(m, "auroc", "kd", history=history(0.77, 0.70, 0.81))
    assert "does not beat student_2" in text and "premise" in text
    assert "student_2 matches or beats it" in text  # test split too
    assert "not above its best student (student_2, 0.800)" in text
    assert "stronger network" not in text


def test_reading_when_the_premise_holds_and_the_ensemble_helps():
    m = table(teacher=0.9, student_1=0.75, student_2=0.80, ensemble=0.82)
    text = reading(m, "auroc", "kd_ml", history=history(0.9, 0.7, 0.8))
    assert "the teacher is the stronger network" in text
    assert "+0.020 above its best student (student_2, 0.800)" in text


def test_reading_compares_with_the_baseline_against_the_spread():
    m = table(student_1=0.75, student_2=0.80, ensemble=0.79)
    base = table(student_1=0.7, student_2=0.74, ensemble=0.75)
    noisy = reading(m, "auroc", "ml", baseline=base,
                    spread={"sd": 0.03, "mean": 0.01, "seeds": 5, "source": "study x"})
    assert "No teacher" in noisy and "0.040 higher" in noisy
    assert "5 seeds" in noisy and "study x" in noisy and "within two standard deviations" in noisy
    clear = reading(m, "auroc", "ml", baseline=base, spread={"sd": 0.01, "mean": 0.04, "seeds": 5})
    assert "beyond two standard deviations" in clear
    unknown = reading(m, "auroc", "ml", baseline=base)
    assert "Not measured for these settings" in unknown
    assert "Against the baseline" not in reading(m, "auroc", "independent", baseline=base)


def test_reading_warns_about_a_small_test_set():
    m = table(teacher=0.8, student_1=0.7, student_2=0.75, ensemble=0.76)
    m["patient_accuracy"] = 11 / 14
    text = reading(m, "auroc", "kd", patients=14)
    assert "every network gets 11 of 14 right" in text and "1/14 = 0.071" in text
    m.loc["student_1", "patient_accuracy"] = 8 / 14
    assert "get 8 to 11 of 14 right" in reading(m, "auroc", "kd", patients=14)
    assert "small test set" not in reading(m, "auroc", "kd", patients=40)


def test_paired_spread_counts_only_runs_with_these_settings():
    runs = pd.DataFrame({
        "spec_hash": ["kd0", "in0", "kd1", "in1", "kd2", "in2", "other-kd3", "in3"],
        "mode": ["kd", "independent"] * 4, "seed": [0, 0, 1, 1, 2, 2, 3, 3],
        "ensemble/auroc": [0.8, 0.7, 0.75, 0.75, 0.9, 0.8, 0.1, 0.9]})
    spread = paired_spread(runs, lambda mode, seed: f"{mode[:2]}{seed}", "kd")
    assert spread["seeds"] == 3  # seed 3's kd run has other settings
    assert spread["mean"] == pytest.approx((0.1 + 0.0 + 0.1) / 3)
    assert spread["sd"] == pytest.approx(pd.Series([0.1, 0.0, 0.1]).std())
    assert paired_spread(runs, lambda mode, seed: f"{mode[:2]}{seed}", "kd", min_seeds=4) is None


def test_the_committed_synthetic_study_matches_the_classification_defaults():
    """Notebooks 01-03 read their seed spread from the committed study: it must hold runs of
    exactly their default settings (if this fails, the defaults changed: rerun the study)."""
    from mtml.runs.parameters import notebook_defaults, spec_from_parameters
    from mtml.runs.study import RESULTS

    runs = pd.read_csv(RESULTS / "synthetic_tiny_cpu" / "runs.csv")
    knobs = notebook_defaults("notebooks/01_kd_only.ipynb")
    hash_of = lambda mode, seed: spec_from_parameters("classification", {**knobs, "MODE": mode, "SEED": seed}).hash  # noqa: E731
    for mode in ("kd", "ml", "kd_ml"):
        assert paired_spread(runs, hash_of, mode)["seeds"] == 5


@pytest.mark.parametrize("mode,arrows", [("independent", 2), ("kd", 5), ("ml", 3), ("kd_ml", 6), ("offline", 4)])
def test_knowledge_flows_draws_each_modes_arrows(mode, arrows):
    from matplotlib.patches import FancyArrowPatch

    from mtml.teach.plots import knowledge_flows

    fig = knowledge_flows((mode,), highlight=mode)
    assert sum(isinstance(p, FancyArrowPatch) for p in fig.axes[0].patches) == arrows
    with pytest.raises(ValueError, match="unknown mode"):
        knowledge_flows(("kd", "nope"))


def test_grid_runs_skip_the_notebooks_baseline():
    """A reproduction grid trains independent runs itself: its notebooks do not train a baseline too."""
    from mtml.runs.reproduce import plan

    runs = plan("classification", ["kd", "ml"], ["tiny"], [0])
    assert [r.parameters["BASELINE"] for r in runs] == [False, False]
    assert plan("classification", ["kd"], ["tiny"], [0], {"BASELINE": False})[0].parameters["BASELINE"] is False
    with pytest.raises(ValueError, match="own independent runs"):  # a baseline would share the grid's store folder
        plan("classification", ["kd"], ["tiny"], [0], {"BASELINE": True})


def test_reading_compares_numbers_as_it_prints_them():
    """0.7014 and 0.7006 both print 0.701: the words must not call one higher."""
    m = table(teacher=0.0011, student_1=0.0012, student_2=0.0004, ensemble=0.7014)
    base = table(student_1=0.7, student_2=0.7, ensemble=0.7006)
    text = reading(m, "auroc", "kd", history=history(0.0011, 0.0012, 0.0004), baseline=base)
    assert "the same to three decimals" in text and "lower" not in text.split("Against")[1].split("**")[1]
    assert "does not beat student_1" in text  # 0.001 vs 0.001: a tie is not a win
    tie = reading(table(student_1=0.8004, student_2=0.7, ensemble=0.8001), "auroc", "ml")
    assert "not above its best student" in tie and "+0.000" not in tie


def test_reading_says_when_a_value_is_missing():
    nan = float("nan")
    m = table(teacher=nan, student_1=0.7, student_2=0.8, ensemble=nan)
    text = reading(m, "auroc", "kd", history=history(nan, 0.7, 0.8), baseline=table(ensemble=0.75))
    assert "premise cannot be checked" in text and "Not available" in text
    assert "nan lower" not in text and "nan higher" not in text and "beyond two" not in text


def test_reading_gives_no_verdict_from_another_budget():
    m = table(student_1=0.75, student_2=0.80, ensemble=0.79)
    spread = {"sd": 0.001, "mean": 0.0, "seeds": 5, "budget": {"TRAIN_FRAMES": None}}
    text = reading(m, "auroc", "ml", baseline=table(ensemble=0.70), spread={**spread, "source": "s"})
    assert "Not measured at this run's budget" in text and "TRAIN_FRAMES=all" in text
    assert "beyond two standard deviations" not in text and "within two" not in text


def test_paired_spread_takes_the_last_of_a_repeated_record():
    runs = pd.DataFrame({"spec_hash": ["kd0", "kd0", "in0", "kd1", "in1", "kd2", "in2"],
                         "mode": ["kd", "kd", "independent", "kd", "independent", "kd", "independent"],
                         "seed": [0, 0, 0, 1, 1, 2, 2], "ensemble/auroc": [0.1, 0.8, 0.7, 0.8, 0.7, 0.8, 0.7]})
    assert paired_spread(runs, lambda mode, seed: f"{mode[:2]}{seed}", "kd")["mean"] == pytest.approx(0.1)


def test_read_verdicts_says_why_a_claim_is_inconclusive():
    from mtml.teach.reading import read_verdicts

    rows = pd.DataFrame([
        {"claim": "kd_ml ensemble > kd ensemble", "seeds": 5, "mean": 0.03, "ci95": 0.01, "p_holm": 0.01,
         "boot_lo": -0.01, "boot_hi": 0.07, "detectable": 0.02, "verdict": "inconclusive"},
        {"claim": "kd_ml ensemble > ml ensemble", "seeds": 5, "mean": -0.04, "ci95": 0.01, "p_holm": 0.01,
         "boot_lo": -0.07, "boot_hi": -0.01, "detectable": 0.02, "verdict": "refuted"},
        {"claim": "kd_ml ensemble > independent ensemble", "seeds": 1, "mean": 0.01, "ci95": float("nan"),
         "p_holm": 1.0, "boot_lo": float("nan"), "boot_hi": float("nan"), "detectable": float("nan"),
         "verdict": "inconclusive"}])
    text = read_verdicts(rows, "auroc").split("\n\n")
    assert "the seeds agree, but the bootstrap interval over the test set includes 0" in text[0]
    assert "the claim does not hold here" in text[1]
    assert "(1 seed, no interval" in text[2] and "± nan" not in text[2] and "cannot tell" in text[2]


def test_knowledge_flows_adds_the_highlighted_mode():
    from mtml.teach.plots import knowledge_flows

    fig = knowledge_flows(highlight="offline")
    assert [ax.get_title() for ax in fig.axes] == ["independent", "kd", "ml", "kd_ml", "offline"]


def _teacher_runs(rows):
    return pd.DataFrame([{"mode": m, "seed": k, "teacher/auroc": t, "students_mean/auroc": s}
                         for m, k, t, s in rows])


def test_read_teachers_calls_a_teacher_ahead_or_behind_only_when_its_interval_excludes_0():
    text = read_teachers(_teacher_runs(
        [("kd", k, 0.90 + d, 0.80) for k, d in enumerate([0.00, 0.01, 0.02])]        # +0.11 ± 0.02: ahead
        + [("kd_ml", k, 0.80, 0.85 + d) for k, d in enumerate([0.00, 0.01, 0.02])]   # -0.06 ± 0.02: behind
        + [("offline", k, 0.80, 0.80 + d) for k, d in enumerate([-0.05, 0.01, 0.05])]  # spans 0
        + [("ml", k, float("nan"), 0.8) for k in range(3)]), "auroc")
    assert "kd: +0.110 ± 0.025 over 3 seeds, ahead" in text
    assert "kd_ml: -0.060 ± 0.025 over 3 seeds, behind" in text
    assert "offline: -0.003 ± 0.125 over 3 seeds, not separable from 0" in text
    assert "; ml:" not in text and "In kd_ml the students beat their teacher" in text
    assert "1 seed, no interval" in read_teachers(_teacher_runs([("kd", 0, 0.9, 0.8)]), "auroc")
    assert "No mode here has a teacher" in read_teachers(_teacher_runs([("ml", 0, float("nan"), 0.8)]), "auroc")


def test_describe_detections_counts_kept_boxes_and_found_polyps_at_each_threshold():
    import torch

    truth = [{"boxes": torch.tensor([[10.0, 10, 50, 50]])}, {"boxes": torch.tensor([[0.0, 0, 20, 20], [60, 60, 90, 90]])}]
    hit, miss = [10.0, 12, 50, 48], [100.0, 100, 120, 120]
    preds = {"teacher": [{"boxes": torch.tensor([hit, miss]), "scores": torch.tensor([0.9, 0.8])},
                         {"boxes": torch.tensor([[0.0, 0, 20, 20]]), "scores": torch.tensor([0.2])}],
             "student_1": [{"boxes": torch.tensor([hit]), "scores": torch.tensor([0.4])},
                           {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}]}
    text = describe_detections(preds, truth, {"teacher": 0.5, "student_1": float("nan")}, range(2))
    assert text == ("On these 2 frames (3 polyps): teacher keeps 2 boxes and finds 1; "
                    "student_1 keeps 0 boxes and finds 0.")
    assert "teacher keeps 3 boxes and finds 2" in describe_detections(preds, truth, {"teacher": 0.1, "student_1": 0.5}, [0, 1])
    twins = [{"boxes": torch.tensor([[10.0, 10, 50, 50], [11.0, 11, 51, 51]])}]  # one box cannot find both
    one = {"net": [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "scores": torch.tensor([0.9])}]}
    assert describe_detections(one, twins, {"net": 0.5}, [0]) == "On this frame (2 polyps): net keeps 1 box and finds 1."
