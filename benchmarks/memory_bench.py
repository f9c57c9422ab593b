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
weights (4 bytes x parameters) and with a rank's share of it. Each cell also shows what `cotmi plan`
predicts for its training peak (model/memory.py at the cell's shapes, ranks, option and
checkpointing) and how far that is from the measured peak.

The default student has t5-v1_1-base's shapes (random weights; ``--model_config`` takes a config JSON
or a size `cotmi plan` knows); ``--pretrained`` loads a saved one instead, as `cotmi train --model
FOLDER` does (at ZeRO-3 each rank reading its partitions' slices of the safetensors files): a saved
folder, or ``random``, random weights with their own LM head saved first.
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


OFFLOADS = {"none": (False, False), "optimizer": (True, False), "params": (True, True)}


def parse_options(flags: dict):
    from benchmarks.options import MemoryOptions
    from cotmi_ds.errors import UsageError
    from cotmi_ds.flags import parse_flags

    opts = parse_flags(MemoryOptions, flags, "cotmi bench memory")
    _student(opts.model_config)  # a file or a known name, else one line naming the flag
    if opts.pretrained not in ("", "random") and not (Path(opts.pretrained) / "config.json").is_file():
        raise UsageError(f"--pretrained {opts.pretrained}: not a saved model folder (no config.json); "
                         "give one, or 'random'")
    for name, lowest, highest in (("stages", 0, 3), ("ranks", 1, 64)):
        items = [i.strip() for i in getattr(opts, name).split(",")]
        if not all(i.isdigit() and lowest <= int(i) <= highest for i in items):
            raise UsageError(f"--{name} {getattr(opts, name)!r}: expected a comma-separated list of whole "
                             f"numbers from {lowest} to {highest}")
    for name, choices in (("offload", tuple(OFFLOADS)), ("checkpointing", ("false", "true"))):
        items = [i.strip().lower() for i in getattr(opts, name).split(",")]
        if not all(i in choices for i in items):
            raise UsageError(f"--{name} {getattr(opts, name)!r}: expected a comma-separated list of "
                             f"{', '.join(choices)}")
    return opts


def _student(spec: str):
    """The T5Config of --model_config: a T5 config JSON, or a name `cotmi plan` knows without the hub
    (t5-v1_1-small, google/flan-t5-base, ...)."""
    from transformers import T5Config

    from cotmi_ds.cluster.plan import KNOWN_NAMES, student_config
    from cotmi_ds.errors import UsageError

    if Path(spec).is_file():
        from benchmarks.step_bench import _t5_config

        return T5Config(**_t5_config(SimpleNamespace(model_config=spec)))
    if spec.lower() not in KNOWN_NAMES:
        raise UsageError(f"--model_config {spec}: no such file, and not a T5 size `cotmi plan` knows "
                         f"(e.g. google/t5-v1_1-small)")
    return student_config(spec)[0]


def cells(opts) -> list[dict]:
    """Every (stage, offload, checkpointing, world size) asked for that the plan has a row for; the
    ZeRO-3 build without zero.Init once, at the largest world size."""
    from cotmi_ds.model.memory import ZERO_OPTIONS, ZeroOption

    worlds = [int(w) for w in opts.ranks.split(",")]
    out = []
    for stage in (int(s) for s in opts.stages.split(",")):
        for offload in (o.strip().lower() for o in opts.offload.split(",")):
            if ZeroOption(stage, *OFFLOADS[offload]) not in ZERO_OPTIONS:
                continue  # offloading only from ZeRO-2 (optimizer) and ZeRO-3 (weights too)
            for checkpointing in (c.strip().lower() == "true" for c in opts.checkpointing.split(",")):
                for world in worlds:
                    out.append(dict(stage=stage, offload=offload, checkpointing=checkpointing, world=world,
                                    plain=False))
                    if stage == 3 and offload == "none" and opts.plain_zero3 and world == max(worlds):
                        out.append({**out[-1], "plain": True})  # the old way, where partitioning saves most
    return out


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
        config = Path(tmp) / "student.json"
        _student(opts.model_config).to_json_file(config)
        if opts.pretrained == "random":
            opts.pretrained = _save_random(config, opts.seed, Path(tmp) / "pretrained")
        for i, cell in enumerate(cells(opts)):
            world = cell["world"]
            out = Path(tmp) / f"cell{i}"
            out.mkdir()
            spec = out / "spec.json"
            spec.write_text(json.dumps({**asdict(opts), **cell, "model_config": str(config)}))
            cmd = [str(torchrun), "--nproc_per_node", str(world), "--master_port", str(free_port()),
                   __file__, "worker", str(spec), str(out)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{_build_name(cell)} on {world} rank(s) failed:\n{proc.stderr[-4000:]}")
            cell_rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
            predicted = None if opts.build_only else _predicted(opts, config, cell)
            for row in cell_rows:
                row["plan_train"] = predicted
            rows += cell_rows
            print(_row_line(cell_rows), flush=True)
            if opts.json_out:  # after every cell: a long run that is stopped keeps what it measured
                Path(opts.json_out).write_text(json.dumps(rows, indent=1))
    print(table(rows), flush=True)
    return rows


def _predicted(opts, config: Path, cell: dict) -> int:
    """`cotmi plan`'s training peak per rank for this cell: its shapes, ranks, option, checkpointing,
    on CPUs in fp32 (the plan's --device cpu --precision fp32)."""
    from transformers import T5Config

    from cotmi_ds.cluster.plan import PlanInputs, estimate
    from cotmi_ds.model import memory

    plan = PlanInputs(model=str(config), gpus_per_node=cell["world"], batch_size=opts.batch_size,
                      input_len=opts.input_len, label_len=opts.label_len, rationale_len=opts.rationale_len,
                      precision="fp32", device="cpu")
    shapes = memory.shapes_of(T5Config.from_json_file(config), own_head=bool(opts.pretrained))
    option = memory.ZeroOption(cell["stage"], *OFFLOADS[cell["offload"]])
    return next(r.train_peak for r in estimate(plan, shapes)
                if r.option == option and r.checkpointing == cell["checkpointing"])


def _save_random(config: Path, seed: int, folder: Path) -> str:
    """A T5 of these shapes with random weights, saved as a T5 v1.1 checkpoint on the hub is: its LM
    head a weight of its own."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    t5 = T5ForConditionalGeneration(T5Config.from_json_file(config))
    t5.lm_head.weight = torch.nn.Parameter(torch.randn_like(t5.shared.weight) * t5.config.d_model ** -0.5)
    t5.save_pretrained(folder)
    return str(folder)


def _row_line(rows: list[dict]) -> str:
    r = rows[0]
    share = 4 * r["parameters"] / r["world_size"] / GIB
    line = (f"{_build_name(r)} x {r['world_size']}: build / set-up / training peak above base "
            + ", ".join(f"{_above(x, 'build')} / {_above(x, 'setup')} / {_above(x, 'train')}" for x in rows)
            + f" GiB (a rank's share of one fp32 copy: {share:.2f} GiB)")
    error = _error(rows)
    return line + ("" if error is None else f"; plan {r['plan_train'] / GIB:.2f} ({error:+.0%})")


def _above(row: dict, key: str) -> str:
    return "-" if row[key] is None else f"{(row[key] - row['base']) / GIB:.2f}"


def _error(rows: list[dict]) -> float | None:
    """The plan's training peak against the cell's largest measured one (above base)."""
    if rows[0].get("plan_train") is None or rows[0]["train"] is None:
        return None
    measured = max(r["train"] - r["base"] for r in rows)
    return rows[0]["plan_train"] / measured - 1


def _build_name(row: dict) -> str:
    how = " (built whole)" if row["plain"] else " (zero.Init)" if row["stage"] == 3 else ""
    offload = {"none": "", "optimizer": " + offload optimizer", "params": " + offload optimizer+params"}
    return (f"ZeRO-{row['stage']}{offload[row.get('offload', 'none')]}{how}"
            + (", checkpointing" if row.get("checkpointing") else "")
            + (", from_pretrained" if row.get("pretrained") else ""))


def table(rows: list[dict]) -> str:
    p = rows[0]["parameters"]
    lines = [f"student: {p:,} parameters (one fp32 copy: {4 * p / GIB:.2f} GiB); batch {rows[0]['batch_size']}, "
             f"inputs {rows[0]['input_len']}, rationales {rows[0]['rationale_len']}, labels {rows[0]['label_len']}, "
             "fp32, fused loss, mode mi",
             "",
             "| ZeRO | ranks | rank | base | build - base | set-up - base | training - base | plan | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = r["rank"] == 0
        error = _error([x for x in rows if x["cell"] == r["cell"]]) if first else None
        plan = f"{r['plan_train'] / GIB:.2f}" if first and r.get("plan_train") is not None else ""
        lines.append(f"| {_build_name(r)} | {r['world_size']} | {r['rank']} | {r['base'] / GIB:.2f} | "
                     f"{_above(r, 'build')} | {_above(r, 'setup')} | {_above(r, 'train')} | {plan} | "
                     f"{'' if error is None else f'{error:+.0%}'} |")
    lines.append("\nGiB of resident memory (VmHWM) per rank. base: after imports and the process group; "
                 "build: peak until the student exists; set-up: peak until the engine exists (model "
                 "states included); training: peak over the steps. plan: `cotmi plan`'s training peak per "
                 "rank for the cell; error: against the cell's largest training - base.")
    return "\n".join(lines)


# --- the worker: one rank ---------------------------------------------------------------------

def worker(spec_path: str, out_dir: str) -> None:
    import dataclasses

    import torch

    from benchmarks.loss_bench import _status_kib
    from cotmi_ds.config import load_config
    from cotmi_ds.distributed import init_distributed, shutdown
    from cotmi_ds.ds_configs import choose_ds_config
    from cotmi_ds.model.student import DistillModel, construct, load_pretrained, zero3_construction
    from cotmi_ds.training.engine import create_engine
    from transformers import AutoConfig, T5Config

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    env = init_distributed(1800)
    base = _status_kib("VmHWM") * 1024
    config = (AutoConfig.from_pretrained(spec["pretrained"]) if spec["pretrained"] else
              T5Config.from_json_file(spec["model_config"]))
    cfg = load_config(ds_config=f"zero{spec['stage']}", batch_size=spec["batch_size"], precision="fp32",
                      mode="mi", loss="fused", max_steps=spec["steps"] + 1, seed=spec["seed"],
                      gradient_checkpointing=spec["checkpointing"])
    chosen = choose_ds_config(cfg.ds_config, env.world_size)
    optimizer, params = OFFLOADS[spec["offload"]]
    raw = json.loads(json.dumps(chosen.raw))
    zero = raw["zero_optimization"]
    zero.pop("offload_optimizer", None), zero.pop("offload_param", None)
    if optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if params:
        zero["offload_param"] = {"device": "cpu"}
    ds_config = dataclasses.replace(chosen, raw=raw).fill(cfg, env, "fp32", config.d_model)
    torch.manual_seed(cfg.seed)
    with zero3_construction(None if spec["plain"] else ds_config):  # as build_student builds one
        if spec["pretrained"]:  # at ZeRO-3 each rank reads its partitions' slices (model/weights.py)
            t5 = load_pretrained(spec["pretrained"], config)
        else:
            t5 = construct(config)
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in t5.parameters())
    build = _status_kib("VmHWM") * 1024
    row = {**{k: spec[k] for k in ("stage", "offload", "checkpointing", "plain", "pretrained", "batch_size",
                                   "input_len", "rationale_len", "label_len")},
           "cell": Path(out_dir).name, "world_size": env.world_size, "rank": env.rank, "parameters": parameters,
           "base": base, "build": build, "setup": None, "train": None}
    if spec["build_only"]:
        Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(row))
        shutdown()
        return
    engine = create_engine(DistillModel(t5, cfg), ds_config, cfg, env.world_size)
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
        engine.ds.train()
        parts = engine.ds(batch)
        engine.backward(parts["total"])  # the trainer's backward (on CPUs with checkpointing: BackwardMmap)
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
