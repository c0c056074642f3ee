"""A ready GPU check: one table of what the kit does on one GPU, in about 10-15 minutes on an H100/H200 (an estimate).

    python bench/gpu_check.py                 # or: make bench-gpu
    python bench/gpu_check.py --device cpu --small   # the same code path in seconds (CI)

Rows (each: training images/s of the whole cohort step, peak GPU memory):
  * v1 classification cohort (ResNet-50 teacher + 2 ResNet-18 students, kd_ml, 224 px, batch 64) in
    fp32, bf16 AMP, AMP + channels_last, AMP + torch.compile;
  * the v1 detection cohort (FCOS ResNet-50 -> ResNet-18, 512 px, batch 8), fp32, bf16 AMP, and fp32
    under `deterministic_cuda` (what studies use on a GPU: its cost), and how often one of its steps
    makes the host wait for the GPU (`torch.cuda.set_sync_debug_mode`);
  * seeds paired: the teacher after a few steps in kd and in kd_ml, the same network or not, with
    and without deterministic kernels;
  * one tiny study run: `studies/kvasir_tiny_cpu.yaml`, kd_ml seed 0, with its external sets
    (real Kvasir-SEG frames needed; --small: its smoke plan);
  * the cohort step against the sum of its networks trained alone (efficiency = sum / cohort);
  * DDP over the GPUs present (NCCL; one rank is a valid run), through `mtml.distributed`;
  * projections: one epoch over the real CRC_DX training tiles (93,408) at the best classification
    rate, and the full grid of docs/runs.md (3 versions x 4 modes x 3 seeds x 30 epochs, v1's rate for all).
Writes bench/results/gpu_check.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as studies start: cuBLAS reads it once, at first use
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step  # noqa: E402
from mtml.core.cohort import deterministic_cuda  # noqa: E402
from mtml.tasks.detection import DetectionTask  # noqa: E402

CRC_DX_TRAIN_TILES = 93_408
GRID_RUNS, GRID_EPOCHS = 3 * 4 * 3, 30  # the full classification grid of docs/runs.md


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(task, size, n, device):
    g = torch.Generator().manual_seed(0)
    if task.name == "classification":
        items = [{"image": torch.rand(3, size, size, generator=g), "label": int(i % 2)} for i in range(n)]
    else:
        items = [{"image": (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8),
                  "boxes": torch.tensor([[size * 0.2, size * 0.3, size * 0.6, size * 0.7]])} for _ in range(n)]
    return task.to_device(task.collate(items), device)


def rate(task, cfg, size, n, device, steps, warmup) -> tuple[float, float]:
    """(images/s of cohort_step, peak memory GiB)."""
    cohort = Cohort.build(cfg, device, task=task)
    batch = _batch(task, size, n, device)
    for _ in range(warmup):
        cohort_step(cohort, batch, task)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        cohort_step(cohort, batch, task)
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del cohort
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps * n / elapsed, peak


def host_waits(task, cfg, size, n, device) -> str:
    """How often one cohort step (after a first) makes the host wait for the GPU, as
    `torch.cuda.set_sync_debug_mode("warn")` reports it (bench/step_ops.py counts the waits a
    CPU can see: 20 for a detection kd_ml step)."""
    if device.type != "cuda":
        return "n/a on CPU (bench/step_ops.py counts what a CPU sees)"
    import warnings

    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # a row that fails (out of memory, say) says so; the rows after it still run
            cohort = Cohort.build(cfg, device, task=task)
            batch = _batch(task, size, n, device)
            cohort_step(cohort, batch, task)
            torch.cuda.synchronize(device)
            caught.clear()
            torch.cuda.set_sync_debug_mode("warn")
            cohort_step(cohort, batch, task, 1)
        except Exception as err:  # noqa: BLE001
            return f"failed ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
        finally:
            torch.cuda.set_sync_debug_mode(before)
            cohort = batch = None
            torch.cuda.empty_cache()
    return str(sum("synchroniz" in str(w.message) for w in caught))


def parts_rate(task, cfg, size, n, device, steps, warmup) -> float:
    """images/s of the cohort's networks each trained alone on the same batch, one after another."""
    cohort = Cohort.build(cfg, device, task=task)
    batch = _batch(task, size, n, device)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=cfg.lr, momentum=0.9) for k, m in cohort.networks.items()}

    def one_pass():
        for name, net in cohort.networks.items():
            optimizers[name].zero_grad(set_to_none=True)
            task.supervised_loss(task.outputs(net, batch), batch).backward()
            optimizers[name].step()

    for _ in range(warmup):
        one_pass()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_pass()
        _sync(device)
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def teachers_paired(task, version, size, n, device, steps, deterministic) -> str:
    """Whether one seed's teacher is the same network after `steps` in kd and in kd_ml (the
    teacher learns from its own loss only, so on a deterministic device it must be)."""
    weights = []
    with deterministic_cuda(deterministic):
        for mode in ("kd", "kd_ml"):
            cohort = Cohort.build(CohortConfig.for_task(task, mode=mode, version=version, seed=0), device, task=task)
            batch = _batch(task, size, n, device)
            for step in range(steps):
                cohort_step(cohort, batch, task, step)
            weights.append({k: v.detach().cpu() for k, v in cohort.teacher.state_dict().items()})
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    return "the same network" if not differ else f"differ in {len(differ)} of {len(weights[0])} tensors"


def study_run(small: bool, external: list) -> str:
    """Wall time of one tiny study run (data loaded first, as a study worker has it), tested on
    the `external` prepared folders too (the issue's H200 figure had CVC-ClinicDB's 609 frames)."""
    from dataclasses import replace

    from mtml.runs import study as study_mod
    from mtml.tasks.polyp import default_polyp_root

    if default_polyp_root()[0] is None:
        return "skipped (no Kvasir-SEG frames: python data_scripts/polyp.py kvasir)"
    study = replace(study_mod.Study.load(REPO / "studies" / "kvasir_tiny_cpu.yaml"), external=tuple(external))
    params = next(q for q in study.planned(smoke=small) if q["MODE"] == "kd_ml" and q["SEED"] == 0)
    study_mod.load_data(study, params)
    study_mod.external_sets(study, study_mod.task_from_parameters(study.task, params), params)  # loaded once, too
    start = time.perf_counter()
    row, _ = study_mod.run_one(study, params, threads=study_mod.worker_threads(1))
    sets = f"{len(external)} external set(s)" if external else "no external set"
    return f"{time.perf_counter() - start:.0f} s (ensemble map50 {row['ensemble/map50']:.3f}; {sets})"


def ddp_check(args, device, version, size, batch) -> str:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if not gpus:
        return "skipped (no GPU)"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "mtml.runs.distributed", "--version", version, "--mode", "kd_ml", "--epochs", "1",
           "--n-train", str(batch * gpus * 4), "--batch-size", str(batch * gpus), "--image-size", str(size),
           "--out", str(REPO / "runs" / "gpu_check_ddp")]
    log = Path(args.out).with_suffix(".ddp.log")
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.ddp_timeout)
    except subprocess.TimeoutExpired as err:
        log.write_text(f"{err.stdout or ''}\n{err.stderr or ''}")
        return f"TIMED OUT after {args.ddp_timeout} s (log: {log})"
    elapsed = time.perf_counter() - start
    log.write_text(run.stdout + "\n" + run.stderr)
    if run.returncode:
        return f"FAILED with exit code {run.returncode} (log: {log})"
    return f"{gpus} rank(s), NCCL: 4 steps of batch {batch * gpus} + start-up in {elapsed:.0f} s"


def _rate(images_per_s: float) -> str:
    """Three significant figures at least: a slow CPU row must not print as 0."""
    return f"{images_per_s:,.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny networks, small images, 2 steps: the code path only")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ddp-timeout", type=int, default=180)
    p.add_argument("--external", nargs="*", default=[], help="prepared folders the study run is tested on too")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.md"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    version, csize, cbatch, dsize, dbatch = ("tiny", 32, 8, 64, 2) if args.small else ("v1", 224, 64, 512, 8)
    steps, warmup = (2, 1) if args.small else (args.steps, 3)
    cls, det = ClassificationTask(2), DetectionTask(size=dsize)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    head = [f"GPU check on {name}, torch {torch.__version__} ({'small: code path only' if args.small else 'full'})",
            "", "| what | images/s (or value) | peak GiB |", "|---|---|---|"]
    rows = []

    def table() -> str:
        return "\n".join(head + [f"| {what} | {value} | {peak} |" for what, value, peak in rows]) + "\n"

    def emit(what, value, peak=""):
        """One row, printed and written at once: a check stopped by a timeout keeps what it measured."""
        rows.append((what, value, peak))
        print(f"| {what} | {value} | {peak} |", flush=True)
        Path(args.out).write_text(table())

    def add(what, task, size, n, **speed):
        channels_last = speed.pop("channels_last", False)
        task = ClassificationTask(2, channels_last=channels_last) if task.name == "classification" else task
        cfg = CohortConfig.for_task(task, mode="kd_ml", version=version, channels_last=channels_last, **speed)
        if cfg.compile and device.type != "cuda":
            emit(what, "skipped (compile is CUDA only)")
            return None
        try:
            images, peak = rate(task, cfg, size, n, device, steps, warmup)
        except torch.OutOfMemoryError:
            emit(what, "out of memory")
            return None
        emit(what, _rate(images), f"{peak:.1f}" if peak == peak else "-")
        return images

    c = f"{version} classification kd_ml, {csize} px, batch {cbatch}"
    best = [add(f"{c}, fp32", cls, csize, cbatch), add(f"{c}, bf16 AMP", cls, csize, cbatch, amp=True),
            add(f"{c}, AMP + channels_last", cls, csize, cbatch, amp=True, channels_last=True),
            add(f"{c}, AMP + compile", cls, csize, cbatch, amp=True, compile=True)]
    d = f"{version} detection kd_ml, {dsize} px, batch {dbatch}"
    det_fp32 = add(f"{d}, fp32", det, dsize, dbatch)
    det_amp = add(f"{d}, bf16 AMP", det, dsize, dbatch, amp=True)
    emit(f"{d}: host waits for the GPU in one step",
         host_waits(det, CohortConfig.for_task(det, mode="kd_ml", version=version), dsize, dbatch, device))
    if det_fp32 and det_amp:
        emit(f"{d}: bf16 AMP rate / fp32 rate (target >= 1.5)", f"{det_amp / det_fp32:.2f}")
    with deterministic_cuda(device.type == "cuda"):
        det_det = add(f"{d}, fp32, deterministic kernels (studies' default on a GPU)", det, dsize, dbatch)
    if det_fp32 and det_det:
        emit(f"{d}: deterministic rate / default rate", f"{det_det / det_fp32:.2f}")
    for deterministic in (False, True):
        emit(f"{d}: one seed's teacher after 3 steps in kd and kd_ml, {'deterministic' if deterministic else 'default'} kernels",
             teachers_paired(det, version, dsize, dbatch, device, 3, deterministic))
    cfg = CohortConfig.for_task(cls, mode="kd_ml", version=version)
    alone = parts_rate(cls, cfg, csize, cbatch, device, steps, warmup)
    emit(f"{c}: networks trained alone, one after another (fp32)", _rate(alone))
    if best[0]:
        emit("cohort step efficiency (alone time / cohort time)", f"{best[0] / alone:.2f}")
    emit("DDP over the GPUs present (mtml.distributed)", ddp_check(args, device, version, csize, cbatch))
    top = max((b for b in best if b), default=None)
    if top and not args.small:
        epoch_min = CRC_DX_TRAIN_TILES / top / 60
        emit(f"projected: one epoch over the {CRC_DX_TRAIN_TILES:,} CRC_DX training tiles (best rate)", f"{epoch_min:.1f} min")
        emit(f"projected: the docs/runs.md grid ({GRID_RUNS} runs x {GRID_EPOCHS} epochs, v1's rate for all)",
             f"{GRID_RUNS * GRID_EPOCHS * epoch_min / 60:.0f} GPU-hours")
    what = "one tiny study run (studies/kvasir_tiny_cpu.yaml, kd_ml seed 0" + (
        ", smoke plan)" if args.small else "; target on one GPU: at most 60 s)")
    emit(what, study_run(args.small, args.external))  # last: the longest and least known
    text = table()
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
