"""mtml.widgets without a kernel: the static copy beside each live view, the fixed gradient axis,
and the form's one-line errors."""
from __future__ import annotations

import base64
import html
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from mtml import widgets  # noqa: E402

TEACHER, STUDENT = [6.0, 3.5, 2.0, -1.0, -2.0], [2.0, 2.5, 0.5, 0.0, -1.0]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_temperature_explorer_carries_its_figure_and_a_readable_slider():
    open_before = set(plt.get_fignums())  # figures other tests left open
    ui = widgets.temperature_explorer(TEACHER, STUDENT, value=2.0)
    bundle = ui._repr_mimebundle_()
    assert WIDGET_VIEW in bundle and base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    slider, image, problem = ui.children
    assert slider.description == "temperature" and slider.style.description_width == "initial"
    assert image.value == base64.b64decode(bundle["image/png"])  # the live view starts at the static copy
    slider.value = 8.0
    assert bytes(image.value).startswith(b"\x89PNG") and image.value != base64.b64decode(bundle["image/png"])
    assert problem.value == "" and set(plt.get_fignums()) == open_before
    ui.close()


def test_widgets_build_no_output_widget():
    """Output widgets are what nbclient-based runners (papermill, nbconvert) can hang on: none is
    created when the widgets are built, nor when they are used."""
    import ipywidgets

    def outputs():
        return {k for k, w in ipywidgets.Widget.widgets.items() if getattr(w, "_model_name", "") == "OutputModel"}

    before = outputs()
    explorer = widgets.temperature_explorer(TEACHER, STUDENT)
    form = widgets.cohort_form(lambda **c: print("trained"))
    dropdown = widgets.dropdown_figure(lambda o: plt.subplots()[0], ["a", "b"])
    explorer.children[0].value = 8.0
    dropdown.children[0].value = "b"
    _press(form)
    assert outputs() == before
    for ui in (explorer, form, dropdown):
        ui.close()


def test_a_failed_redraw_says_why_and_leaks_no_figure():
    def draw(option):
        fig = plt.figure()
        if option == "bad":
            raise ValueError("no such patient")
        return fig

    open_before = set(plt.get_fignums())
    ui = widgets.dropdown_figure(draw, ["good", "bad"])
    first = ui.children[1].value
    ui.children[0].value = "bad"
    assert "ValueError: no such patient" in ui.children[2].value and ui.children[1].value == first
    assert set(plt.get_fignums()) == open_before
    ui.children[0].value = "good"
    assert ui.children[2].value == ""
    ui.close()


def test_the_gradient_axis_stays_fixed_while_tau_moves():
    limits = []
    for tau in (0.5, 4.0, 20.0):
        fig = widgets.softening_figure(TEACHER, STUDENT, tau, grad_ylim=0.9)
        limits.append(fig.axes[1].get_ylim())
        plt.close(fig)
    assert limits == [(-0.9, 0.9)] * 3


def test_dropdown_figure_redraws_and_keeps_the_first_figure():
    drawn = []

    def draw(option):
        drawn.append(option)
        fig, ax = plt.subplots()
        ax.set_title(option)
        return fig

    open_before = set(plt.get_fignums())
    ui = widgets.dropdown_figure(draw, ["p1", "p2"], "patient")
    first = ui.children[1].value
    ui.children[0].value = "p2"
    assert drawn == ["p1", "p2"] and ui.children[1].value != first
    assert base64.b64decode(ui._repr_mimebundle_()["image/png"]) == first  # the static copy stays the first
    assert set(plt.get_fignums()) == open_before, "every drawn figure is closed"
    ui.close()


def _press(form) -> str:
    """Presses the form's button; returns what the form shows below it, as text."""
    form.children[-2].click()
    return html.unescape(re.sub(r"<[^>]+>", "", form.children[-1].value)).strip()


def test_cohort_form_shows_what_the_run_printed_and_returned():
    import pandas as pd

    def run(**choices):
        print(f"mode {choices['mode']}")
        return pd.DataFrame({"auroc": [0.75]}, index=["ensemble"])

    form = widgets.cohort_form(run, dict(mode="kd"))
    shown = _press(form)
    assert "mode kd" in shown and "ensemble" in shown and "0.75" in shown
    assert "<table" in form.children[-1].value


def test_cohort_form_shows_any_error_as_one_line():
    form = widgets.cohort_form(lambda **choices: train)  # noqa: F821  (the data cell was not run)
    assert "JupyterLab" in form._repr_mimebundle_()["text/html"]
    assert _press(form) == "cannot run: NameError: name 'train' is not defined. " + widgets.NAME_ERROR_HINT

    def broken(**choices):
        raise RuntimeError("out of memory")

    form = widgets.cohort_form(broken)
    assert _press(form) == "cannot run: RuntimeError: out of memory"
    assert _press(form) == "cannot run: RuntimeError: out of memory"  # still usable


def test_cohort_form_lets_an_interrupt_through_and_says_so():
    def interrupted(**choices):
        print("epoch 1 done")
        raise KeyboardInterrupt

    form = widgets.cohort_form(interrupted)
    with pytest.raises(KeyboardInterrupt):
        form.children[-2].click()
    shown = html.unescape(re.sub(r"<[^>]+>", " ", form.children[-1].value))
    assert "epoch 1 done" in shown and "interrupted" in shown and "training..." not in shown


def test_cohort_form_without_a_table_repr_or_result():
    class NoHtml:
        def _repr_html_(self):
            return None

        def __str__(self):
            return "plain result"

    assert _press(widgets.cohort_form(lambda **c: NoHtml())) == "plain result"
    assert _press(widgets.cohort_form(lambda **c: None)) == "done"
