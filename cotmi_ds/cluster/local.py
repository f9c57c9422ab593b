"""`cotmi sweep --local`: the cells of a grid on this machine, without Slurm. The same sweep directory
as a Slurm sweep (cells/, runs/<cell>/, logs/); cells run through torchrun, N GPUs each (the GPUs
are handed out with CUDA_VISIBLE_DEVICES, so cells never share one) or N CPU ranks each, as many at
once as there are free GPU groups (CPU: --max_parallel, default 1). Finished cells are skipped and
an interrupted one continues from its checkpoint (`--resume auto`), so the same command resumes the
sweep. Ctrl-C or SIGTERM asks the running cells to checkpoint and stop. When every cell has finished,
the results table is written (report.md, report.csv in the sweep directory).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cotmi_ds.cluster.sweep import finished, plan_sweep
from cotmi_ds.errors import UsageError


@dataclass
class Running:
    index: int
    devices: list[str]
    proc: subprocess.Popen


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def slots(gpus: list[str], gpus_per_cell: int, max_parallel: int) -> list[list[str]]:
    """Disjoint GPU groups (one per cell running at once); on CPUs, max_parallel empty groups."""
    if gpus_per_cell == 0:
        return [[] for _ in range(max(max_parallel, 1))]
    if gpus_per_cell > len(gpus):
        raise UsageError(f"--gpus_per_cell {gpus_per_cell}: this machine has {len(gpus)} GPU(s)"
                         + (" (CUDA_VISIBLE_DEVICES=" + os.environ["CUDA_VISIBLE_DEVICES"] + ")"
                            if "CUDA_VISIBLE_DEVICES" in os.environ else ""))
    groups = [gpus[i:i + gpus_per_cell] for i in range(0, len(gpus) - gpus_per_cell + 1, gpus_per_cell)]
    return groups[:max_parallel] if max_parallel else groups


def cell_command(root: Path, index: int, ranks: int) -> list[str]:
    args = (root / "cells" / f"{index}.args").read_text().splitlines()
    run_dir = (root / "cells" / f"{index}.rundir").read_text().strip()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "-m", os.environ.get("COTMI_MODULE", "cotmi_ds"), "train", "--output_dir", run_dir,
            "--resume", "auto", *args]


def run_local(grid: str, out: str, gpus_per_cell: int | None, procs_per_cell: int, max_parallel: int) -> int:
    """Run the pending cells; return how many failed."""
    if procs_per_cell < 1 or max_parallel < 0 or (gpus_per_cell is not None and gpus_per_cell < 0):
        raise UsageError("--procs_per_cell must be >= 1, --gpus_per_cell and --max_parallel >= 0")
    gpus = visible_gpus()
    per_cell = (1 if gpus else 0) if gpus_per_cell is None else gpus_per_cell
    groups = slots(gpus, per_cell, max_parallel)
    root, pending, total = plan_sweep(grid, out)
    ranks = per_cell or procs_per_cell
    where = f"{per_cell} GPU(s)" if per_cell else f"{ranks} CPU rank(s)"
    print(f"{total} cells, {total - len(pending)} finished, {len(pending)} to run on this machine: "
          f"{where} each, {len(groups)} at once; logs in {root / 'logs'}", flush=True)

    queue, running, failed, stopping = list(pending), [], [], False

    def run_dir(index: int) -> Path:
        return Path((root / "cells" / f"{index}.rundir").read_text().strip())

    def cell(index: int) -> str:  # its number and its name (the run directory's), e.g. 3 (mode-mi_seed-1)
        return f"{index} ({run_dir(index).name})"

    def stop(signum, frame):  # the ranks save a checkpoint and exit; a rerun continues them
        nonlocal stopping
        stopping = True
        for r in running:
            try:
                os.killpg(r.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            while queue and groups and not stopping:
                index, devices = queue.pop(0), groups.pop(0)
                env = dict(os.environ)
                if per_cell:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
                log = open(root / "logs" / f"local-{index}.log", "a")
                proc = subprocess.Popen(cell_command(root, index, ranks), env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                log.close()
                running.append(Running(index, devices, proc))
                print(f"cell {cell(index)} started on {'GPUs ' + ','.join(devices) if devices else 'CPU'}", flush=True)
            time.sleep(0.5)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                groups.append(r.devices)
                ok = finished(run_dir(r.index))
                if not ok and not stopping:
                    failed.append(cell(r.index))
                print(f"cell {cell(r.index)} {'finished' if ok else 'stopped' if stopping else 'FAILED'} "
                      f"(exit code {r.proc.returncode}; log {root / 'logs' / f'local-{r.index}.log'})", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:
        print("stopped; the same command continues the sweep from the cells' checkpoints", flush=True)
        return len(failed) or 1
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}; see their logs; the same command "
              "reruns them", flush=True)
        return len(failed)
    from cotmi_ds.evaluation.report import write_report

    runs = sorted(str(p) for p in (root / "runs").iterdir() if finished(p))
    markdown, md_path, csv_path = write_report(runs, "best_valid", str(root))
    print(markdown)
    print(f"all {total} cells finished; wrote {md_path} and {csv_path}", flush=True)
    return 0
