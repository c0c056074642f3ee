"""mtml.download against a real HTTP server on 127.0.0.1 serving files the tests build."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from mtml import download
from mtml.download import MissingDatasetError, data_dir, fetch, safe_extract


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
    with pytest.raises(Exception, match="404"):
        fetch(http_server.url("/nope.zip"), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


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
