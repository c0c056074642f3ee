"""ipywidgets for the notebooks. Every widget shows its default state at once, so headless runs
(papermill, nbval) never wait for a click."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .losses import kd_loss
from .train import MODES


def softening_figure(teacher_logits, student_logits, temperature: float, class_names=None):
    """Teacher and student probabilities at `temperature`, and the KD gradient on the student's
    logits: d/dz_S [tau^2 KL(p_T^tau || p_S^tau)] = tau (p_S^tau - p_T^tau)."""
    t = torch.as_tensor(teacher_logits, dtype=torch.float64)
    s = torch.as_tensor(student_logits, dtype=torch.float64).clone().requires_grad_(True)
    kd_loss(s[None], t[None], temperature).backward()
    names = class_names or [f"class {k}" for k in range(len(t))]
    x = torch.arange(len(t)).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].bar(x - 0.2, torch.softmax(t / temperature, 0).numpy(), 0.4, label="teacher")
    axes[0].bar(x + 0.2, torch.softmax(s.detach() / temperature, 0).numpy(), 0.4, label="student")
    axes[0].set(xticks=x, xticklabels=names, ylim=(0, 1), title=f"softmax(z / {temperature:.1f})")
    axes[0].legend()
    axes[1].bar(x, s.grad.numpy(), color="tab:red")
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set(xticks=x, xticklabels=names, title="KD gradient on the student's logits")
    fig.tight_layout()
    return fig


def temperature_explorer(teacher_logits, student_logits, class_names=None, value: float = 4.0):
    """A slider over the temperature redrawing `softening_figure`."""
    import ipywidgets as w

    def show(temperature):
        fig = softening_figure(teacher_logits, student_logits, temperature, class_names)
        plt.show(fig)

    slider = w.FloatSlider(value=value, min=0.5, max=20.0, step=0.5, description="temperature",
                           continuous_update=False)
    return w.interactive(show, temperature=slider)


def cohort_form(run, defaults: dict | None = None):
    """A small form (mode, students, temperature, weights) and a button that calls
    `run(mode=..., n_students=..., temperature=..., w_ce=..., w_kd=..., w_ml=...)` and shows its
    output below. Nothing runs until the button is pressed."""
    import ipywidgets as w

    d = {"mode": "kd_ml", "n_students": 2, "temperature": 4.0, "w_ce": 1.0, "w_kd": 1.0,
         "w_ml": 1.0, **(defaults or {})}
    controls = {
        "mode": w.Dropdown(options=list(MODES), value=d["mode"], description="mode"),
        "n_students": w.IntSlider(value=d["n_students"], min=1, max=6, description="students"),
        "temperature": w.FloatSlider(value=d["temperature"], min=0.5, max=20, step=0.5,
                                     description="temperature"),
        **{k: w.FloatSlider(value=d[k], min=0, max=5, step=0.1, description=k)
           for k in ("w_ce", "w_kd", "w_ml")},
    }
    button = w.Button(description="train", button_style="primary", icon="play")
    out = w.Output()

    def clicked(_):
        out.clear_output()
        with out:
            try:
                run(**{k: c.value for k, c in controls.items()})
            except ValueError as err:  # impossible settings: say why, keep the form usable
                print(f"cannot run: {err}")

    button.on_click(clicked)
    return w.VBox([*controls.values(), button, out])
