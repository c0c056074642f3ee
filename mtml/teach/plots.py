"""Plots for the notebooks: live learning curves, ROC curves, confusion matrices, comparisons."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..core.loop import Callback
from ..runs.figures import comparison_figure, plot_accuracy_vs_cost  # noqa: F401 (the notebooks' names)


def learning_curves(history: pd.DataFrame, metric: str = "accuracy", axes=None):
    """Training loss per network (left) and validation `metric` per network (right)."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    loss_cols = [c for c in history if c.endswith("/loss") or c == "train/teacher/sup"]
    for c in loss_cols:
        axes[0].plot(history["epoch"], history[c], marker="o", label=c.split("/")[1])
    axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss")
    for c in [c for c in history if c.startswith("val/") and c.endswith(f"/{metric}")]:
        name = c.split("/")[1]
        axes[1].plot(history["epoch"], history[c], marker="o", label=name,
                     lw=3 if name == "ensemble" else 1.5, ls="--" if name == "teacher" else "-")
    axes[1].set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    return axes


class LiveCurves(Callback):
    """A fit callback that redraws the learning curves after each epoch in a notebook."""

    def __init__(self, metric: str = "accuracy", title: str = ""):
        self.metric, self.title, self.handle = metric, title, None

    def on_epoch_end(self, cohort, state) -> None:
        self(pd.DataFrame(state.history))

    def __call__(self, history: pd.DataFrame):
        from IPython.display import display

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        learning_curves(history, self.metric, axes)
        fig.suptitle(self.title)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def roc_curves(probs: dict, labels: np.ndarray, ax=None, title="ROC (tile level)"):
    """One ROC curve per network for a binary task (positive class 1)."""
    from torchmetrics.functional import roc
    import torch

    ax = ax or plt.subplots(figsize=(4.5, 4.5))[1]
    y = torch.tensor(np.array(labels))  # a copy: pandas may hand out read-only arrays
    for name, p in probs.items():
        fpr, tpr, _ = roc(torch.tensor(np.array(p[:, 1])), y, task="binary")
        ax.plot(fpr, tpr, label=name, lw=3 if name == "ensemble" else 1.5)
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=8)
    return ax


def confusion_matrices(metrics: pd.DataFrame, class_names=("MSS", "MSI"), title_suffix=""):
    """A row of confusion matrices, one per network in the metrics table."""
    import seaborn as sns

    names = list(metrics.index)
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        sns.heatmap(np.array(metrics.loc[name, "confusion"]), annot=True, fmt="d", cbar=False,
                    xticklabels=class_names, yticklabels=class_names, cmap="Blues", ax=ax)
        ax.set(title=f"{name}{title_suffix}", xlabel="predicted", ylabel="true")
    fig.tight_layout()
    return fig


def draw_detections(data, preds: dict, targets: list[dict], frames=(0, 1, 2), score_threshold=0.3,
                    task=None):
    """A grid: one row per frame, one column per network; ground truth green, predictions red
    with their score. `preds`, `targets` come from `evaluate(..., return_predictions=True)`.
    `score_threshold`: one for all, or {network: threshold} (e.g. each one's operating point)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..tasks.detection import DetectionTask

    task = task or DetectionTask()
    names = list(preds)
    thresholds = score_threshold if isinstance(score_threshold, dict) else dict.fromkeys(names, score_threshold)
    fig, axes = plt.subplots(len(frames), len(names), figsize=(2.4 * len(names), 2.4 * len(frames)),
                             squeeze=False)
    for r, i in enumerate(frames):
        image = task.collate([data[i]])["image"][0].permute(1, 2, 0).clamp(0, 1).numpy()
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                t = thresholds[name]
                shared = len({round(v, 6) for v in thresholds.values() if np.isfinite(v)}) <= 1
                ax.set_title(name if shared and np.isfinite(t) else
                             f"{name} (>= {t:.2f})" if np.isfinite(t) else f"{name} (no val detection)", fontsize=9)
            for x0, y0, x1, y1 in targets[i]["boxes"].tolist():
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
            p = preds[name][i]
            for (x0, y0, x1, y1), s in zip(p["boxes"].tolist(), p["scores"].tolist()):
                if s >= thresholds[name]:
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=1.2))
                    ax.text(x0, y0, f"{s:.2f}", color="white", fontsize=6, backgroundcolor="red")
    fig.tight_layout()
    return fig


FLOW_COLORS = {"kd": "tab:blue", "ml": "tab:orange", "label": "0.45"}


def knowledge_flows(modes=("independent", "kd", "ml", "kd_ml"), highlight=None, n_students: int = 2):
    """One small diagram per mode: who learns from whom. Grey arrows: the label's cross-entropy;
    blue: teacher -> student (KD); orange: student <-> student (ML). `offline` draws the teacher
    frozen (dashed); `highlight` (a mode) is drawn bold, the others faded."""
    from matplotlib.patches import FancyArrowPatch

    from ..core.cohort import MODES, USES_ML, USES_TEACHER

    modes = list(modes) + ([highlight] if highlight is not None and highlight not in modes else [])
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    fig, axes = plt.subplots(1, len(modes), figsize=(2.6 * len(modes), 2.6), squeeze=False)
    xs = np.linspace(0.2, 0.8, n_students) if n_students > 1 else np.array([0.5])
    for ax, mode in zip(axes[0], modes):
        alpha = 1.0 if highlight in (None, mode) else 0.3
        ax.set(xlim=(-0.05, 1), ylim=(0, 1), xticks=[], yticks=[])
        ax.set_title(mode, fontweight="bold" if mode == highlight else "normal", alpha=max(alpha, 0.6))

        def node(x, y, text, dashed=False):
            ax.text(x, y, text, ha="center", va="center", fontsize=8, alpha=alpha,
                    bbox=dict(boxstyle="round", fc="white", ec="black", ls="--" if dashed else "-"))

        def arrow(a, b, color, both=False, rad=0.0):
            ax.add_patch(FancyArrowPatch(a, b, arrowstyle="<|-|>" if both else "-|>", mutation_scale=10,
                                         color=color, lw=1.5, alpha=alpha, shrinkA=14, shrinkB=14,
                                         connectionstyle=f"arc3,rad={rad}"))

        node(0.5, 0.08, "label y")
        for i, x in enumerate(xs):
            node(x, 0.45, f"S{i + 1}")
            arrow((0.5, 0.08), (x, 0.45), FLOW_COLORS["label"])
            if mode in USES_TEACHER:
                arrow((0.5, 0.85), (x, 0.45), FLOW_COLORS["kd"])
        if mode in USES_TEACHER:
            node(0.5, 0.85, "teacher\n(frozen)" if mode == "offline" else "teacher", dashed=mode == "offline")
            if mode != "offline":
                arrow((0.4, 0.08), (0.4, 0.85), FLOW_COLORS["label"], rad=-0.9)  # the teacher learns the label
        if mode in USES_ML:
            for i in range(n_students):
                for j in range(i + 1, n_students):
                    arrow((xs[i], 0.45), (xs[j], 0.45), FLOW_COLORS["ml"], both=True, rad=-0.4)
    handles = [plt.Line2D([], [], color=c, lw=2, label=label) for c, label in
               ((FLOW_COLORS["label"], "label (cross-entropy)"), (FLOW_COLORS["kd"], "KD: teacher -> student"),
                (FLOW_COLORS["ml"], "ML: student <-> student"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
