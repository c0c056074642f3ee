"""The fit loop's checkpoints: every global RNG as plain data, the weights checked finite before
a save, and a stored checkpoint checked against the run it is meant to resume."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..core.step import NonFiniteLossError
from .spec import RunSpec, differences


def rng_state() -> dict:
    """Every global RNG (torch CPU and CUDA, numpy, python), as plain data for weights_only loads."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(), "python": list(py_state[1]), "python_gauss": py_state[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "numpy_gauss": (int(np_state[3]), float(np_state[4])),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"],
                         *s["numpy_gauss"]))
    if s["cuda"] and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def check_finite_weights(cohort, step: int) -> None:
    """Called before each checkpoint, so that a checkpoint never holds NaN or infinite weights."""
    modules = {**cohort.networks, **{f"{name}/adapters": m for name, m in cohort.adapters.items()}}
    for name, m in modules.items():
        for value in m.state_dict().values():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteLossError(name, "weights", step, float(value[~torch.isfinite(value)][0]))


def check_checkpoint(state, spec: RunSpec, path: Path) -> None:
    """ValueError unless `state` is a checkpoint of this format for the run `spec` identifies."""
    hint = "use another checkpoint_dir or resume=False"
    if not isinstance(state, dict) or not {"spec", "spec_hash", "cohort", "rng", "epoch"} <= set(state):
        raise ValueError(f"{path} is not an mtml fit checkpoint of this format (no spec, cohort, rng, "
                         f"epoch); {hint}")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state.get('format')}, this mtml reads format "
                         f"{CHECKPOINT_FORMAT}; {hint}")
    if state["spec_hash"] != spec.hash:
        diff = differences(state["spec"], spec.as_dict())
        raise ValueError(f"{path} belongs to another run (spec {state['spec_hash']}, this run {spec.hash}; "
                         f"differences checkpoint vs now: {diff}); resuming would mix two runs; {hint}")


CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # bump when the checkpoint layout changes
