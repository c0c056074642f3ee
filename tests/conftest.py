"""Shared fixtures: the real data folder beside the checkout, and a local HTTP server."""
from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _files_under(*folders: str) -> dict:
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in (REPO / folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def data_outside_the_checkout(tmp_path_factory):
    """Tests write data (the synthetic default, caches, downloads) under a temporary MTML_DATA_DIR,
    never into the checkout: afterwards its data/ and runs/ must be exactly as before."""
    before = _files_under("data", "runs")
    previous = os.environ.get("MTML_DATA_DIR")
    os.environ["MTML_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
    yield
    if previous is None:
        os.environ.pop("MTML_DATA_DIR", None)
    else:
        os.environ["MTML_DATA_DIR"] = previous
    changed = sorted(set(_files_under("data", "runs").items()) ^ set(before.items()))
    assert not changed, f"the tests wrote into the checkout's data/ or runs/: {[path for path, _ in changed][:5]}"


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (real files, never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real test data not found at {SHARED_DATA}: CI must run the real-data tests (see its SOURCES.md)")
        pytest.skip(f"real test data not found at {SHARED_DATA} (see its SOURCES.md)")
    return SHARED_DATA


class LocalServer:
    """Serves `files` (url path -> bytes) on 127.0.0.1 at a random port.

    `interrupt[path] = n` makes the next n requests for `path` announce the full length, send
    half the body and close the connection. `hits[path]` counts requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.interrupt: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.interrupt.get(path, 0) > 0:
                    server.interrupt[path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    server = LocalServer()
    yield server
    server.close()


SMOKE_GRID = ["--task", "classification", "--modes", "kd", "ml", "kd_ml", "--seeds", "0", "1", "--smoke",
              "--param", "EPOCHS=1", "--param", "TILE_SIZE=16"]


@pytest.fixture(scope="session")
def smoke_grid(tmp_path_factory) -> tuple[list, Path]:
    """(argv, runs folder) of one small reproduction grid run once, as one job, through the real
    notebooks (papermill): the runner's test and the --jobs/--shard test both read it. Synthetic
    tiles, one torch thread per kernel (what each of --jobs 2 gets on 2 cores, so the numbers match)."""
    from mtml import reproduce

    folder = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTML_SHARED_DATA", str(folder / "none"))
        mp.setenv("OMP_NUM_THREADS", "1")
        assert reproduce.main([*SMOKE_GRID, "--runs-dir", str(folder / "one")]) == 0
    return SMOKE_GRID, folder / "one"
