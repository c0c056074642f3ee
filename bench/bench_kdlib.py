"""Our `ml` mode against a peer: KD-Lib's Deep Mutual Learning (DML, KD-Lib 0.0.32).

Same two ResNet-18 students (same builder, same seed), same synthetic data, batch, image size,
number of steps, SGD settings and validation set; images/s of whole one-epoch training runs of
each (interleaved repeats, medians), and the ratio. KD-Lib is installed without its dependencies
into its own venv (bench/.venv-kdlib, created when missing), so it cannot change our torch; only
DML's own file is loaded from there (the KD_Lib package imports transformers at top level).
Forward calls per step (with gradients on) are counted with hooks on both sides.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import statistics
import subprocess
import sys
import types
import venv
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, save, setup, timed2  # noqa: E402

from mtml import ClassificationTask, Cohort, CohortConfig, fit  # noqa: E402
from mtml.tasks.data import make_separable  # noqa: E402
from mtml.tasks.models import build_network  # noqa: E402

HERE = Path(__file__).resolve().parent
KDLIB_VENV = HERE / ".venv-kdlib"
KDLIB = "KD-Lib==0.0.32"
DML_FILE = "KD_Lib/KD/vision/DML/dml.py"


def kdlib_dml_file() -> Path:
    """DML's source file in the KD-Lib venv, creating the venv when missing. RuntimeError names
    the step that failed."""
    found = sorted(KDLIB_VENV.glob(f"lib/python*/site-packages/{DML_FILE}"))
    if found:
        return found[0]
    print(f"creating {KDLIB_VENV} and installing {KDLIB} there (no dependencies) ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(KDLIB_VENV)
    install = subprocess.run([str(KDLIB_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--no-deps", KDLIB], capture_output=True, text=True)
    found = sorted(KDLIB_VENV.glob(f"lib/python*/site-packages/{DML_FILE}"))
    if install.returncode != 0 or not found:
        raise RuntimeError(f"pip install --no-deps {KDLIB} into {KDLIB_VENV} failed (the package "
                           f"registry must be reachable): {install.stderr.strip()[-1500:]}")
    return found[0]


def load_dml(path: Path):
    """KD-Lib's DML class, loaded from its file. Its module imports torch.utils.tensorboard, used
    only when log=True; without tensorboard installed, a stand-in that refuses to run is used."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        def no_writer(*args, **kw):
            raise RuntimeError("KD-Lib's log=True needs the tensorboard package")
        sys.modules["torch.utils.tensorboard"] = types.SimpleNamespace(SummaryWriter=no_writer)
    spec = importlib.util.spec_from_file_location("kdlib_dml", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DML


def count_forwards(models) -> list[int]:
    calls = [0]
    for m in models:
        m.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + torch.is_grad_enabled()))
    return calls


def forward_backward_seconds(cfg, repeats: int = 5) -> tuple[float, float]:
    """Median CPU seconds of one ResNet-18 training-mode forward and of its backward."""
    torch.manual_seed(0)
    net, x = build_network("resnet18", 2), torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"])
    fwd, bwd = [], []
    for _ in range(repeats + 1):
        out = []
        fwd.append(timed2(lambda: out.append(net(x)))[1])
        bwd.append(timed2(lambda: out[0].sum().backward())[1])
    return statistics.median(fwd[1:]), statistics.median(bwd[1:])


def run_ours(train, val, cfg, steps) -> tuple[float, float]:
    cohort = Cohort.build(CohortConfig(mode="ml", version="v1", n_students=2, epochs=1,
                                       batch_size=cfg["batch"], lr=cfg["lr"]), task=ClassificationTask())
    calls = count_forwards(cohort.students)
    wall, cpu = timed2(lambda: fit(cohort, ClassificationTask(2), Subset(train, range(steps * cfg["batch"])),
                                   val, progress=False))
    return wall, cpu, calls[0] / steps


def run_kdlib(DML, train, val, cfg, steps) -> tuple[float, float]:
    torch.manual_seed(0)
    students = [build_network("resnet18", 2) for _ in range(2)]
    opts = [torch.optim.SGD(s.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=5e-4,
                            nesterov=True, foreach=True) for s in students]
    n = steps * cfg["batch"]
    loader = DataLoader(TensorDataset(train.images[:n], train.labels[:n]), batch_size=cfg["batch"],
                        shuffle=True, drop_last=True)
    val_loader = DataLoader(TensorDataset(val.images, val.labels), batch_size=cfg["batch"])
    dml = DML(students, loader, val_loader, opts, device="cpu")  # its default loss: MSE of logits
    calls = count_forwards(students)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        wall, cpu = timed2(lambda: dml.train_students(epochs=1, plot_losses=False, save_model=False))
    return wall, cpu, calls[0] / steps


def main(argv=None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    env = setup(args)
    cfg = dict(steps=3 if args.quick else args.steps, batch=args.batch, size=args.size,
               val=args.batch, lr=0.01, repeats=1 if args.quick else 3)
    title = "b. Mutual learning against KD-Lib's DML (2 ResNet-18 students)"
    try:
        DML = load_dml(kdlib_dml_file())
    except RuntimeError as err:
        print(f"KD-Lib comparison NOT RUN: {err}", file=sys.stderr)
        return save("kdlib", title, f"NOT RUN: {str(err).splitlines()[0]}", [])
    train = make_separable(cfg["steps"] * cfg["batch"], cfg["size"], seed=0)
    val = make_separable(cfg["val"], cfg["size"], seed=0, split=1)
    runs = {"mtml ml": lambda steps: run_ours(train, val, cfg, steps),
            KDLIB: lambda steps: run_kdlib(DML, train, val, cfg, steps)}
    for run in runs.values():
        run(1)  # warm-up
    times = {name: [] for name in runs}
    for _ in range(cfg["repeats"]):  # interleaved, so that load changes hit both alike
        for name, run in runs.items():
            times[name].append(run(cfg["steps"]))
    images = cfg["steps"] * cfg["batch"]
    rows = [dict(implementation=name, steps=cfg["steps"], batch=cfg["batch"], image_px=cfg["size"],
                 forwards_per_step=t[0][2], seconds=statistics.median(r[0] for r in t),
                 images_per_s=images / statistics.median(r[0] for r in t),
                 images_per_cpu_s=images / statistics.median(r[1] for r in t))
            for name, t in times.items()]
    ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    cpu_ratio = rows[0]["images_per_cpu_s"] / rows[1]["images_per_cpu_s"]
    f, b = forward_backward_seconds(cfg)
    bound = (rows[1]["forwards_per_step"] * f + 6 * b) / (rows[0]["forwards_per_step"] * f + 2 * b)
    notes = (f"{env}. One training epoch of {cfg['steps']} steps each (plus both sides' validation "
             f"on {cfg['val']} images); median of {cfg['repeats']} interleaved runs after a 1-step "
             f"warm-up. **mtml / KD-Lib images/s: {ratio:.2f}x** (per CPU second of this process, "
             f"insensitive to other processes: {cpu_ratio:.2f}x; goal >= 3x). KD-Lib's DML runs each student's forward again for the "
             "cross-entropy and for every peer term (the peer's output is not detached, so the "
             "backward also runs through the peer), and once more for its training accuracy: 8 forwards "
             "and 6 backward passes per step against our 2 and 2. With a ResNet-18 forward of "
             f"{f * 1e3:.0f} ms and backward of {b * 1e3:.0f} ms (CPU time, measured here), that is "
             f"{bound:.2f}x our work per step: the ratio cannot exceed that by much (ours adds "
             "nothing; the optimizer and validation are the same for both). Its default "
             "distillation loss (MSE of logits) is kept.")
    return save("kdlib", title, notes, rows)


if __name__ == "__main__":
    main()
