"""Downloads with checksums, safe archive extraction, and where datasets live.

- `fetch` downloads one file with `pooch.retrieve` (tqdm progress bar), which writes a temporary
  file beside the target, checks its checksum and then moves it onto the target: the final path
  only ever holds a complete, verified file. An interrupted transfer is retried from the start
  (OURS: refetch, not byte-range resume; simple and correct with any server), and a later call
  refetches too, since nothing partial is left at the final path.
- `safe_extract` unpacks zip and tar archives, refusing any entry that would land outside the target.
- `data_dir` is `$MTML_DATA_DIR`, or `data/` under the repository root (git-ignored).
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import pooch

ATTEMPTS = 3  # tries per file when the connection drops midway
CHUNK_SIZE = 1 << 18


class MissingDatasetError(FileNotFoundError):
    """A dataset is not on disk. The message names the command that fetches it.

    `MissingDatasetError(dataset, path, command)`, e.g.
    `MissingDatasetError("MSI vs MSS tiles", root, "python data_scripts/msi_mss.py --help")`.
    """

    def __init__(self, dataset: str, path=None, command: str | None = None):
        self.dataset, self.path, self.command = dataset, path, command
        where = f" at {path}" if path is not None else ""
        fix = f"; fetch it with: {command}" if command else ""
        super().__init__(f"{dataset} not found{where}{fix}")


def data_dir() -> Path:
    """Where downloads and prepared manifests go: `$MTML_DATA_DIR`, default `<repo>/data`."""
    env = os.environ.get("MTML_DATA_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "data"


def file_hash(path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expected(sha256, md5):
    if sha256 and md5:
        raise ValueError("give sha256 or md5, not both")
    if sha256:
        return "sha256", sha256.lower().removeprefix("sha256:")
    if md5:
        return "md5", md5.lower().removeprefix("md5:")
    return None, None


def fetch(url: str, dest_dir, sha256: str | None = None, md5: str | None = None,
          filename: str | None = None, progress: bool = True) -> Path:
    """Downloads `url` to `dest_dir/filename` (default: the URL's last path part) with
    `pooch.retrieve` and returns the path.

    pooch streams into a temporary file beside the target, checks the checksum and only then
    moves it onto the target, and reuses an existing file with the right checksum (or any
    existing file when no checksum is given). Around it (OURS): a dropped connection is retried
    from the start `ATTEMPTS` times, then raised as ConnectionError; a checksum mismatch raises
    ValueError naming the file and both hashes and also deletes a stale file at the target.
    """
    import requests  # pooch's own dependency

    algorithm, expected = _expected(sha256, md5)
    name = filename or unquote(PurePosixPath(urlparse(url).path).name)
    if not name:
        raise ValueError(f"cannot tell a file name from {url!r}; pass filename=")
    final = Path(dest_dir) / name
    known = f"{algorithm}:{expected}" if expected else None
    pooch.get_logger().setLevel("WARNING")  # its INFO lines would go to stderr; we say it on stdout
    if progress and not final.exists():
        print(f"downloading {url} -> {final}", flush=True)
    downloader = pooch.HTTPDownloader(progressbar=progress, chunk_size=CHUNK_SIZE)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return Path(pooch.retrieve(url, known, fname=name, path=final.parent, downloader=downloader))
        except requests.HTTPError as err:  # 404 and the like: retrying will not help
            raise ConnectionError(f"download of {url} failed: {err}; check the download address") from err
        except requests.RequestException as err:  # connection refused or dropped midway
            if attempt == ATTEMPTS:
                raise ConnectionError(f"download of {url} failed {ATTEMPTS} times ({err}); check the "
                                      "network and run the same command again to refetch") from err
        except ValueError as err:  # pooch's checksum mismatch; it deleted its download
            final.unlink(missing_ok=True)  # a stale file with the wrong content must not look valid
            actual = re.search(r"but got (\w+)", str(err))
            raise ValueError(f"{algorithm} mismatch for {name} from {url}: expected {expected}, got "
                             f"{actual.group(1) if actual else 'another hash'}; the download was deleted "
                             "(a corrupt transfer or a changed file: check the expected checksum)") from err
    raise AssertionError("unreachable")


def _member_target(root: Path, name: str) -> Path:
    """Where an archive entry would land; ValueError if that is outside `root`."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise ValueError(f"refusing archive entry {name!r}: absolute or Windows path")
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"refusing archive entry {name!r}: it would escape {root}")
    return target


def safe_extract(archive, target_dir) -> list[Path]:
    """Extracts a zip or tar archive into `target_dir`; returns the extracted files' paths.

    Every entry is checked before anything is written: entries with absolute paths, `..` parts,
    or links (symbolic or hard) are refused with ValueError. Idempotent: files already present
    with the right size are kept, so a second call is cheap and gives the same result.
    """
    archive, root = Path(archive), Path(target_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                _member_target(root, m.filename)
                if (m.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ValueError(f"refusing archive entry {m.filename!r}: symbolic link")
            out = []
            for m in members:
                target = _member_target(root, m.filename)
                if m.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not (target.is_file() and target.stat().st_size == m.file_size):
                    zf.extract(m, root)
                out.append(target)
            return out
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _member_target(root, m.name)
                if not (m.isfile() or m.isdir()):
                    raise ValueError(f"refusing archive entry {m.name!r}: links and devices are not allowed")
            out = []
            for m in members:
                target = _member_target(root, m.name)
                if m.isfile():
                    if not (target.is_file() and target.stat().st_size == m.size):
                        tf.extract(m, root, set_attrs=False, filter="data")
                    out.append(target)
                else:
                    target.mkdir(parents=True, exist_ok=True)
            return out
    raise ValueError(f"{archive} is neither a zip nor a tar archive (corrupt or truncated download?)")


def file_fingerprint(path) -> str:
    """The first 16 hex digits of the SHA-256 of a prepared dataset's manifest."""
    path = Path(path)
    if not path.is_file():
        raise MissingDatasetError("manifest", path, "python data_scripts/msi_mss.py --help (or polyp.py)")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
