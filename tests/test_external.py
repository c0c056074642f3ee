"""External test sets (mtml.external) and task defaults that live with the task."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, fit
from mtml.tasks.detection import DetectionTask
from mtml.io import run_store
from mtml.runs.experiment import RunOptions, RunStore, run_cohort
from mtml.runs.external import evaluate_run, external_table, load_sets
from mtml.tasks.models import build_cohort_networks
from mtml.runs.parameters import config_from_parameters, notebook_defaults
from mtml.tasks.polyp import make_synthetic_polyps, prepare_cvc
from mtml.runs.report import sets_in, summarise_sets
from mtml.runs.reproduce import NOTEBOOKS
from mtml.runs.spec import spec_of
from test_data_layouts import cvc_tree

SIZE = 64


def synthetic_cvc(root, n=12, seed=5):
    """A CVC-layout folder (images/ + masks/, JPEG) of synthetic polyps, prepared."""
    from PIL import Image

    frames = make_synthetic_polyps(n, SIZE, seed=seed)
    for i in range(n):
        item = frames[i]
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for x0, y0, x1, y1 in item["boxes"].int().tolist():
            mask[y0:y1, x0:x1] = 255
        for folder, array in (("images", item["image"].permute(1, 2, 0).numpy()), ("masks", mask)):
            (root / "src" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / "src" / folder / f"{i + 1}.jpg", quality=90)
    prepare_cvc(root / "src", out_dir=root)
    return root


def test_a_detection_run_is_tested_on_an_external_set_and_again_from_its_checkpoint(tmp_path, one_torch_thread):
    task = DetectionTask(size=SIZE)
    sets = load_sets(task, [synthetic_cvc(tmp_path / "cvc-like")])
    assert list(sets) == ["cvc-like"] and sets["cvc-like"][1]["items"] == 12  # the whole folder, every split
    cfg = CohortConfig.for_task(task, mode="kd_ml", epochs=1)
    train, val = make_synthetic_polyps(16, SIZE), make_synthetic_polyps(8, SIZE, split=1)
    spec = spec_of(cfg, task, {"train_items": len(train)})
    result = run_cohort(cfg, task, train, val, spec=spec, store=RunStore.beside(tmp_path / "run"),
                        options=RunOptions(progress=False, external=sets))
    record = result.save(tmp_path / "run")
    assert sets_in(record) == ["cvc-like"]
    for net in ("teacher", "student_1", "student_2", "students_mean", "ensemble"):
        assert 0 <= record[f"cvc-like:{net}/map50"] <= 1
    assert record["cvc-like:items"] == 12 and "cvc-like:manifest_sha256" in record

    # the CLI path: a finished run, rebuilt from its final checkpoint, gives the same numbers
    before = {k: v for k, v in record.items() if k.startswith("cvc-like:")}
    for k in before:
        record.pop(k)
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(record))
    again = evaluate_run(tmp_path / "run", [tmp_path / "cvc-like"])
    assert {k: again[k] for k in before} == pytest.approx(before, abs=1e-6)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["cvc-like:ensemble/map50"] == \
        pytest.approx(before["cvc-like:ensemble/map50"])
    table = external_table(again)
    assert sorted(table["network"]) == ["ensemble", "student_1", "student_2", "students_mean", "teacher"]
    # a run made before the run store kept its checkpoint in <run>/checkpoints/<hash>: still found
    (tmp_path / "run" / "checkpoints").mkdir()
    (run_store(tmp_path / "run") / spec.hash).rename(tmp_path / "run" / "checkpoints" / spec.hash)
    older = evaluate_run(tmp_path / "run", [tmp_path / "cvc-like"])
    assert {k: older[k] for k in before} == pytest.approx(before, abs=1e-6)


def test_classification_takes_a_second_manifest(tmp_path, one_torch_thread):
    from mtml.tasks.synthetic import SyntheticConfig, ensure_synthetic_default
    from mtml.tasks.tiles import TileDataset

    small = SyntheticConfig(n_patients=8, tiles_per_patient=4, size=32)
    home = ensure_synthetic_default(tmp_path / "home", small)
    other = ensure_synthetic_default(tmp_path / "other", SyntheticConfig(n_patients=8, tiles_per_patient=3,
                                                                          size=32, seed=9))
    task = ClassificationTask()
    sets = load_sets(task, [other.parent], tile_size=32)
    (name,) = sets
    assert sets[name][1]["items"] == len(pd.read_csv(other))  # every tile of the second manifest
    train, val = (TileDataset(home, s, size=32, cache=True) for s in ("train", "val"))
    cfg = CohortConfig.for_task(task, mode="kd", epochs=1, batch_size=8)
    result = run_cohort(cfg, task, train, val, options=RunOptions(progress=False, external=sets))
    direct = task.evaluate(result.cohort.networks, sets[name][0])  # the same networks on the second manifest
    for net in ("teacher", "student_1", "student_2", "ensemble"):
        assert result.record()[f"{name}:{net}/auroc"] == pytest.approx(direct.loc[net, "auroc"])
    with pytest.raises(ValueError, match="holds the run's own data"):
        load_sets(task, [home.parent], tile_size=32, training_data={"manifest_sha256": _sha(home)})
    with pytest.raises(ValueError, match="holds MSI/MSS tiles .* a detection run needs polyp frames"):
        load_sets(DetectionTask(size=SIZE), [other.parent])


def _sha(manifest):
    from mtml.tasks.download import file_fingerprint

    return file_fingerprint(manifest)


def test_per_set_summary_keeps_sets_apart_and_leaves_out_runs_without_the_set():
    rows = []
    for mode, base in (("kd", 0.5), ("kd_ml", 0.6)):
        for seed in range(3):
            row = {"version": "tiny", "mode": mode, "seed": seed, "ensemble/map50": base + 0.01 * seed,
                   "students_mean/map50": base, "teacher/map50": base}
            if seed < 2:  # seed 2 was never tested on the external set
                row.update({"cvc:items": 10, "cvc:ensemble/map50": base - 0.2, "cvc:students_mean/map50": base - 0.3,
                            "cvc:teacher/map50": base - 0.1})
            rows.append(row)
    table = summarise_sets(pd.DataFrame(rows), "map50").set_index(["eval_set", "mode"])
    assert table.loc[("test", "kd_ml"), "ensemble_mean"] == pytest.approx(0.61)
    assert table.loc[("test", "kd_ml"), "seeds"] == 3 and table.loc[("cvc", "kd_ml"), "seeds"] == 2
    assert table.loc[("cvc", "kd"), "ensemble_mean"] == pytest.approx(0.3)
    assert table.loc[("cvc", "kd"), "teacher_mean"] == pytest.approx(0.4)


def test_repeated_reserved_and_wrong_kind_sets_are_refused(tmp_path):
    a, b, own = tmp_path / "a" / "sets", tmp_path / "b" / "sets", tmp_path / "test"
    for root in (a, b, own):
        prepare_cvc(cvc_tree(root / "src", "images", "masks", ".png"), out_dir=root)
    with pytest.raises(ValueError, match="two external sets are named 'sets'"):
        load_sets(DetectionTask(size=SIZE), [a, b])
    with pytest.raises(ValueError, match="cannot be named 'test'"):
        load_sets(DetectionTask(size=SIZE), str(own))  # one folder as a string is one set
    with pytest.raises(ValueError, match="holds polyp frames .* a classification run needs MSI/MSS tiles"):
        load_sets(ClassificationTask(), [a])
    assert list(load_sets(DetectionTask(size=SIZE), str(a))) == ["sets"]


def test_a_folder_without_a_single_runs_record_is_refused_in_one_line(tmp_path):
    from mtml.runs.external import load_run

    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "comparison"}))
    with pytest.raises(ValueError, match="not a single run's record"):
        load_run(tmp_path)


def test_per_set_summary_refuses_one_name_with_two_contents():
    rows = [{"version": "tiny", "mode": "kd", "seed": s, "ensemble/map50": 0.5, "students_mean/map50": 0.5,
             "cvc:items": 10, "cvc:ensemble/map50": 0.3, "cvc:students_mean/map50": 0.3,
             "cvc:manifest_sha256": f"hash{s}", "old:items": 5, "old:ensemble/map50": 0.1,
             "old:students_mean/map50": 0.1} for s in range(2)]
    with pytest.raises(ValueError, match="2 different contents of external set 'cvc'"):
        summarise_sets(pd.DataFrame(rows), "map50")
    only_old = summarise_sets(pd.DataFrame(rows), "map50", sets={"old"})
    assert list(only_old["eval_set"]) == ["test", "old"]


# task defaults ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task, notebooks", [
    (ClassificationTask(), ("01_kd_only", "02_ml_only", "03_kd_plus_ml")),
    (DetectionTask(), ("05_detection_kd_only", "06_detection_ml_only", "07_detection_kd_plus_ml"))])
def test_the_notebooks_defaults_are_the_tasks(task, notebooks):
    cfg = CohortConfig.for_task(task)
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == tuple(task.config_defaults[k] for k in ("epochs", "batch_size", "lr"))
    for name in notebooks:
        params = notebook_defaults(NOTEBOOKS / f"{name}.ipynb")
        assert (params["EPOCHS"], params["BATCH_SIZE"], params["LR"]) == (cfg.epochs, cfg.batch_size, cfg.lr), name
        if task.name == "detection":
            assert params["FRAME_SIZE"] == task.size
    assert config_from_parameters({"MODE": "kd"}, task.name).epochs == task.config_defaults["epochs"]


def test_detection_defaults_differ_from_classification_where_they_should():
    det, cls = CohortConfig.for_task(DetectionTask()), CohortConfig.for_task(ClassificationTask())
    assert (det.batch_size, det.lr, det.epochs) == (8, 0.01, 6) and (cls.batch_size, cls.lr, cls.epochs) == (64, 0.05, 5)
    assert CohortConfig.for_task(DetectionTask(), epochs=2).epochs == 2


def test_a_cohort_of_the_wrong_networks_is_refused_at_once_naming_both():
    task = DetectionTask(size=SIZE)
    with pytest.raises(ValueError, match="detection task cannot train teacher .*classifier.*task.networks"):
        Cohort.build(CohortConfig(mode="kd"), task=task, networks=build_cohort_networks)
    cohort = Cohort.build(CohortConfig(mode="kd"), task=ClassificationTask())  # classifiers
    with pytest.raises(ValueError, match="detection task cannot train"):
        fit(cohort, task, make_synthetic_polyps(4, SIZE), progress=False)  # before any step
    with pytest.raises(ValueError, match="classification task cannot train student_1 .*detector"):
        Cohort.build(CohortConfig(mode="ml"), task=ClassificationTask(), networks=task.networks)
    built = Cohort.build(CohortConfig(mode="ml"), task=task)  # the task's own builder by default
    assert all(task.is_own_network(m) for m in built.networks.values())
    assert torch.is_tensor(next(built.students[0].parameters()))


def test_a_finished_run_is_tested_again_only_on_new_or_changed_sets(tmp_path, monkeypatch):
    from mtml import external, reproduce

    folders = {name: tmp_path / name for name in ("same", "changed", "new")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setattr(external, "set_fingerprint", lambda task, folder, size=160: f"now-{Path(folder).name}")
    calls = []
    monkeypatch.setattr(external, "evaluate_run", lambda out, stale, device: calls.append(sorted(Path(f).name for f in stale)))
    monkeypatch.setenv("MTML_SHARED_DATA", str(tmp_path / "none"))  # the synthetic frames: no data needed
    run = reproduce.plan("detection", ["kd"], ["tiny"], [0], {"EXTERNAL_DATA_DIRS": [str(f) for f in folders.values()]})[0]
    record = {"same:items": 3, "same:manifest_sha256": "now-same", "changed:items": 3, "changed:manifest_sha256": "before"}
    reproduce._add_external_sets(run, tmp_path, record)
    assert calls == [["changed", "new"]]
    reproduce._add_external_sets(run, tmp_path, {**record, "changed:manifest_sha256": "now-changed",
                                                 "new:manifest_sha256": "now-new"})
    assert len(calls) == 1  # nothing stale: nothing tested again
