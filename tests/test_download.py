"""mtml.download against a real HTTP server on 127.0.0.1 serving files the tests build."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from mtml import download
from mtml.tasks.download import MissingDatasetError, data_dir, fetch, safe_extract


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def served_zip(http_server):
    body = make_zip({"tiles/a.txt": b"alpha" * 1000, "tiles/b.txt": os.urandom(50_000)})
    http_server.files["/files/data.zip"] = body
    return http_server, body


def test_good_download_verifies_and_reuses(served_zip, tmp_path):
    server, body = served_zip
    sha = hashlib.sha256(body).hexdigest()
    path = fetch(server.url("/files/data.zip"), tmp_path, sha256=sha, progress=False)
    assert path == tmp_path / "data.zip" and path.read_bytes() == body
    again = fetch(server.url("/files/data.zip"), tmp_path, md5=hashlib.md5(body).hexdigest(), progress=False)
    assert again == path and server.hits["/files/data.zip"] == 1  # verified file reused, no refetch
    assert [p.name for p in tmp_path.iterdir()] == ["data.zip"]  # no .part left behind


def test_checksum_mismatch_leaves_nothing_valid_looking(served_zip, tmp_path):
    server, body = served_zip
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        fetch(server.url("/files/data.zip"), tmp_path, sha256=wrong, progress=False)
    msg = str(err.value)
    assert "data.zip" in msg and wrong in msg and hashlib.sha256(body).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []
    # a stale file with the wrong content at the final path is not trusted either
    (tmp_path / "data.zip").write_bytes(b"stale")
    with pytest.raises(ValueError):
        fetch(server.url("/files/data.zip"), tmp_path, sha256=wrong, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_is_refetched(served_zip, tmp_path):
    server, body = served_zip
    md5 = hashlib.md5(body).hexdigest()
    server.interrupt["/files/data.zip"] = 1  # first transfer dies midway; the retry completes it
    path = fetch(server.url("/files/data.zip"), tmp_path, md5=md5, progress=False)
    assert path.read_bytes() == body and server.hits["/files/data.zip"] == 2

    # every attempt dies: clear error, nothing at the final path; a later call refetches
    out = tmp_path / "again"
    server.interrupt["/files/data.zip"] = download.ATTEMPTS
    with pytest.raises(ConnectionError, match="again"):
        fetch(server.url("/files/data.zip"), out, md5=md5, progress=False)
    assert not out.exists() or list(out.iterdir()) == []
    assert fetch(server.url("/files/data.zip"), out, md5=md5, progress=False).read_bytes() == body


def test_missing_url_raises(http_server, tmp_path):
    with pytest.raises(ConnectionError, match="404"):
        fetch(http_server.url("/nope.zip"), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [] and http_server.hits["/nope.zip"] == 1  # not retried


def test_safe_extract_zip_is_idempotent(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"x/one.txt": b"1", "x/y/two.txt": b"22"}))
    first = safe_extract(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in first) == ["x/one.txt", "x/y/two.txt"]
    assert safe_extract(archive, tmp_path / "out") == first
    assert (tmp_path / "out/x/y/two.txt").read_bytes() == b"22"


@pytest.mark.parametrize("bad", ["../evil.txt", "ok/../../evil.txt", "/abs/evil.txt"])
def test_safe_extract_refuses_escaping_zip_entries(tmp_path, bad):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip({"fine.txt": b"ok", bad: b"pwned"}))
    with pytest.raises(ValueError, match="refusing"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "fine.txt").exists()


def test_safe_extract_refuses_tar_symlink_out(tmp_path):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(ValueError, match="refusing"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "link").exists()


def test_safe_extract_tar_and_not_an_archive(tmp_path):
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("d/f.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert [p.read_bytes() for p in safe_extract(archive, tmp_path / "out")] == [b"abc"]
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"<html>not a zip</html>")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        safe_extract(junk, tmp_path / "out2")


def test_data_dir_and_missing_dataset_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MTML_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("MTML_DATA_DIR")
    assert data_dir().name == "data"
    err = MissingDatasetError("MSI tiles", tmp_path, "python data_scripts/msi_mss.py --help")
    assert isinstance(err, FileNotFoundError) and "python data_scripts/msi_mss.py --help" in str(err)


def test_msi_mss_cli_end_to_end(http_server, tmp_path, capsys):
    """data_scripts/msi_mss.py against a fake Zenodo record served on 127.0.0.1."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    record = {"files": []}
    archives = {"TRAIN": {"MSIMUT": range(0, 4), "MSS": range(4, 8)},
                "TEST": {"MSIMUT": range(8, 10), "MSS": range(10, 12)}}
    for official, labels in archives.items():
        for label, patients in labels.items():
            entries = {}
            for p in patients:
                for t in range(3):
                    png = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(png, "PNG")
                    tile = "".join(rng.choice(list("ABCDEFGHIJKLMNOP"), 12))
                    entries[f"{label}/blk-{tile}-TCGA-ZZ-{p:04d}-01Z-00-DX1.png"] = png.getvalue()
            body = make_zip(entries)
            name = f"CRC_DX_{official}_{label}.zip"
            http_server.files[f"/api/records/1/files/{name}/content"] = body
            link = http_server.url(f"/api/records/1/files/{name}/content")
            record["files"].append({"key": name, "checksum": f"md5:{hashlib.md5(body).hexdigest()}",
                                    "links": {"self": link}})
    http_server.files["/api/records/1"] = json.dumps(record).encode()
    http_server.interrupt["/api/records/1/files/CRC_DX_TRAIN_MSS.zip/content"] = 1  # one dropped transfer

    script = Path(__file__).resolve().parents[1] / "data_scripts" / "msi_mss.py"
    cmd = [sys.executable, str(script), "--data-dir", str(tmp_path), "--no-progress",
           "--record-url", http_server.url("/api/records/1"), "--seed", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    manifest = tmp_path / "msi_mss" / "CRC_DX" / "manifest.csv"
    assert f"manifest: {manifest}" in run.stdout
    frame = pd.read_csv(manifest)
    assert len(frame) == 12 * 3
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert ((frame["official_split"] == "TEST") == (frame["split"] == "test")).all()
    for split in ("train", "val", "test"):
        assert set(frame.loc[frame["split"] == split, "label"]) == {0, 1}
    assert (frame["label"] == frame["path"].str.contains("MSIMUT").astype(int)).all()
    assert all((manifest.parent / p).is_file() for p in frame["path"])
    # a second run (in-process, to save a start-up) reuses the verified archives: no new requests
    spec = importlib.util.spec_from_file_location("msi_mss", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    hits = dict(http_server.hits)
    assert cli.main(cmd[2:]) == 0
    assert {k: v for k, v in http_server.hits.items() if k.endswith(".zip/content")} == \
        {k: v for k, v in hits.items() if k.endswith(".zip/content")}
    assert pd.read_csv(manifest).equals(frame)
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--record-url" in out and "2530835" in out
