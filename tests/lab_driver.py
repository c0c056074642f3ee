"""Drive notebooks in a real JupyterLab with headless Chromium (Playwright), as a learner would.

`LabServer` starts JupyterLab on 127.0.0.1 (random port and token) in a temporary root folder and
always stops it, kernels included. `run_in_lab` opens one notebook, clicks Run > Run All Cells, waits
for the kernel, saves, and returns a `LabReport` of what the page and the saved notebook show.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-extensions",
]
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# Settings of our lab: every cell in the DOM (no virtual scrolling), no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """All descendants of `pid` (read from /proc), so kernels in their own sessions are found too."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


class LabServer:
    """JupyterLab from this interpreter's environment, serving `root`; `env` is added to its env."""

    def __init__(self, root: Path, state: Path, env: dict[str, str]):
        self.root, self.token, self.port = root, secrets.token_hex(16), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = state / "jupyterlab.log"
        settings = state / "user-settings"
        for plugin, values in LAB_SETTINGS.items():
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.env = {**os.environ, **env, "JUPYTER_CONFIG_DIR": str(state / "config"),
                    "JUPYTER_RUNTIME_DIR": str(state / "runtime"), "IPYTHONDIR": str(state / "ipython"),
                    "JUPYTER_PLATFORM_DIRS": "1"}
        self.cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            f"--ServerApp.token={self.token}", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--notebook-dir={root}",
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly", f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={state / 'workspaces'}",
        ]
        self.proc: subprocess.Popen | None = None

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(self.url + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self):
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.root, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"JupyterLab exited ({self.proc.returncode}):\n{self.log_tail()}")
                try:
                    self.api("/api/status")
                    return self
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"JupyterLab did not answer in 120 s:\n{self.log_tail()}")
                    time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    def kernel_pids(self) -> list[int]:
        return [pid for pid in _children(self.proc.pid) if "ipykernel_launcher" in cmdline(pid)]

    def stop(self):
        """Graceful shutdown (kernels too), then SIGKILL for the server's group and every descendant."""
        if self.proc is None or self.proc.poll() is not None:
            return
        descendants = _children(self.proc.pid)
        try:
            self.api("/api/shutdown", method="POST")
            self.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for pid in [self.proc.pid, *descendants]:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.proc.wait(timeout=15)


@dataclass
class LabReport:
    """What one notebook showed after Run All Cells (page) and what it saved (json)."""
    name: str
    prompts: list[str] = field(default_factory=list)       # "[3]:" per non-empty code cell
    tracebacks: list[str] = field(default_factory=list)    # stderr outputs holding a traceback
    saved_errors: list[str] = field(default_factory=list)  # error outputs in the saved notebook
    widget_outputs: int = 0        # widget-view outputs the kernel sent (saved notebook)
    widget_texts: set[str] = field(default_factory=set)    # their text/plain, e.g. "IntSlider(value=3)"
    live_widgets: int = 0          # widget outputs on the page holding a live widget view
    widget_failures: list[str] = field(default_factory=list)  # "Error displaying widget", ...
    plain_texts: list[str] = field(default_factory=list)   # text/plain outputs on the page
    image_outputs: int = 0         # image outputs the kernel sent (saved notebook)
    images: int = 0                # decoded <img> in .jp-RenderedImage on the page
    dialogs: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    kernel_argv: list[str] = field(default_factory=list)   # the kernel process's command line
    kernel_cpu_s: float = 0.0
    interactions: dict = field(default_factory=dict)       # what `interact` saw, by name
    seconds: float = 0.0
    screenshot: Path | None = None

    @property
    def unfinished(self) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if not re.fullmatch(r"\[\d+\]:", p)]

    @property
    def text_fallbacks(self) -> list[str]:
        """Widgets shown as their text repr (no widget manager in the page)."""
        return [t for t in self.plain_texts if t in self.widget_texts or _WIDGET_REPR.match(t)]


_WIDGET_REPR = re.compile(r"^\w+\((value|children|description|layout|options|max|min)=")
_PAGE_FIELDS = ("prompts", "tracebacks", "live_widgets", "widget_failures", "plain_texts", "images",
                "dialogs")
# Read the page: prompts of non-empty code cells, stderr tracebacks, widget views, decoded images.
_READ_PAGE = """() => {
  const text = el => el ? (el.innerText || el.textContent || '').trim() : '';
  const panel = '.jp-NotebookPanel:not(.lm-mod-hidden) ';
  const all = sel => [...document.querySelectorAll(panel + sel)];
  // code cells showing a non-empty input (a folded input, e.g. the advanced knobs, shows none)
  const code = all('.jp-CodeCell').filter(c => text(c.querySelector('.jp-InputArea-editor')) !== '');
  const outs = sel => all('.jp-OutputArea-output' + sel);
  // A widget output (not nested in a widget) holds a view, or says "Loading/Error displaying widget",
  // or holds ipywidgets' error view (its JavaScript model or view failed), maybe nested in a box.
  const failed = o => /^(Error displaying|Loading) widget/.test(text(o)) ||
    o.querySelector('.jupyter-widgets-error-widget') !== null;
  const widgets = outs('').filter(o => !o.parentElement.closest('.jupyter-widgets') &&
    (o.classList.contains('jupyter-widgets') || o.querySelector(':scope > .jupyter-widgets') || failed(o)));
  const live = o => o.querySelector(':scope > .jupyter-widgets[class*="widget-"]') !== null && !failed(o);
  const prompts = all('.jp-InputPrompt').map(text);
  return {
    prompts: code.map(c => text(c.querySelector('.jp-InputPrompt')).replace(/\\s/g, '')),
    tracebacks: outs('[data-mime-type="application/vnd.jupyter.stderr"]').map(text)
      .filter(t => /Traceback|^\\w*(Error|Exception)\\b/m.test(t)).map(t => t.slice(0, 2000)),
    live_widgets: widgets.filter(live).length,
    widget_failures: widgets.filter(w => !live(w)).map(w => text(w).slice(0, 300)),
    plain_texts: outs('[data-mime-type="text/plain"]').map(text),
    images: [...all('.jp-RenderedImage img'), ...all('img.widget-image')]  // plots; figure widgets' pictures
      .filter(img => img.complete && img.naturalWidth > 0).length,
    dialogs: [...document.querySelectorAll('.jp-Dialog')].map(text),
    busy: prompts.some(p => p.includes('*')),
  };
}"""


def _session(server: LabServer, path: str) -> dict | None:
    return next((s for s in server.api("/api/sessions") if s["path"] == path), None)


def _kernel_state(server: LabServer, path: str) -> str | None:
    session = _session(server, path)
    return session and session["kernel"]["execution_state"]


def _read_saved(notebook: Path, report: LabReport) -> None:
    for cell in json.loads(notebook.read_text())["cells"]:
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                report.saved_errors.append(f"{out['ename']}: {out['evalue']}")
            data = out.get("data", {})
            if WIDGET_MIME in data:
                report.widget_outputs += 1
                report.widget_texts.add("".join(data.get("text/plain", "")).strip())
            report.image_outputs += any(m.startswith("image/") for m in data)


def _wait(what: str, check, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return value


def _end_session(server: LabServer, name: str, report: LabReport) -> None:
    """Note which interpreter ran the kernel and its CPU time, then shut the kernel down."""
    session = _session(server, name)
    if not session:
        return
    for pid in server.kernel_pids():
        argv = cmdline(pid)
        if any(f"kernel-{session['kernel']['id']}.json" in arg for arg in argv):
            report.kernel_argv = argv
            ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
            report.kernel_cpu_s = sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK")
    server.api(f"/api/sessions/{session['id']}", method="DELETE")


def run_in_lab(browser, server: LabServer, name: str, screenshot: Path, timeout: float,
               interact=None) -> LabReport:
    """Open `name` (relative to the server root), run all cells, save, then `interact(page, report)`
    if given (a learner using the widgets); screenshot even on failure."""
    report, start = LabReport(name), time.monotonic()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("console", lambda m: m.type == "error" and report.console_errors.append(m.text[:300]))
    page.on("pageerror", lambda e: report.console_errors.append(f"page error: {e}"[:300]))
    try:
        page.goto(f"{server.url}/lab/tree/{name}?reset&token={server.token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
        _wait(f"an idle kernel for {name}", lambda: (
            _kernel_state(server, name) == "idle" or page.locator(".jp-Dialog").count()), 90)
        if page.locator(".jp-Dialog").count():  # e.g. "Select Kernel": the notebook names no kernel we have
            report.dialogs = page.evaluate(_READ_PAGE)["dialogs"]
            return report
        page.locator("#jp-MainMenu .lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item:visible", has_text=re.compile(r"^Run All Cells")).first.click()
        idle_polls = 0

        def finished():  # every cell numbered, or nothing queued any more on an idle kernel (3 s)
            nonlocal idle_polls
            state, seen = _kernel_state(server, name), page.evaluate(_READ_PAGE)
            if state in (None, "dead"):  # the kernel is gone: report what ran
                return True
            if seen["busy"] or state != "idle":
                idle_polls = 0
                return False
            idle_polls += 1
            return all(re.fullmatch(r"\[\d+\]:", p) for p in seen["prompts"]) or idle_polls > 6
        _wait(f"Run All Cells to finish in {name}", finished, timeout)
        saved = server.root / name
        before = saved.stat().st_mtime_ns
        page.keyboard.press("Control+s")
        _wait(f"JupyterLab to save {name}", lambda: saved.stat().st_mtime_ns != before, 30)
        _read_saved(saved, report)
        try:  # widget views and images render asynchronously after the kernel is done
            _wait("widget views and images", lambda: (
                (s := page.evaluate(_READ_PAGE))["live_widgets"] + len(s["widget_failures"]) > 0
                or not report.widget_outputs) and s["images"] >= report.image_outputs, 30)
        except TimeoutError:
            pass  # the report says what is missing
        if interact is not None:
            interact(page, report)
    finally:
        try:
            seen = page.evaluate(_READ_PAGE)
            for key in _PAGE_FIELDS:
                setattr(report, key, seen[key])
        finally:
            report.screenshot = _screenshot(page, screenshot)
            page.close()
            _end_session(server, name, report)
            report.seconds = time.monotonic() - start
    return report


# the pictures of the Image widgets on the page, as SHA-256 of their bytes (a blob URL changes on any re-render)
_IMAGE_WIDGETS = """async () => Promise.all(
  [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) img.widget-image')].map(async img => {
    const digest = await crypto.subtle.digest('SHA-256', await (await fetch(img.src)).arrayBuffer());
    return [...new Uint8Array(digest)].map(b => b.toString(16).padStart(2, '0')).join('');
  }))"""


def move_first_slider(page, report: LabReport, timeout: float = 60) -> None:
    """Presses the right arrow on the first slider's handle (continuous_update=False sends the value
    on release) and waits for an Image widget's picture to change: `interactions["slider"]`."""
    before = page.evaluate(_IMAGE_WIDGETS)
    if not before:
        report.interactions["slider"] = "no Image widget on the page"
        return
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .widget-slider .noUi-handle").first.focus()
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    try:
        _wait("the figure to redraw", lambda: (now := page.evaluate(_IMAGE_WIDGETS)) and now != before, timeout)
        report.interactions["slider"] = "figure redrawn"
    except TimeoutError as err:
        report.interactions["slider"] = f"no redraw: {err}; images before {len(before)}"


def press_train(page, report: LabReport, timeout: float = 300) -> None:
    """Clicks the cohort form's train button and waits for its result: a table, or one line saying
    why it cannot run: `interactions["form"]`."""
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator("button.widget-button", has_text="train").first.click()
    result = panel.locator(".widget-html-content")

    def shown():
        texts = [t for t in result.all_inner_texts() if t.strip() and "training..." not in t]
        return next((t for t in texts if "ensemble" in t or "cannot run" in t), None)
    try:
        report.interactions["form"] = _wait("the form's result", shown, timeout).strip()[:500]
    except TimeoutError as err:
        report.interactions["form"] = f"no result: {err}"


def _screenshot(page, path: Path) -> Path | None:
    """The whole notebook: grow the window to the notebook's height, then one PNG."""
    try:
        height = page.evaluate("""() => {
            const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
            if (!scroller) return 0;
            scroller.scrollTop = 0;
            return document.documentElement.clientHeight - scroller.clientHeight + scroller.scrollHeight; }""")
        page.set_viewport_size({"width": 1400, "height": int(min(max(height, 1000), 16000))})
        page.wait_for_timeout(500)
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
        return path
    except Exception:  # a screenshot is a diagnostic, never the cause of a failure
        return None
