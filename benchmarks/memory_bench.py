"""`cotmi bench memory`: each rank's peak host memory while the student is set up and while it
trains, at several ZeRO stages and world sizes (CPU ranks under torchrun).

Every cell launches ``torchrun --nproc_per_node W`` of this file's worker, which does what
`cotmi train` does, in its order: the DeepSpeed config filled first, the student built
(``build_student``'s construction: under ``zero.Init`` at ZeRO-3, so each weight is partitioned as it
is created), then the engine; then ``--steps`` training steps of the fused MI loss on fixed-length
random batches. Memory is the kernel's high-water mark of the rank's resident memory (VmHWM):
- ``base``: after imports and the process group (nothing of the model yet);
- ``set-up``: the peak from the start to the end of set-up (build + deepspeed.initialize);
- ``training``: the peak over the steps, VmHWM being reset to the resident size when set-up ends
  (``/proc/self/clear_refs``), so it counts everything resident (weights, optimizer state) plus what
  the steps add.
``set-up - base`` is what building the model cost a rank, to compare with one full fp32 copy of the
weights (4 bytes x parameters). The default student has t5-v1_1-base's shapes (random weights);
``--pretrained`` loads it with ``from_pretrained`` instead (a saved folder, or ``random``: random
weights saved first), the path of a user's pretrained student.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def parse_options(flags: dict):
    from benchmarks.options import MemoryOptions
    from cotmi_ds.errors import UsageError
    from cotmi_ds.flags import parse_flags

    opts = parse_flags(MemoryOptions, flags, "cotmi bench memory")
    if not Path(opts.model_config).is_file():
        raise UsageError(f"--model_config {opts.model_config}: no such file")
    if opts.pretrained not in ("", "random") and not (Path(opts.pretrained) / "config.json").is_file():
        raise UsageError(f"--pretrained {opts.pretrained}: not a saved model folder (no config.json); "
                         "give one, or 'random'")
    for name, lowest, highest in (("stages", 0, 3), ("ranks", 1, 64)):
        items = [i.strip() for i in getattr(opts, name).split(",")]
        if not all(i.isdigit() and lowest <= int(i) <= highest for i in items):
            raise UsageError(f"--{name} {getattr(opts, name)!r}: expected a comma-separated list of whole "
                             f"numbers from {lowest} to {highest}")
    return opts


def run(**flags) -> list[dict]:
    opts = parse_options(flags)
    from cotmi_ds.distributed import free_port

    rows = []
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="cotmi-memory-bench-") as tmp:
        if opts.pretrained == "random":
            opts.pretrained = _save_random(opts, Path(tmp) / "pretrained")
        worlds = [int(w) for w in opts.ranks.split(",")]
        cells = []
        for stage in (int(s) for s in opts.stages.split(",")):
            for world in worlds:
                cells.append((stage, False, world))
                if stage == 3 and opts.plain_zero3 and world == max(worlds):
                    cells.append((3, True, world))  # the old way, where partitioning saves most
        for stage, plain, world in cells:
            out = Path(tmp) / f"z{stage}-w{world}{'-plain' if plain else ''}"
            out.mkdir()
            spec = out / "spec.json"
            spec.write_text(json.dumps({**asdict(opts), "stage": stage, "plain": plain}))
            cmd = [str(torchrun), "--nproc_per_node", str(world), "--master_port", str(free_port()),
                   __file__, "worker", str(spec), str(out)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"ZeRO-{stage} on {world} rank(s) failed:\n{proc.stderr[-4000:]}")
            for r in range(world):
                rows.append(json.loads((out / f"rank{r}.json").read_text()))
            print(_row_line(rows[-world:]), flush=True)
            if opts.json_out:  # after every cell: a long run that is stopped keeps what it measured
                Path(opts.json_out).write_text(json.dumps(rows, indent=1))
    print(table(rows), flush=True)
    return rows


def _save_random(opts: MemoryOptions, folder: Path) -> str:
    """A T5 of --model_config's shapes with random weights, saved as a hub model is."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from benchmarks.step_bench import _t5_config

    torch.manual_seed(opts.seed)
    T5ForConditionalGeneration(T5Config(**_t5_config(opts))).save_pretrained(folder)
    return str(folder)


def _row_line(rows: list[dict]) -> str:
    r = rows[0]
    return (f"{_build_name(r)} x {r['world_size']}: build / set-up peak above base "
            + ", ".join(f"{_above(x, 'build')} / {_above(x, 'setup')}" for x in rows) + " GiB")


def _above(row: dict, key: str) -> str:
    return "-" if row[key] is None else f"{(row[key] - row['base']) / GIB:.2f}"


def _build_name(row: dict) -> str:
    how = " (built whole)" if row["plain"] else " (zero.Init)" if row["stage"] == 3 else ""
    return f"ZeRO-{row['stage']}{how}" + (", from_pretrained" if row.get("pretrained") else "")


def table(rows: list[dict]) -> str:
    p = rows[0]["parameters"]
    lines = [f"student: {p:,} parameters (one fp32 copy: {4 * p / GIB:.2f} GiB); batch {rows[0]['batch_size']}, "
             f"inputs {rows[0]['input_len']}, rationales {rows[0]['rationale_len']}, labels {rows[0]['label_len']}, "
             "fp32, fused loss, mode mi",
             "",
             "| ZeRO | ranks | rank | base | build - base | set-up - base | training - base |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_build_name(r)} | {r['world_size']} | {r['rank']} | {r['base'] / GIB:.2f} | "
                     f"{_above(r, 'build')} | {_above(r, 'setup')} | {_above(r, 'train')} |")
    lines.append("\nGiB of resident memory (VmHWM) per rank. base: after imports and the process group; "
                 "build: peak until the student exists; set-up: peak until the engine exists (model "
                 "states included); training: peak over the steps.")
    return "\n".join(lines)


# --- the worker: one rank ---------------------------------------------------------------------

def worker(spec_path: str, out_dir: str) -> None:
    import torch

    from benchmarks.loss_bench import _status_kib
    from benchmarks.step_bench import _t5_config
    from cotmi_ds.config import load_config
    from cotmi_ds.distributed import init_distributed, shutdown
    from cotmi_ds.model.student import DistillModel, construct, zero3_construction
    from cotmi_ds.ds_configs import choose_ds_config
    from cotmi_ds.training.engine import create_engine
    from transformers import AutoConfig, T5Config, T5ForConditionalGeneration

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    env = init_distributed(1800)
    base = _status_kib("VmHWM") * 1024
    config = (AutoConfig.from_pretrained(spec["pretrained"]) if spec["pretrained"] else
              T5Config(**_t5_config(SimpleNamespace(model_config=spec["model_config"]))))
    cfg = load_config(ds_config=f"zero{spec['stage']}", batch_size=spec["batch_size"], precision="fp32",
                      mode="mi", loss="fused", max_steps=spec["steps"] + 1, seed=spec["seed"])
    ds_config = choose_ds_config(cfg.ds_config, env.world_size).fill(cfg, env, "fp32", config.d_model)
    torch.manual_seed(cfg.seed)
    with zero3_construction(None if spec["plain"] else ds_config):  # as build_student builds one
        if spec["pretrained"]:
            t5 = T5ForConditionalGeneration.from_pretrained(spec["pretrained"])
        else:
            t5 = construct(config)
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in t5.parameters())
    build = _status_kib("VmHWM") * 1024
    row = {**{k: spec[k] for k in ("stage", "plain", "pretrained", "batch_size", "input_len", "rationale_len",
                                   "label_len")},
           "world_size": env.world_size, "rank": env.rank, "parameters": parameters,
           "base": base, "build": build, "setup": None, "train": None}
    if spec["build_only"]:
        Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(row))
        shutdown()
        return
    engine = create_engine(DistillModel(t5, cfg), ds_config, cfg, env.world_size).ds
    setup = _status_kib("VmHWM") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    g = torch.Generator().manual_seed(spec["seed"] + env.rank)
    B, V = spec["batch_size"], config.vocab_size

    def ids(length):
        return torch.randint(2, V, (B, length), generator=g)

    for _ in range(spec["steps"]):
        batch = {"pred_input_ids": ids(spec["input_len"]),
                 "pred_attention_mask": torch.ones(B, spec["input_len"], dtype=torch.long),
                 "labels": ids(spec["label_len"]), "expl_input_ids": ids(spec["input_len"]),
                 "expl_attention_mask": torch.ones(B, spec["input_len"], dtype=torch.long),
                 "rationale_labels": ids(spec["rationale_len"])}
        parts = engine(batch)
        engine.backward(parts["total"])
        engine.step()
    row.update(setup=setup, train=_status_kib("VmHWM") * 1024)
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(row))
    shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.path.insert(0, str(REPO))
        worker(sys.argv[2], sys.argv[3])
    else:
        run()
