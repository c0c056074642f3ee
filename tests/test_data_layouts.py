"""Data as users bring it: the published folder layouts of CVC-ClinicDB and Kvasir-SEG, prepared
folders that move, the split seed, and command-line errors in one line (exit code 2)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtml.cli import run_main
from mtml.tasks.polyp import load_polyp_dataset, prepare_cvc
from test_polyp_data import kvasir_files, write_tree

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data_scripts" / "polyp.py"
TRUE_BOX = [12, 8, 40, 30]  # xyxy of the polyp drawn in every frame with a polyp


def cvc_tree(root: Path, frames: str, masks: str, suffix: str, numbers=(1, 2, 26, 27, 51)) -> Path:
    """A CVC-ClinicDB copy in one of its published layouts; frame 27 has an empty mask."""
    rng = np.random.default_rng(0)
    for n in numbers:
        image = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
        mask = np.zeros((40, 52), np.uint8)
        if n != 27:
            mask[TRUE_BOX[1]:TRUE_BOX[3], TRUE_BOX[0]:TRUE_BOX[2]] = 255
        for folder, array in ((frames, image), (masks, mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            options = {"quality": 70} if suffix == ".jpg" else {}
            Image.fromarray(array).save(root / folder / f"{n}{suffix}", **options)
    return root


def run_command(*args, script=SCRIPT) -> subprocess.CompletedProcess:
    """The tool as a user runs it: its own process (`script` a file, or a module for `python -m`)."""
    command = [sys.executable, "-m", script] if isinstance(script, str) else [sys.executable, str(script)]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)


def run_cli(*args, script=SCRIPT) -> subprocess.CompletedProcess:
    """What the tool's `__main__` block does, `run_main(main)`, in this process (no interpreter and
    torch to start each time); stderr captured. `test_other_clis_fail_in_one_line_too`
    runs each tool's real command line once."""
    if isinstance(script, str):  # a module: python -m <script>
        module, prog = importlib.import_module(script), f"python -m {script}"
    else:
        spec = importlib.util.spec_from_file_location(f"_cli_{script.stem}", script)
        module, prog = importlib.util.module_from_spec(spec), script.name
        spec.loader.exec_module(module)
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [str(script), *map(str, args)]  # argparse names the program from it
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = run_main(module.main, [str(a) for a in args], prog=prog)
    except SystemExit as stop:  # argparse's usage errors exit
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("frames, masks, suffix", [("Original", "Ground Truth", ".tif"),
                                                   ("Original", "Ground Truth", ".png"),
                                                   ("images", "masks", ".jpg"),
                                                   ("images", "masks", ".png")])
def test_every_published_cvc_layout_gives_the_same_boxes(tmp_path, frames, masks, suffix):
    root = cvc_tree(tmp_path / "src" / "CVC-ClinicDB", frames, masks, suffix)
    table, report = prepare_cvc(tmp_path / "src", out_dir=tmp_path / "out")
    by_frame = table.set_index("frame")
    assert sorted(by_frame.index, key=int) == ["1", "2", "26", "27", "51"] and report["masks_empty"] == 1
    for frame in ("1", "2", "26", "51"):
        (box,) = json.loads(by_frame.loc[frame, "boxes"])
        # JPEG masks carry compression noise (many grey levels): the box stays within 2 px
        assert np.abs(np.array(box) - TRUE_BOX).max() <= (2 if suffix == ".jpg" else 0), (frame, box)
    if suffix == ".jpg":
        levels = np.unique(np.asarray(Image.open(root / masks / "1.jpg").convert("L")))
        assert len(levels) > 10  # the noise the threshold has to survive is really there
    assert by_frame.loc["27", "n_boxes"] == 0


def test_cvc_tar_archive_of_the_authors_layout_and_a_fresh_raw_folder_each_time(tmp_path):
    import tarfile

    src = cvc_tree(tmp_path / "src" / "CVC-ClinicDB", "Original", "Ground Truth", ".tif")
    archive = tmp_path / "CVC-ClinicDB.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="CVC-ClinicDB")
    data = tmp_path / "data"
    few = cvc_tree(tmp_path / "few" / "CVC-ClinicDB", "images", "masks", ".png", numbers=(1, 2))
    assert run_cli("cvc", "--from", few, "--data-dir", data).returncode == 0
    run = run_cli("cvc", "--from", archive, "--data-dir", data)  # a second preparation replaces the first
    assert run.returncode == 0, run.stderr
    manifest = (data / "cvc-clinicdb" / "manifest.csv").read_text()
    assert "raw/CVC-ClinicDB/Original/51.tif" in manifest and "images/" not in manifest
    assert len(load_polyp_dataset(data / "cvc-clinicdb", split=None, size=64)) == 5


def test_cvc_archive_through_the_cli_and_the_prepared_folder_moves(tmp_path):
    src = cvc_tree(tmp_path / "src" / "CVC-ClinicDB", "images", "masks", ".jpg")
    archive = tmp_path / "CVC-ClinicDB.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*.jpg")):
            zf.write(path, path.relative_to(tmp_path / "src"))
    run = run_cli("cvc", "--from", archive, "--data-dir", tmp_path / "data")
    assert run.returncode == 0, run.stderr
    manifest = (tmp_path / "data" / "cvc-clinicdb" / "manifest.csv").read_text()
    assert "raw/CVC-ClinicDB/images/1.jpg" in manifest and ".." not in manifest and str(tmp_path) not in manifest

    moved = tmp_path / "elsewhere" / "cvc"
    shutil.move(tmp_path / "data" / "cvc-clinicdb", moved)  # the whole folder moves: it still loads
    assert len(load_polyp_dataset(moved, split=None, size=64)) == 5
    (moved / "raw" / "CVC-ClinicDB" / "images" / "26.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 5 frames .* missing .*26.jpg.*prepare it again"):
        load_polyp_dataset(moved, split=None, size=64)


def test_a_folder_given_with_from_is_copied_in_so_the_manifest_never_points_outside(tmp_path):
    src = write_tree(tmp_path / "downloads", kvasir_files())
    run = run_cli("kvasir", "--from", src, "--data-dir", tmp_path / "data", "--split-by", "frame")
    assert run.returncode == 0, run.stderr
    prepared = tmp_path / "data" / "kvasir-seg"
    assert "raw/downloads/Kvasir-SEG/images/f3.jpg" in (prepared / "manifest.csv").read_text()
    shutil.rmtree(src)  # the source can go: the prepared folder holds its own copy
    assert len(load_polyp_dataset(prepared, split=None, size=64)) == 5


def test_the_split_seed_is_its_own_parameter(tmp_path):
    src = cvc_tree(tmp_path / "src", "Original", "Ground Truth", ".png", numbers=range(1, 200, 7))

    def splits(*args, data):
        assert run_cli("cvc", "--from", src, "--data-dir", data, *args).returncode == 0
        return (data / "cvc-clinicdb" / "manifest.csv").read_text()

    zero = splits(data=tmp_path / "a")
    assert splits("--split-seed", "0", data=tmp_path / "b") == zero
    assert splits("--seed", "3", data=tmp_path / "c") == splits("--split-seed", "3", data=tmp_path / "d") != zero


def _one_line_error(run: subprocess.CompletedProcess, *words: str) -> str:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_polyp_cli_errors_are_one_line_with_the_fix(tmp_path, http_server):
    _one_line_error(run_cli("cvc", "--from", tmp_path / "nope"), "does not exist", "give the folder")
    _one_line_error(run_cli("cvc"), "--from", "see --help")  # argparse's own errors: one line too
    _one_line_error(run_cli("kvasir", "--split-seed", "x"), "invalid int value", "see --help")
    wrong = tmp_path / "wrong"
    (wrong / "photos").mkdir(parents=True)
    _one_line_error(run_cli("cvc", "--from", wrong, "--data-dir", tmp_path / "d"),
                    "no CVC-ClinicDB frames", "'images/' + 'masks/'", "photos")
    _one_line_error(run_cli("kvasir", "--from", wrong, "--data-dir", tmp_path / "d"),
                    "no images/ folder", "Kvasir-SEG")
    bad_boxes = write_tree(tmp_path / "kv", {**kvasir_files(), "Kvasir-SEG/kavsir_bboxes.json": b"{not json"})
    _one_line_error(run_cli("kvasir", "--from", bad_boxes, "--data-dir", tmp_path / "d"),
                    "cannot read the box file", "--boxes masks")
    _one_line_error(run_cli("cvc", "--from", cvc_tree(tmp_path / "c", "images", "masks", ".png"),
                            "--sequence-ends", "5,x", "--data-dir", tmp_path / "d"), "--sequence-ends must be")

    body = b"not really a zip"
    http_server.files["/kvasir-seg.zip"] = body
    wrong_sha = "0" * 64
    line = _one_line_error(run_cli("kvasir", "--quiet", "--url", http_server.url("/kvasir-seg.zip"),
                                   "--sha256", wrong_sha, "--data-dir", tmp_path / "d"),
                           "sha256 mismatch", "check the expected checksum")
    assert hashlib.sha256(body).hexdigest() in line and wrong_sha in line
    _one_line_error(run_cli("kvasir", "--quiet", "--url", "http://127.0.0.1:9/kvasir-seg.zip",
                            "--data-dir", tmp_path / "d"), "failed 3 times", "check the network")
    _one_line_error(run_cli("kvasir", "--quiet", "--url", http_server.url("/missing.zip"),
                            "--data-dir", tmp_path / "d"), "404", "check the download address")


def test_other_clis_fail_in_one_line_too(tmp_path):
    """Real command lines (each tool's `__main__` block goes through run_main), every tool once."""
    _one_line_error(run_command("cvc", "--from", tmp_path / "nope"), "does not exist", "give the folder")
    _one_line_error(run_command("--record-url", "http://127.0.0.1:9/api/records/1", "--data-dir", tmp_path,
                                script=REPO / "data_scripts" / "msi_mss.py"), "cannot reach", "--record-url")
    _one_line_error(run_command(tmp_path, "--data", tmp_path, script="mtml.runs.external"),
                    "no readable metrics.json", "finished run")
    (tmp_path / "bad.yaml").write_text("name: bad\nwhat: 1\n")
    _one_line_error(run_command(tmp_path / "bad.yaml", script="mtml.runs.study"), "unknown keys")
    _one_line_error(run_command("--task", "detection", "--modes", "kd", "--seeds", "0", "--param", "NOT_A_KNOB=1",
                                "--runs-dir", tmp_path, script="mtml.runs.reproduce"), "unknown parameter", "NOT_A_KNOB")


def test_kvasir_zip_and_its_extracted_folder_give_one_manifest(tmp_path):
    files = kvasir_files()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    (tmp_path / "kvasir-seg.zip").write_bytes(buf.getvalue())
    assert run_cli("kvasir", "--from", tmp_path / "kvasir-seg.zip", "--data-dir", tmp_path / "z").returncode == 0
    assert run_cli("kvasir", "--from", write_tree(tmp_path / "x", files) / "Kvasir-SEG",
                   "--data-dir", tmp_path / "f").returncode == 0
    read = lambda d: (d / "kvasir-seg" / "manifest.csv").read_text().replace("raw/Kvasir-SEG/", "raw/")  # noqa: E731
    assert read(tmp_path / "z") == read(tmp_path / "f")
