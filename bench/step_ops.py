"""What one detection cohort step asks of a GPU, counted on any machine: the ATen operations it
dispatches (at most one kernel launch each; views, about a third of them, launch none) and the
ones that make the host wait for the device, by part of the step.

    python bench/step_ops.py --version v1 --mode kd_ml [--size 128] [--batch 8]

Counted with a `TorchDispatchMode` on the CPU, so the numbers need no GPU. Waits counted: a value
read back (`.item()`), a boolean-mask selection, and the operations whose output size depends on
the data (`nonzero`, `masked_select`, `unique`, `repeat_interleave`). What a CPU dispatches
nothing for is not seen: `.tolist()`, and a Python list or scalar copied to the device (an index
`x[..., [0, 2]]`, `torch.tensor(values, device=...)`); on a GPU,
`torch.cuda.set_sync_debug_mode("warn")` names most waits (the GPU check counts them). The synthetic frames' boxes depend on
the frame size, so the counts of code that loops over boxes do too: compare counts at one size.
Parts: the detection loss (FCOS's targets and losses), the distillation terms forward, the
optimizer step, and the rest (the networks' forwards and every backward). Writes
bench/results/step_ops_<version>_<mode>.md. On a GPU, a small network's step is bound by how
fast the host launches kernels, and each wait stops the host from running ahead of the device.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import torch  # noqa: E402
from _common import replaced, write_result  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

OTHER = "networks' forwards and every backward"
PARTS = (("tasks.detectors", "DenseFCOS", "compute_loss", "FCOS targets and losses"),
         ("tasks.detection", "DetectionTask", "distill_loss", "distillation terms (forward)"))


DATA_SIZED = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2",
              "aten.unique_dim", "aten.unique_consecutive"}


def waits(func, args, kwargs) -> bool:
    """Whether this operation makes the host wait for the device."""
    name = str(func.overloadpacket)
    if name in DATA_SIZED:
        return True
    if name == "aten.repeat_interleave":
        return kwargs.get("output_size") is None
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return name.startswith("aten.index") and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class CountOps(TorchDispatchMode):
    """ATen operations and waits, by the part of the step that dispatched them."""

    def __init__(self):
        super().__init__()
        self.part, self.ops, self.waits = [OTHER], Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.part[-1]] += 1
        self.waits[self.part[-1]] += waits(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))

    def counted(self, inner, part: str):
        """`inner` with what it dispatches counted as `part`."""
        def counted(*args, **kwargs):
            self.part.append(part)
            try:
                return inner(*args, **kwargs)
            finally:
                self.part.pop()

        return counted


def count_step(version: str, mode: str, size: int, batch_size: int, n_students: int = 2) -> tuple[Counter, Counter]:
    """({part: ATen operations}, {part: waits}) of one `cohort_step` after a first, uncounted one."""
    import importlib

    from mtml import Cohort, CohortConfig, cohort_step
    from mtml.tasks.detection import DetectionTask
    from mtml.tasks.polyp import make_synthetic_polyps

    task = DetectionTask(size=size)
    cohort = Cohort.build(CohortConfig(mode=mode, version=version, n_students=n_students, batch_size=batch_size),
                          networks=task.networks)
    frames = make_synthetic_polyps(batch_size, size=size, seed=0)
    batch = task.collate([frames[i] for i in range(batch_size)])
    cohort_step(cohort, batch, task, 0)
    counter = CountOps()
    owners = [(getattr(importlib.import_module(f"mtml.{module}"), cls), name, part) for module, cls, name, part in PARTS]
    with replaced([(owner, name, counter.counted(getattr(owner, name), part))
                   for owner, name, part in [*owners, (cohort.optimizer, "step", "optimizer step")]]), counter:
        cohort_step(cohort, batch, task, 1)
    return counter.ops, counter.waits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default="v1")
    p.add_argument("--mode", default="kd_ml")
    p.add_argument("--size", type=int, default=128, help="frame size (the synthetic boxes depend on it)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ops, waited = count_step(args.version, args.mode, args.size, args.batch)
    parts = [part for _, _, _, part in PARTS] + ["optimizer step", OTHER]
    rows = [f"| {part} | {ops[part]} | {waited[part]} |" for part in parts]
    text = "\n".join([f"# one detection cohort step: {args.version} {args.mode}, 2 students, batch {args.batch}, "
                      f"{args.size} px (bench/step_ops.py)", "", f"torch {torch.__version__}", "",
                      "| part | ATen operations | waits for the device |", "|---|---|---|", *rows,
                      f"| total | {sum(ops.values())} | {sum(waited.values())} |", ""])
    write_result(text, Path(args.out) if args.out else REPO / "bench" / "results" / f"step_ops_{args.version}_{args.mode}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
