"""The offline handout (mtml.handout): static HTML copies of executed notebooks that load nothing
from the network, typeset formulas with a local MathJax and show each widget's static figure.

The browser test opens a page in Debian's headless chromium with every connection sent to a dead
proxy; it skips without /usr/bin/chromium, except in CI (`CI` set), where it fails."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

from mtml.teach.handout import WIDGET_NOTE, WIDGET_VIEW, static_widgets, write_handout

FORMULA = r"$$L = \tau^2 \mathrm{KL}(p \| q)$$"
WIDGET_CELL = ("from mtml.teach.widgets import temperature_explorer\n"
               "temperature_explorer([3.0, 1.0, -1.0], [1.0, 1.5, 0.0], ['a', 'b', 'c'])")


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    """A folder as `make demo` leaves it: one notebook executed by a real kernel (a formula and
    the real temperature widget) and one never run; then the handout of it."""
    folder = tmp_path_factory.mktemp("demo")
    executed = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell(f"# Tiny: the KD loss\n\nThe loss:\n\n{FORMULA}"),
        nbformat.v4.new_code_cell(WIDGET_CELL)])
    (folder / "01_tiny").mkdir()
    NotebookClient(executed, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(folder / "01_tiny")}}).execute()
    nbformat.write(executed, folder / "01_tiny" / "01_tiny.ipynb")
    (folder / "02_plain").mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("text\n\n## Plain & simple")]),
                   folder / "02_plain" / "02_plain.ipynb")
    (folder / "02_plain" / "scratch.ipynb").write_text((folder / "02_plain" / "02_plain.ipynb").read_text())
    return folder, write_handout(folder), executed


def _urls(page: str, tag: str, attribute: str) -> list[str]:
    return re.findall(rf'<{tag}\b[^>]*\b{attribute}="([^"]*)"', page)


def test_the_pages_load_nothing_from_the_network(handout):
    folder, _, _ = handout
    for page in (folder / "01_tiny" / "01_tiny.html", folder / "02_plain" / "02_plain.html", folder / "index.html"):
        text = page.read_text()
        remote = [u for u in _urls(text, "script", "src") + _urls(text, "link", "href")
                  if u.startswith(("http://", "https://", "//"))]
        assert not remote, f"{page.name} loads {remote}"


def test_mathjax_is_local_beside_the_pages(handout):
    folder, _, _ = handout
    page = folder / "01_tiny" / "01_tiny.html"
    sources = [u for u in _urls(page.read_text(), "script", "src") if "MathJax.js" in u]
    assert len(sources) == 1, sources
    assert (page.parent / sources[0].split("?")[0]).resolve().is_file()
    assert "TeX-AMS-MML_HTMLorMML-full" in sources[0]
    size = sum(f.stat().st_size for f in (folder / "_static" / "mathjax").rglob("*") if f.is_file())
    assert size < 4e6, f"the local MathJax copy is {size / 1e6:.1f} MB"


def test_the_widget_shows_its_static_figure(handout):
    folder, _, executed = handout
    data = executed.cells[1].outputs[-1]["data"]
    assert WIDGET_VIEW in data and "image/png" in data  # what the kernel sent: live view + static copy
    page = (folder / "01_tiny" / "01_tiny.html").read_text()
    assert f"data:image/png;base64,{data['image/png'].strip()}" in page.replace("\n", "")
    assert WIDGET_VIEW not in page and "widget-state+json" not in page
    base64.b64decode(data["image/png"], validate=True)


def test_index_links_every_executed_notebook_in_order(handout):
    folder, index, _ = handout
    assert index == folder / "index.html"
    text = index.read_text()
    links = _urls(text, "a", "href")
    assert links == ["01_tiny/01_tiny.html", "02_plain/02_plain.html"]  # not scratch.ipynb
    assert all((folder / link).is_file() for link in links)
    assert "Tiny: the KD loss" in text and "Plain &amp; simple" in text
    assert "static copies" in text and "JupyterLab" in text


def test_a_widget_without_a_static_copy_says_where_to_use_it():
    nb = {"metadata": {"widgets": {"state": {}}}, "cells": [{"cell_type": "code", "outputs": [
        {"output_type": "display_data", "data": {WIDGET_VIEW: {"model_id": "x"}, "text/plain": "IntSlider(value=3)"}},
        {"output_type": "display_data", "data": {WIDGET_VIEW: {"model_id": "y"}, "text/html": "<p>note</p>",
                                                 "text/plain": "VBox()"}}]}]}
    outputs = static_widgets(nb)["cells"][0]["outputs"]
    assert outputs[0]["data"] == {"text/plain": WIDGET_NOTE}
    assert outputs[1]["data"] == {"text/html": "<p>note</p>", "text/plain": "VBox()"}
    assert "widgets" not in nb["metadata"]


def test_a_cell_of_several_widgets_says_so_once():
    """A training cell's live curves are several widgets: one note, the cell's other outputs kept."""
    def live():
        return {"output_type": "display_data", "data": {WIDGET_VIEW: {"model_id": "z"}, "text/plain": "HBox()"}}
    text = {"output_type": "stream", "name": "stdout", "text": "epoch 1\n"}
    nb = {"cells": [{"cell_type": "code", "outputs": [live(), text, live(), live()]},
                    {"cell_type": "code", "outputs": [live()]}]}
    first, second = (cell["outputs"] for cell in static_widgets(nb)["cells"])
    assert [o.get("data", {}).get("text/plain") for o in first] == [WIDGET_NOTE, None]
    assert first[1] == text
    assert second[0]["data"] == {"text/plain": WIDGET_NOTE}


def _chromium() -> str:
    found = shutil.which("chromium")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing (apt-get install chromium); CI must run the browser test")
        pytest.skip("Debian's chromium is missing")
    return found


def test_formulas_render_offline_in_a_browser(handout, tmp_path):
    folder, _, _ = handout
    page = folder / "01_tiny" / "01_tiny.html"
    dom = subprocess.run(
        [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-extensions", "--disable-background-networking",
         f"--user-data-dir={tmp_path / 'profile'}",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network at all
         "--virtual-time-budget=8000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180).stdout
    assert 'class="MathJax_Display"' in dom, dom[-2000:]   # the $$...$$ formula, typeset
    assert re.search(r'class="MJX[-_]', dom)
    assert 'class="MathJax_Error"' not in dom and "MathJax_FontWarning" not in dom  # no TeX error, fonts found
    assert "data:image/png;base64" in dom


def test_a_broken_notebook_is_listed_not_fatal(tmp_path):
    """One unreadable executed notebook costs only its own page."""
    import nbformat

    from mtml.teach.handout import write_handout

    good = tmp_path / "00_good" / "00_good.ipynb"
    good.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Good")]), good)
    bad = tmp_path / "01_bad" / "01_bad.ipynb"
    bad.parent.mkdir()
    bad.write_text("{ not json")
    index = write_handout(tmp_path).read_text()
    assert "00_good/00_good.html" in index and "01_bad: no HTML copy" in index
    assert (tmp_path / "00_good" / "00_good.html").is_file()
