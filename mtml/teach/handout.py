"""An offline handout: static HTML copies of the executed notebooks that need no network.

    python -m mtml.teach.handout runs/demo      # make demo does this at its end

`write_handout(folder)` converts every `<folder>/<name>/<name>.ipynb` to `<folder>/<name>/<name>.html`
and writes `<folder>/index.html` linking them. Formulas are typeset by a local MathJax 2.7 (the one
`jupyter_server_mathjax` ships, about 2 MB copied once into `<folder>/_static/mathjax/`); figures
are embedded in the page; a widget shows the static copy of its default state that `mtml.widgets`
stores beside its live view. Nothing is loaded from a CDN: no require.js, no widget manager, no
mermaid (the page has no live widget to drive).
"""
from __future__ import annotations

import html
import os
import shutil
import sys
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
STATIC = ("image/png", "image/jpeg", "image/svg+xml", "text/html")
WIDGET_NOTE = "(an interactive widget: open the notebook in JupyterLab to use it)"
MATHJAX = Path("_static") / "mathjax"
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"
# What typesets TeX with the HTML-CSS output and STIX-Web fonts (the rest of the package:
# localisations, the accessibility explorer's speech maps, SVG output fonts, is left out).
MATHJAX_FILES = ("MathJax.js", "LICENSE", "config/*.js", "extensions/*.js", "extensions/TeX/*.js",
                 "extensions/HTML-CSS/*.js", "extensions/a11y/accessibility-menu.js", "jax/element/**/*.js",
                 "jax/input/TeX/*.js", "jax/output/HTML-CSS/**/*.js", "fonts/HTML-CSS/STIX-Web/woff/*.woff")

# nbconvert's lab template without anything it would fetch from a CDN, and MathJax set to the
# fonts shipped with it (STIX-Web, no image fonts).
TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js_requirejs %}{% endblock %}
{% block jupyter_widgets %}{% endblock %}
{% block html_head_js_mermaidjs %}{% endblock %}
{% block html_head_js_mathjax %}
<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']],
            processEscapes: true, processEnvironments: true},
  TeX: {equationNumbers: {autoNumber: "AMS", useLabelIds: true}},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null},
  displayAlign: "center", messageStyle: "none"
});
</script>
<script src="{{ resources.mathjax_url }}"></script>
{% endblock %}
"""


def mathjax_source() -> Path:
    """The MathJax 2.7 folder of the `jupyter_server_mathjax` package."""
    try:
        import jupyter_server_mathjax
    except ImportError as err:
        raise RuntimeError("the handout needs the jupyter-server-mathjax package (requirements.txt): "
                           "pip install -r requirements.txt") from err
    return Path(jupyter_server_mathjax.__file__).parent / "static"


def copy_mathjax(target: Path) -> Path:
    """Copies the MathJax files the handout needs into `target` (once: kept when there)."""
    if (target / "MathJax.js").is_file():
        return target
    source = mathjax_source()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for pattern in MATHJAX_FILES:
        for path in source.glob(pattern):
            (partial / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, partial / path.relative_to(source))
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)  # whole or absent: an interrupted copy is redone next time
    return target


def static_widgets(nb: dict) -> dict:
    """`nb` with every widget output reduced to its static copy (`mtml.widgets` stores one beside
    the live view); a widget without one says to open the notebook, once per cell (a training
    cell's live curves are several widgets). The widget state goes too."""
    for cell in nb.get("cells", []):
        kept, noted = [], False
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if data.pop(WIDGET_VIEW, None) is not None and not any(m in data for m in STATIC):
                if noted:
                    continue
                data.clear()
                data["text/plain"], noted = WIDGET_NOTE, True
            kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def notebook_title(nb: dict, default: str) -> str:
    """The notebook's first markdown heading, without its #'s."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            for line in source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return default


def notebook_html(notebook: Path, mathjax_js: Path) -> tuple[str, str]:
    """(title, HTML) of one executed notebook, its MathJax loaded from `mathjax_js` (relative)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    title = notebook_title(nb, notebook.stem)
    nb.metadata["title"] = title
    url = Path(os.path.relpath(mathjax_js, notebook.parent)).as_posix()
    exporter = HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"handout.html.j2": TEMPLATE})],
                            template_file="handout.html.j2", mathjax_url=f"{url}?config={MATHJAX_CONFIG}")
    body, _ = exporter.from_notebook_node(static_widgets(nb))
    return title, body


def write_handout(folder: Path) -> Path:
    """Writes `<folder>/<name>/<name>.html` for every executed notebook `<folder>/<name>/<name>.ipynb`
    and `<folder>/index.html` linking them in order; returns the index."""
    folder = Path(folder)
    notebooks = sorted(p for p in folder.glob("*/*.ipynb") if p.stem == p.parent.name)
    mathjax = copy_mathjax(folder / MATHJAX)
    links = []
    for notebook in notebooks:
        try:
            title, body = notebook_html(notebook, mathjax / "MathJax.js")
        except Exception as err:  # one unreadable notebook never costs the others their pages
            links.append(f"  <li>{html.escape(notebook.stem)}: no HTML copy ({html.escape(type(err).__name__)}: "
                         f"{html.escape(str(err))})</li>")
            continue
        page = notebook.with_suffix(".html")
        page.write_text(body, encoding="utf-8")
        links.append(f'  <li><a href="{html.escape(page.relative_to(folder).as_posix())}">'
                     f"{html.escape(title)}</a> <small>({html.escape(notebook.stem)})</small></li>")
    index = folder / "index.html"
    index.write_text("\n".join([
        '<!DOCTYPE html>', '<html lang="en">', '<head><meta charset="utf-8">',
        "<title>Knowledge distillation with mutual learning: the notebooks</title>",
        "<style>body { font-family: sans-serif; max-width: 50em; margin: 2em auto; line-height: 1.5 }</style>",
        "</head>", "<body>", "<h1>Knowledge distillation with mutual learning: the notebooks</h1>",
        "<p>These are static copies of the executed notebooks: they open without network, and each "
        "widget shows its default state as a picture. Open the <code>.ipynb</code> beside each page in "
        "JupyterLab for the live widgets.</p>",
        "<ol>", *(links or ["  <li>no executed notebook found</li>"]), "</ol>",
        "</body>", "</html>", ""]), encoding="utf-8")
    return index


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m mtml.teach.handout FOLDER   (FOLDER/<name>/<name>.ipynb, e.g. runs/demo)", file=sys.stderr)
        return 2
    print(f"handout: {write_handout(Path(args[0]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
