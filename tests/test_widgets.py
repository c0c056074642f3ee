"""mtml.widgets without a kernel: the static copy beside each live view, the fixed gradient axis,
and the form's one-line errors."""
from __future__ import annotations

import base64
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from mtml import widgets  # noqa: E402

TEACHER, STUDENT = [6.0, 3.5, 2.0, -1.0, -2.0], [2.0, 2.5, 0.5, 0.0, -1.0]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def test_temperature_explorer_carries_its_figure_and_a_readable_slider():
    ui = widgets.temperature_explorer(TEACHER, STUDENT, value=2.0)
    bundle = ui._repr_mimebundle_()
    assert WIDGET_VIEW in bundle and base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert ui.kwargs == {"temperature": 2.0}  # still an ipywidgets interactive
    slider = ui.children[0]
    assert slider.description == "temperature" and slider.style.description_width == "initial"
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

    ui = widgets.dropdown_figure(draw, ["p1", "p2"], "patient")
    ui.children[0].value = "p2"
    assert drawn == ["p1", "p2"] and "image/png" in ui._repr_mimebundle_()
    ui.close()


def _press(form):
    form.children[-2].click()


def _printed(capsys) -> list[str]:
    """What the form printed, without the terminal codes of Output.clear_output (no frontend here)."""
    return [line for line in re.sub(r"\x1b\[2K\r?", "", capsys.readouterr().out).splitlines() if line]


def test_cohort_form_shows_any_error_as_one_line(capsys):
    form = widgets.cohort_form(lambda **choices: train)  # noqa: F821  (the data cell was not run)
    assert "JupyterLab" in form._repr_mimebundle_()["text/html"]
    _press(form)
    assert _printed(capsys) == ["cannot run: NameError: name 'train' is not defined. " + widgets.NAME_ERROR_HINT]

    def broken(**choices):
        raise RuntimeError("out of memory")

    form = widgets.cohort_form(broken)
    _press(form)
    _press(form)  # still usable
    assert _printed(capsys) == ["cannot run: RuntimeError: out of memory"] * 2


def test_cohort_form_lets_an_interrupt_through():
    def interrupted(**choices):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _press(widgets.cohort_form(interrupted))
