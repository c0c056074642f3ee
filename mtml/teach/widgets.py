"""ipywidgets for the notebooks. Every widget shows its default state at once, so headless runs
(papermill, nbval) never wait for a click. Each also carries a static copy of that state in its
display data (`image/png` of the figure, or a `text/html` note for the form): JupyterLab shows
the live widget, an offline HTML copy (`mtml.handout`) shows the static one."""
from __future__ import annotations

import base64
import contextlib
import html
import io

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..core.losses import kd_loss
from ..core.cohort import MODES

TEMPERATURES = dict(min=0.5, max=20.0, step=0.5)  # the temperature sliders' range
WIDE_LABEL = {"description_width": "initial"}     # a slider's whole description, never "temperat..."


def kd_gradient(teacher_logits, student_logits, temperature: float) -> np.ndarray:
    """d/dz_S [tau^2 KL(p_T^tau || p_S^tau)] = tau (p_S^tau - p_T^tau), one sample."""
    t = torch.as_tensor(teacher_logits, dtype=torch.float64)
    s = torch.as_tensor(student_logits, dtype=torch.float64).clone().requires_grad_(True)
    kd_loss(s[None], t[None], temperature).backward()
    return s.grad.numpy()


def softening_figure(teacher_logits, student_logits, temperature: float, class_names=None,
                     grad_ylim: float | None = None):
    """Teacher and student probabilities at `temperature`, and the KD gradient on the student's
    logits. `grad_ylim`: the gradient panel's y axis is fixed to [-grad_ylim, grad_ylim]
    (otherwise it fits the bars)."""
    t = torch.as_tensor(teacher_logits, dtype=torch.float64)
    s = torch.as_tensor(student_logits, dtype=torch.float64)
    names = class_names or [f"class {k}" for k in range(len(t))]
    x = np.arange(len(t))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].bar(x - 0.2, torch.softmax(t / temperature, 0).numpy(), 0.4, label="teacher")
    axes[0].bar(x + 0.2, torch.softmax(s / temperature, 0).numpy(), 0.4, label="student")
    axes[0].set(xticks=x, xticklabels=names, ylim=(0, 1), title=f"softmax(z / {temperature:.1f})")
    axes[0].legend()
    axes[1].bar(x, kd_gradient(t, s, temperature), color="tab:red")
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set(xticks=x, xticklabels=names, title="KD gradient on the student's logits")
    if grad_ylim:
        axes[1].set_ylim(-grad_ylim, grad_ylim)
    fig.tight_layout()
    return fig


def _with_static(widget, png: bytes | None = None, note: str | None = None):
    """`widget`, whose display data also holds `png` (image/png) or `note` (text/html): JupyterLab
    renders the widget view, a viewer without the live widget (an offline HTML copy) the static
    one. The widget stays itself (its attributes, inside boxes), only its display data grows."""
    static = {}
    if png is not None:
        static["image/png"] = base64.b64encode(png).decode("ascii")
    if note is not None:
        static["text/html"] = f"<p><em>{html.escape(note)}</em></p>"
    live = widget._repr_mimebundle_  # ipywidgets itself sets this attribute per instance on close()
    widget._repr_mimebundle_ = lambda **kwargs: {**static, **(live(**kwargs) or {})}
    return widget


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _figure_widget(draw, control):
    """`control` above an `Image` of `draw(control.value) -> Figure`, redrawn as PNG bytes whenever
    the control changes; the first figure is also the static copy. No `Output` widget: headless
    runners built on nbclient (papermill, nbconvert) can hang on one (jupyter/nbclient#312), while
    an Image's value is plain widget state that every runner and front end handles."""
    import ipywidgets as w

    def png_of(value) -> bytes:
        before = set(plt.get_fignums())
        try:
            return _png(draw(value))
        finally:  # also a figure that `draw` left half-made when it raised
            for number in set(plt.get_fignums()) - before:
                plt.close(number)

    first = png_of(control.value)
    image = w.Image(value=first, format="png", layout=w.Layout(max_width="100%"))
    problem = w.HTML()  # a failed redraw says why here, instead of only in the log console

    def redraw(change):
        try:
            image.value, problem.value = png_of(change["new"]), ""
        except Exception as err:
            problem.value = f"<pre>cannot draw {html.escape(repr(change['new']))}: {html.escape(f'{type(err).__name__}: {err}')}</pre>"

    control.observe(redraw, names="value")
    return _with_static(w.VBox([control, image, problem]), png=first)


def temperature_explorer(teacher_logits, student_logits, class_names=None, value: float = 4.0):
    """A slider over the temperature redrawing `softening_figure`; the gradient panel keeps one
    y axis over the slider's whole range, so the bars' size changes as tau moves."""
    import ipywidgets as w

    taus = np.arange(TEMPERATURES["min"], TEMPERATURES["max"] + TEMPERATURES["step"] / 2, TEMPERATURES["step"])
    ylim = 1.1 * max(np.abs(kd_gradient(teacher_logits, student_logits, tau)).max() for tau in taus)
    slider = w.FloatSlider(value=value, **TEMPERATURES, description="temperature",
                           continuous_update=False, style=WIDE_LABEL)
    return _figure_widget(lambda tau: softening_figure(teacher_logits, student_logits, tau, class_names, ylim),
                          slider)


def dropdown_figure(draw, options, description: str = "", value=None):
    """A dropdown over `options` redrawing `draw(option) -> matplotlib Figure` (return the
    figure, don't call plt.show)."""
    import ipywidgets as w

    options = list(options)
    dropdown = w.Dropdown(options=options, value=options[0] if value is None else value,
                          description=description, style=WIDE_LABEL)
    return _figure_widget(draw, dropdown)


NAME_ERROR_HINT = "Run the cells above first (the Data cell defines train/val/test)."


def cohort_form(run, defaults: dict | None = None):
    """A small form (mode, students, temperature, weights) and a button that calls
    `run(mode=..., n_students=..., temperature=..., w_ce=..., w_kd=..., w_ml=...)` and shows what it
    printed and what it returned (a DataFrame as a table) below, once it ends (`display()` inside
    `run` shows nothing: return what to show). Nothing runs until the button is
    pressed; an error shows as one line there, and the form stays usable. The result is an `HTML`
    widget's value, not an `Output` widget (see `_figure_widget`)."""
    import ipywidgets as w

    d = {"mode": "kd_ml", "n_students": 2, "temperature": 4.0, "w_ce": 1.0, "w_kd": 1.0,
         "w_ml": 1.0, **(defaults or {})}
    controls = {
        "mode": w.Dropdown(options=list(MODES), value=d["mode"], description="mode"),
        "n_students": w.IntSlider(value=d["n_students"], min=1, max=6, description="students"),
        "temperature": w.FloatSlider(value=d["temperature"], **TEMPERATURES, description="temperature",
                                     style=WIDE_LABEL),
        **{k: w.FloatSlider(value=d[k], min=0, max=5, step=0.1, description=k)
           for k in ("w_ce", "w_kd", "w_ml")},
    }
    button = w.Button(description="train", button_style="primary", icon="play")
    result = w.HTML()

    def clicked(_):
        result.value = "<em>training...</em>"
        printed, shown = io.StringIO(), "interrupted"
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                shown = run(**{k: c.value for k, c in controls.items()})
        except Exception as err:  # say why in one line, keep the form usable (Ctrl-C still stops)
            message = f"cannot run: {type(err).__name__}: {err}"
            shown = f"{message}. {NAME_ERROR_HINT}" if isinstance(err, NameError) else message
        finally:  # also after Ctrl-C: what the run printed, and why it stopped
            result.value = (_as_html(printed.getvalue()) + _as_html(shown)) or "<em>done</em>"

    button.on_click(clicked)
    return _with_static(w.VBox([*controls.values(), button, result]),
                        note="interactive form: open the notebook in JupyterLab to train")


def _as_html(shown) -> str:
    """A DataFrame (anything with `_repr_html_`) as its table, other text as preformatted lines."""
    if shown is None or (isinstance(shown, str) and not shown.strip()):
        return ""
    table = shown._repr_html_() if hasattr(shown, "_repr_html_") else None
    return table or f"<pre>{html.escape(str(shown).rstrip())}</pre>"
