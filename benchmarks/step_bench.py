"""`cotmi bench step`: the project's training step against the released one, in one run.

Two sides train the same T5 (same config and random initial weights, real 32,128-token T5
vocabulary, no hub) on the same batches at the same precision:
- project:  the trainer's own step: DistillModel (mode and ``--loss`` as `cotmi train` would pick
            them, so a new default loss is benchmarked automatically) inside the DeepSpeed engine
            built from the trainer's DeepSpeed config: ``engine(batch)``, ``engine.backward``,
            ``engine.step``;
- released: benchmarks/released_step.py (HF ``labels=`` forward once per task, full logits, MI from
            the full softmax, torch AdamW).
Each side lives in its own worker process, so its memory figures are its own: on CPUs the
kernel's high-water mark of the process's resident memory (VmHWM), reset to the current RSS when
set-up ends (``/proc/self/clear_refs``), so the peak covers the measured steps with everything
resident (imports, weights, optimizer state), and set-up's transients do not count; on GPUs
``max_memory_allocated`` after ``reset_peak_memory_stats`` at the same point. "above set-up" is
that peak minus the memory held when set-up ended: what the steps themselves add. The parent builds the batches once,
then has the workers take turns — A B A B, one round of ``--steps`` steps each — after a warm-up
round that is not measured; the idle worker waits on a pipe and uses no CPU.

Default (CPU): the synthetic dataset through the project's own data pipeline, batch 32 (the
trainer's default), the scratch T5 shapes with the real vocabulary, fp32.
``--base``: ``t5-v1_1-base`` shapes from benchmarks/t5-v1_1-base.json on CPU, fp32, B = 8, inputs of
128 tokens for both tasks, rationales of 128, labels of 8 (fixed-length random tokens): the
paper's smallest student, at a batch that fits a small machine.
``--gpu``: the same shapes in bf16, B = 64, inputs of 512 tokens for both tasks, rationales of 256,
labels of 16; the explicit flags below override any preset.
``--profile N``: after the measured rounds (and after the peak memory was read), N more steps of
each side under torch.profiler; prints each side's top operators by self time.

``--lengths cqa|svamp|anli1|esnli``: batches as long as the benchmark's rows (cotmi_ds/data/lengths.py:
from the data with ``--tokenizer``, else the shipped histograms), and the project side once per lever
setting (``--levers``, default all of them): none (eager attention, rows in random order: the kernels
the release had), group (``--group_by_length``), sdpa (``--attention sdpa``), compile (``--compile``),
kernels (sdpa + compile) and all. The released side pads each batch to its longest row with rows in
random order (DSS's collator and sampler) and runs transformers' eager attention (the release's
transformers 4.24 had no other for T5). Batches: the rows of one epoch are cut into batches as the
trainer's sampler cuts them (grouped or not); ``--steps`` of them are taken at evenly spaced ranks of
their padded size, so that the few measured batches cost what an epoch's batches cost on average. One
released worker runs throughout; each lever setting gets its own worker (its memory is its own),
alternating with the released one round by round, and its ratios are to the released rounds it
alternated with.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.options import BASE_CONFIG, REPO, StepOptions

SIDES = ("project", "released")
# Project-side settings: the trainer's flags each one sets over the release's kernels and numerics ("none").
RELEASE_FLAGS = {"attention": "eager", "compile": False, "flush_subnormals": False, "group_by_length": False}
LEVERS = {"none": {}, "group": {"group_by_length": True}, "sdpa": {"attention": "sdpa"}, "compile": {"compile": True},
          "flush": {"flush_subnormals": True},
          "kernels": {"attention": "sdpa", "compile": True, "flush_subnormals": True},
          "all": {"attention": "sdpa", "compile": True, "flush_subnormals": True, "group_by_length": True}}


def lever_flags(name: str) -> dict:
    return {**RELEASE_FLAGS, **LEVERS[name]}


def parse_options(flags: dict) -> StepOptions:
    from cotmi_ds.errors import UsageError
    from cotmi_ds.flags import parse_flags

    opts = parse_flags(StepOptions, flags, "cotmi bench step")
    import torch

    if opts.gpu and not torch.cuda.is_available():
        raise UsageError("--gpu: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "run without --gpu for the CPU comparison")
    if opts.gpu and opts.base:
        raise UsageError("--gpu and --base are two presets; give one")
    if opts.gpu:
        preset = dict(model_config=str(BASE_CONFIG), batch_size=64, input_len=512, rationale_len=256,
                      label_len=16, precision="bf16", steps=10)
    elif opts.base:  # the paper's smallest student at a batch that fits a small CPU machine
        preset = dict(model_config=str(BASE_CONFIG), batch_size=8, input_len=128, rationale_len=128,
                      label_len=8, precision="fp32", steps=2)
    else:
        preset = dict(batch_size=32, precision="fp32", steps=4)
    for key, value in preset.items():
        if opts.lengths and key in ("input_len", "rationale_len", "label_len"):
            continue  # the benchmark's lengths instead
        if not getattr(opts, key):
            setattr(opts, key, value)
    fixed = (opts.input_len, opts.rationale_len, opts.label_len)
    if any(fixed) and not all(fixed):
        raise UsageError("--input_len, --rationale_len and --label_len go together (fixed-length batches)")
    if opts.model_config and not Path(opts.model_config).is_file():
        raise UsageError(f"--model_config {opts.model_config}: no such file")
    if opts.lengths:
        from cotmi_ds.data.datasets import DSS_DATASETS

        if opts.lengths not in DSS_DATASETS:
            raise UsageError(f"--lengths {opts.lengths!r} is not one of: {', '.join(DSS_DATASETS)}")
        if any(fixed):
            raise UsageError("--lengths draws the benchmark's lengths: drop --input_len, --rationale_len, --label_len")
        # GPUs compute subnormals at full speed: the flush lever alone changes nothing there
        opts.levers = opts.levers or ",".join(name for name in LEVERS if not (opts.gpu and name == "flush"))
    elif opts.levers or opts.tokenizer or opts.data_root:
        raise UsageError("--levers, --tokenizer and --data_root go with --lengths")
    unknown = [lever for lever in opts.levers.split(",") if opts.levers and lever not in LEVERS]
    if unknown:
        raise UsageError(f"--levers: {unknown[0]!r} is not one of: {', '.join(LEVERS)}")
    if any(lever_flags(lever)["compile"] for lever in opts.levers.split(",") if opts.levers):
        from cotmi_ds.model.compiled import compile_refusal

        stage = 3 if "zero3" in opts.ds_config else 0
        refusal = compile_refusal("cuda" if opts.gpu else "cpu", stage)
        if refusal:
            raise UsageError(f"--levers with compile: {refusal}")
    if opts.ds_config:
        from cotmi_ds.ds_configs import choose_ds_config

        choose_ds_config(opts.ds_config, world_size=1)  # a shipped name, a file or auto; else one line naming both
    return opts


# --- the parent: data, workers, alternation, report -----------------------------------------

def _t5_config(opts: StepOptions) -> dict:
    from cotmi_ds.config import TrainConfig

    if opts.model_config:
        try:
            cfg = json.loads(Path(opts.model_config).read_text())
        except json.JSONDecodeError as e:
            from cotmi_ds.errors import UsageError
            raise UsageError(f"{opts.model_config}:{e.lineno}: not valid JSON: {e.msg}") from None
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        for key, value in (("pad_token_id", 0), ("eos_token_id", 1), ("decoder_start_token_id", 0)):
            cfg.setdefault(key, value)  # T5's own ids; the batches need a pad id to shift labels
        return cfg
    d = TrainConfig()  # the trainer's scratch shapes, with T5's real vocabulary
    return dict(d_model=d.scratch_d_model, d_ff=d.scratch_d_ff, d_kv=d.scratch_d_kv,
                num_layers=d.scratch_num_layers, num_decoder_layers=d.scratch_num_layers,
                num_heads=d.scratch_num_heads, vocab_size=32128, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def _batches(opts: StepOptions, vocab_size: int) -> list[dict]:
    """``opts.steps`` two-task batches (collate's keys), the same for both sides and every round."""
    import torch

    from cotmi_ds.data.collate import collate

    with_rationale = True  # both modes the bench knows run the rationale pass
    if opts.input_len:
        g = torch.Generator().manual_seed(opts.seed)
        B = opts.batch_size

        def ids(length):
            return torch.randint(2, vocab_size, (B, length), generator=g)
        out = []
        for _ in range(opts.steps):
            out.append({"pred_input_ids": ids(opts.input_len),
                        "pred_attention_mask": torch.ones(B, opts.input_len, dtype=torch.long),
                        "labels": ids(opts.label_len),
                        "expl_input_ids": ids(opts.input_len),
                        "expl_attention_mask": torch.ones(B, opts.input_len, dtype=torch.long),
                        "rationale_labels": ids(opts.rationale_len)})
        return out
    from cotmi_ds.config import load_config
    from cotmi_ds.data.pipeline import prepare_data
    from cotmi_ds.distributed import DistEnv

    import datasets

    datasets.disable_progress_bars()
    n = opts.batch_size * opts.steps
    cfg = load_config(None, synthetic_train_size=max(n, 64), synthetic_eval_size=1, seed=opts.seed)
    data = prepare_data(cfg, DistEnv(0, 0, 1, 1, torch.device("cpu")))
    train = data.splits["train"]
    return [collate(train[list(range(i * opts.batch_size, (i + 1) * opts.batch_size))],
                    data.tokenizer.pad_token_id, with_rationale) for i in range(opts.steps)]


def _length_batches(opts: StepOptions, vocab_size: int) -> tuple[dict[str, list[dict]], list[str]]:
    """Batches with the benchmark's real lengths: "random" (rows in random order, as the release and
    the trainer without grouping draw them) and "grouped" (--group_by_length), ``opts.steps`` each,
    and lines describing them."""
    import random

    from cotmi_ds.data.collate import collate
    from cotmi_ds.data.lengths import benchmark_lengths
    from cotmi_ds.data.sampler import BatchOrder

    rows, source = benchmark_lengths(opts.lengths, opts.data_root or None, opts.tokenizer or None, opts.seed)
    rng = random.Random(opts.seed)

    def ids(n):  # random tokens ending in eos, as a tokenized row does
        return [rng.randrange(2, vocab_size) for _ in range(n - 1)] + [1]

    columns = ("pred_input_ids", "label_ids", "expl_input_ids", "rationale_ids")

    def padded(batch):  # tokens after padding each column to its longest row
        return sum(max(rows[i][c] for i in batch) * len(batch) for c in range(4))

    sets, lines = {}, [f"lengths: {source}"]
    for name, grouped in (("random", False), ("grouped", True)):
        order = BatchOrder(len(rows), opts.batch_size, 0, 1, opts.seed, lengths=[sum(r) for r in rows],
                           group_by_length=grouped)
        epoch = [order.next_indices() for _ in range(order.batches_per_epoch)]
        full = sorted((b for b in epoch if len(b) == opts.batch_size), key=padded)
        if len(full) < opts.steps:
            from cotmi_ds.errors import UsageError
            raise UsageError(f"--lengths {opts.lengths}: {len(full)} full batches of {opts.batch_size} in an epoch, "
                             f"fewer than --steps {opts.steps}")
        chosen = [full[int((k + 0.5) * len(full) / opts.steps)] for k in range(opts.steps)]
        real = sum(sum(r) for r in rows)
        pad = sum(padded(b) for b in epoch)
        lines.append(f"  {name}: padding {1 - real / pad:.1%} of the epoch's batch tokens; measured batches: "
                     f"{opts.steps} of {len(full)} (evenly spaced by padded size), padding "
                     f"{1 - sum(sum(rows[i]) for b in chosen for i in b) / sum(map(padded, chosen)):.1%}")
        sets[name] = [collate({c: [ids(rows[i][k]) for i in b] for k, c in enumerate(columns)}, 0, True)
                      for b in chosen]
    return sets, lines


class Worker:
    """One side in its own process; JSON lines over a private pipe (library chatter goes to a log)."""

    def __init__(self, side: str, spec: Path, log: Path, name: str | None = None):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # each worker is a world of one
        self.side, self.log = name or side, log
        self.proc = subprocess.Popen([sys.executable, __file__, "worker", side, str(spec)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True, bufsize=1)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"the {self.side} worker died; its output ends with:\n{tail}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.ask({"cmd": "quit"})
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run(**flags) -> dict:
    import torch

    from cotmi_ds.config import load_config
    from cotmi_ds.model.flops import peak_flops_per_s

    opts = parse_options(flags)
    trainer_cfg = load_config(None, mode=opts.mode, **{k: getattr(opts, k) for k in ("loss", "ds_config")
                                                        if getattr(opts, k)})
    from cotmi_ds.ds_configs import choose_ds_config

    # What `cotmi train` runs as one process (the bench's project side is a world of one).
    opts.loss, opts.ds_config = trainer_cfg.loss, choose_ds_config(trainer_cfg.ds_config, world_size=1).name
    t5_kwargs = _t5_config(opts)
    from transformers import T5Config

    t5_config = T5Config(**t5_kwargs)
    if opts.lengths:
        return _run_levers(opts, t5_kwargs, t5_config)
    batches = _batches(opts, t5_config.vocab_size)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peak, peak_note = peak_flops_per_s(device, opts.precision)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    shapes = {k: tuple(batches[0][k].shape) for k in ("pred_input_ids", "labels", "expl_input_ids",
                                                       "rationale_labels")}

    checkpointing = (", --gradient_checkpointing" if opts.gradient_checkpointing else "") + \
        ("" if opts.lean_layers else ", --lean_layers false")
    print(f"cotmi bench step: project (DistillModel, --loss {opts.loss}, --mode {opts.mode}{checkpointing}, "
          f"DeepSpeed {opts.ds_config}) vs released (HF labels= per task, full logits, MI from the full "
          f"softmax, torch AdamW)", flush=True)
    print(f"model: T5 d_model {t5_config.d_model}, d_ff {t5_config.d_ff}, {t5_config.num_layers}+"
          f"{t5_config.num_decoder_layers} layers, vocab {t5_config.vocab_size}, random weights; "
          f"precision {opts.precision}; device {device_name}", flush=True)
    print(f"data: {'fixed-length random tokens' if opts.input_len else 'synthetic dataset'}, batch "
          f"{opts.batch_size}, {len(batches)} batches (first: {shapes}); {opts.warmup_steps} warm-up "
          f"steps per side, then {opts.rounds} rounds x {opts.steps} steps per side, alternating "
          f"project, released", flush=True)

    results = {side: {"step_s": []} for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="cotmi-bench-") as tmp:
        tmp = Path(tmp)
        torch.save(batches, tmp / "batches.pt")
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"options": asdict(opts), "t5": t5_kwargs,
                                    "max_steps": opts.warmup_steps + opts.rounds * opts.steps + 1,
                                    "batches": str(tmp / "batches.pt")}))
        workers = {side: Worker(side, spec, tmp / f"{side}.log") for side in SIDES}
        try:
            for side in SIDES:
                results[side].update(workers[side].ask({"cmd": "setup"}))
            if opts.warmup_steps:
                for side in SIDES:
                    workers[side].ask({"cmd": "run", "steps": opts.warmup_steps})
            split = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)
            for r in range(opts.rounds):
                for side in SIDES:
                    reply = workers[side].ask({"cmd": "run", "steps": opts.steps})
                    results[side]["step_s"] += reply["step_s"]
                    results[side]["last_loss"] = reply["loss"]
                    for phase in split if reply["split_s"] else ():
                        split[phase] += reply["split_s"][phase]
            for side in SIDES:
                results[side].update(workers[side].ask({"cmd": "memory"}))
            syncs = workers["project"].ask({"cmd": "syncs", "steps": opts.steps})["per_step"]
            profiles = {side: workers[side].ask({"cmd": "profile", "steps": opts.profile})["table"]
                        for side in SIDES} if opts.profile else {}
        finally:
            for w in workers.values():
                w.close()

    rows = {}
    for side in SIDES:
        rows[side] = {
            **_rates(results[side]["step_s"], batches, opts.rounds, t5_config, peak),
            "peak_gib": results[side]["peak_gib"],
            "setup_gib": results[side]["setup_gib"],
            "above_setup_gib": results[side]["peak_gib"] - results[side]["setup_gib"],
            "last_loss": results[side]["last_loss"],
        }
    _print_report(rows, device.type, peak_note if peak is None else None, opts)
    per_step_ms = {phase: 1000 * seconds / (opts.rounds * opts.steps) for phase, seconds in split.items()}
    _print_split(per_step_ms, syncs, device.type)
    for side, table in profiles.items():
        print(f"\n{side}: torch.profiler over {opts.profile} step(s) after the rounds, top operators by "
              f"self time\n{table}")
    return {"options": asdict(opts), "device": device_name, "rows": rows, "profiles": profiles,
            "project_split_ms": per_step_ms, "project_host_waits": syncs}


def _rates(step_s: list[float], batches: list[dict], rounds: int, t5_config, peak) -> dict:
    from cotmi_ds.data.collate import count_tokens
    from cotmi_ds.model.flops import train_step_flops

    total = sum(step_s)
    flops = sum(train_step_flops(t5_config, b) for b in batches) * rounds
    return {"samples_per_s": sum(b["labels"].shape[0] for b in batches) * rounds / total,
            "tokens_per_s": sum(count_tokens(b) for b in batches) * rounds / total,
            "step_ms_median": 1000 * statistics.median(step_s), "tflops": flops / total / 1e12,
            "mfu_pct": None if peak is None else 100 * flops / total / peak}


def _best_of_rounds(step_s: list[float], steps: int) -> float:
    """Seconds of one pass over the batches, each batch at its fastest round: what a shared machine's
    interruptions add to a step shows in the totals, not here."""
    rounds = [step_s[i:i + steps] for i in range(0, len(step_s), steps)]
    return sum(min(times) for times in zip(*rounds))


def _run_levers(opts: StepOptions, t5_kwargs: dict, t5_config) -> dict:
    """--lengths: the released step against the project with each lever setting (module docstring)."""
    import torch

    from cotmi_ds.model.flops import peak_flops_per_s

    sets, lines = _length_batches(opts, t5_config.vocab_size)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peak, peak_note = peak_flops_per_s(device, opts.precision)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    levers = opts.levers.split(",")
    print(f"cotmi bench step --lengths {opts.lengths}: released (HF labels= per task, full logits, MI from the "
          f"full softmax, torch AdamW, eager attention, rows in random order) vs the project (DistillModel, "
          f"--loss {opts.loss}, --mode {opts.mode}, DeepSpeed {opts.ds_config}) with each lever setting: "
          + ", ".join(f"{name} ({' '.join(f'--{k} {str(v).lower()}' for k, v in lever_flags(name).items())})"
                      for name in LEVERS if name in levers), flush=True)
    print(f"model: T5 d_model {t5_config.d_model}, d_ff {t5_config.d_ff}, {t5_config.num_layers}+"
          f"{t5_config.num_decoder_layers} layers, vocab {t5_config.vocab_size}, random weights; precision "
          f"{opts.precision}; device {device_name}; batch {opts.batch_size}; {opts.warmup_steps} warm-up steps "
          f"per worker and at least one pass over its measured batches (every shape compiled), then {opts.rounds} "
          f"rounds x {opts.steps} steps per side, alternating", flush=True)
    print("\n".join(lines), flush=True)
    results = {"released": {"step_s": []}}
    with tempfile.TemporaryDirectory(prefix="cotmi-bench-") as tmp:
        tmp = Path(tmp)
        torch.save(sets, tmp / "batches.pt")
        max_steps = opts.warmup_steps + opts.rounds * opts.steps * (len(levers) + 1) + 1

        def spec(name, lever):
            path = tmp / f"{name}.json"
            path.write_text(json.dumps({"options": asdict(opts), "t5": t5_kwargs, "max_steps": max_steps,
                                        "batches": str(tmp / "batches.pt"), "lever": lever}))
            return path

        released = Worker("released", spec("released", None), tmp / "released.log")
        try:
            results["released"].update(released.ask({"cmd": "setup"}))
            warmup = max(opts.warmup_steps, opts.steps)  # compiled code for every measured shape
            released.ask({"cmd": "run", "steps": warmup, "set": "random"})
            for name in levers:
                flags = lever_flags(name)
                batch_set = "grouped" if flags.pop("group_by_length") else "random"
                worker = Worker("project", spec(name, flags), tmp / f"{name}.log", name=name)
                try:
                    row = results[name] = {"step_s": [], "released_step_s": [], "set": batch_set,
                                           "measured_compile_s": 0.0}
                    row.update(worker.ask({"cmd": "setup"}))
                    worker.ask({"cmd": "run", "steps": warmup, "set": batch_set})
                    for _ in range(opts.rounds):
                        reply = worker.ask({"cmd": "run", "steps": opts.steps, "set": batch_set})
                        row["step_s"] += reply["step_s"]
                        row["last_loss"] = reply["loss"]
                        row["measured_compile_s"] += reply["compile_s"]
                        reply = released.ask({"cmd": "run", "steps": opts.steps, "set": "random"})
                        row["released_step_s"] += reply["step_s"]
                        results["released"]["step_s"] += reply["step_s"]
                        results["released"]["last_loss"] = reply["loss"]
                    row.update(worker.ask({"cmd": "memory"}))
                finally:
                    worker.close()
            results["released"].update(released.ask({"cmd": "memory"}))
        finally:
            released.close()

    rows = {}
    released_rounds = len(results["released"]["step_s"]) // opts.steps
    rows["released"] = {**_rates(results["released"]["step_s"], sets["random"], released_rounds, t5_config, peak),
                        **{k: results["released"][k] for k in ("peak_gib", "setup_gib", "last_loss")},
                        "compile_s": 0.0}
    for name in levers:
        r = results[name]
        own = _rates(r["step_s"], sets[r["set"]], opts.rounds, t5_config, peak)
        paired = _rates(r["released_step_s"], sets["random"], opts.rounds, t5_config, peak)
        rows[name] = {**own, **{k: r[k] for k in ("peak_gib", "setup_gib", "last_loss", "compile_s",
                                                  "measured_compile_s", "subnormals_flushed")},
                      "speed_x": own["samples_per_s"] / paired["samples_per_s"],
                      "best_speed_x": (_best_of_rounds(r["released_step_s"], opts.steps)
                                       / _best_of_rounds(r["step_s"], opts.steps)),
                      "memory_x": r["peak_gib"] / results["released"]["peak_gib"]}
    _print_lever_report(rows, device.type, peak_note if peak is None else None, opts)
    return {"options": asdict(opts), "device": device_name, "lengths": lines, "rows": rows}


def _print_lever_report(rows: dict, device_type: str, no_mfu: str | None, opts: StepOptions) -> None:
    mem = "GPU mem" if device_type == "cuda" else "RSS"
    print(f"{'side':<9} {'samples/s':>10} {'real tok/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'MFU %':>6} "
          f"{'peak ' + mem + ' GiB':>16} {'compile s':>9} {'loss':>8}  vs released (same rounds)")
    for side, r in rows.items():
        mfu = "n/a" if r["mfu_pct"] is None else f"{r['mfu_pct']:.1f}"
        ratio = "" if side == "released" else (f"{r['speed_x']:.2f}x samples/s ({r['best_speed_x']:.2f}x best of "
                                               f"rounds), {r['memory_x']:.2f}x peak")
        print(f"{side:<9} {r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} {r['step_ms_median']:>9.0f} "
              f"{r['tflops']:>8.3g} {mfu:>6} {r['peak_gib']:>16.3f} {r['compile_s']:>9.1f} {r['last_loss']:>8.4f}  "
              f"{ratio}")
    print("samples/s and real (non-pad) tokens/s are totals over the measured rounds; step ms the median; "
          "compile s: torch.compile's time in the worker (in its warm-up); loss: the last step's, equal to "
          "rounding for lever settings that trained on the same batches (the released worker trains throughout); "
          "best of rounds: each batch's fastest round on both sides, summed (robust to a busy machine)")
    for side, r in rows.items():
        if r.get("measured_compile_s"):  # a shape the warm-up did not see: its compile is in the totals
            print(f"note: {side} compiled for {r['measured_compile_s']:.1f} s during the measured rounds")
        if side != "released" and lever_flags(side)["flush_subnormals"] != r["subnormals_flushed"]:
            print(f"note: {side}'s worker could not set the subnormal mode on all its threads")
    if device_type != "cuda" and opts.lengths == "cqa" and opts.base:
        for name, goal, what in (("all", 1.5, "all levers"), ("kernels", 1.15, "grouping off (the kernels alone)")):
            if name in rows:
                r = rows[name]
                print(f"target on CPU, {what}: >= {goal}x the released step's samples/s "
                      f"({'met' if r['speed_x'] >= goal else 'not met'}: {r['speed_x']:.2f}x; best of rounds "
                      f"{r['best_speed_x']:.2f}x), <= 0.9x its peak memory "
                      f"({'met' if r['memory_x'] <= 0.9 else 'not met'}: {r['memory_x']:.2f}x)")
    if no_mfu:
        print(f"MFU: n/a, {no_mfu}")


def _print_report(rows: dict, device_type: str, no_mfu: str | None, opts: StepOptions) -> None:
    mem = "GPU mem" if device_type == "cuda" else "RSS"
    print(f"{'side':<9} {'samples/s':>10} {'tokens/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'MFU %':>6} "
          f"{'peak ' + mem + ' GiB':>16} {'above set-up':>13} {'loss':>8}")
    for side, r in rows.items():
        mfu = "n/a" if r["mfu_pct"] is None else f"{r['mfu_pct']:.1f}"
        print(f"{side:<9} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} {r['step_ms_median']:>9.1f} "
              f"{r['tflops']:>8.3g} {mfu:>6} {r['peak_gib']:>16.3f} {r['above_setup_gib']:>13.3f} "
              f"{r['last_loss']:>8.4f}")
    p, b = rows["project"], rows["released"]
    speed, memory = p["samples_per_s"] / b["samples_per_s"], p["peak_gib"] / b["peak_gib"]
    above = p["above_setup_gib"] / b["above_setup_gib"] if b["above_setup_gib"] > 0 else float("nan")
    print(f"project / released: {speed:.2f}x samples/s, {memory:.2f}x peak {mem} ({above:.2f}x above "
          f"set-up); step ms is the median, rates are totals over the measured rounds")
    if device_type != "cuda":
        # At the tiny shapes the 32k-vocabulary loss is most of the work; at t5-base shapes the layers are.
        goal = 0.9 if opts.base and not opts.gradient_checkpointing else 0.5
        memory_met = "met" if memory <= goal else "not met"
        if opts.base and opts.gradient_checkpointing:  # memory bought with recomputation: its price is reported
            print(f"target on CPU with checkpointing: <= {goal}x peak memory ({memory_met}), at {speed:.2f}x "
                  f"the released step's samples/s")
        else:
            speed_goal = 1.0 if opts.base else 1.3
            print(f"targets on CPU: >= {speed_goal}x samples/s ({'met' if speed >= speed_goal else 'not met'}), "
                  f"<= {goal}x peak memory ({memory_met})")
    if no_mfu:
        print(f"MFU: n/a, {no_mfu}")


def _print_split(per_step_ms: dict[str, float], syncs: list[dict[str, int]], device_type: str) -> None:
    """The project step's phases (the trainer's timers: device time on GPUs) and its host waits."""
    kind = "device" if device_type == "cuda" else "wall"
    print(f"project step, {kind} time per step: " + ", ".join(f"{p} {ms:.1f} ms" for p, ms in per_step_ms.items()))
    total = collections.Counter()
    for counts in syncs:
        total.update(counts)
    waits = sum(total.values()) / max(1, len(syncs))
    mine = sum(n for where, n in total.items() if where.startswith(("cotmi_ds/", "benchmarks/")))
    where = "; ".join(f"{w} x{n / len(syncs):g}" for w, n in total.most_common()) if total else "none"
    print(f"host waits per project step: {waits:g} ({len(syncs)} steps counted), {mine / max(1, len(syncs)):g} "
          f"of them the trainer's; by origin: {where}")


# --- a worker: one side ----------------------------------------------------------------------

def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _start_peak(device) -> float:
    """Reset the peak to what is held now and return that (GiB)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**30
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass  # then the peak is the process's lifetime peak, set-up included
    return _status_gib("VmRSS")


def _peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _status_gib("VmHWM")


def _project_step(spec: dict, t5, batches: list):
    from cotmi_ds.config import load_config
    from cotmi_ds.distributed import init_distributed
    from cotmi_ds.ds_configs import choose_ds_config
    from cotmi_ds.ds_configs.precision import resolve_precision
    from cotmi_ds.model.student import DistillModel
    from cotmi_ds.training.engine import create_engine
    from cotmi_ds.training.loop import micro_step
    from cotmi_ds.training.stopping import NonFiniteGuard
    from cotmi_ds.training.telemetry import PhaseTimers

    opts = spec["options"]
    lever = spec.get("lever") or {}
    cfg = load_config(None, mode=opts["mode"], loss=opts["loss"], ds_config=opts["ds_config"],
                      batch_size=opts["batch_size"], precision=opts["precision"], max_steps=spec["max_steps"],
                      seed=opts["seed"], gradient_checkpointing=opts["gradient_checkpointing"],
                      lean_layers=opts["lean_layers"], **lever)
    env = init_distributed(cfg.dist_timeout_s, cfg.flush_subnormals)
    precision = resolve_precision(cfg, env.device)
    ds_config = choose_ds_config(cfg.ds_config, env.world_size).fill(cfg, env, precision, t5.config.d_model)
    engine = create_engine(DistillModel(t5, cfg), ds_config, cfg, env.world_size)
    guard, timers = NonFiniteGuard(cfg.max_bad_steps, env), PhaseTimers(env.device)
    count = itertools.count(1)

    def step(batch):  # the trainer's micro-step: its NaN/inf screen, backward, DeepSpeed's step, its timers
        n = next(count)
        parts, _, skipped = micro_step(engine, guard, timers.timed, batch, step=n, position=n)
        guard.update_done(n, skipped)
        return parts

    step.timers, step.guard = timers, guard
    return env.device, step


def _released_step(spec: dict, t5, batches: list):
    import torch

    from benchmarks.released_step import ReleasedStep
    from cotmi_ds.config import TrainConfig

    opts, d = spec["options"], TrainConfig()  # the trainer's optimiser defaults, for a like-for-like step
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    t5.set_attn_implementation("eager")  # the release's transformers (4.24) had only this for T5
    runner = ReleasedStep(t5.to(device), mi=opts["mode"] == "mi", alpha=d.alpha, beta=d.beta, lr=d.lr,
                          betas=(d.adam_beta1, d.adam_beta2), eps=d.adam_eps, grad_clip=d.grad_clip,
                          max_steps=spec["max_steps"], bf16=opts["precision"] == "bf16")
    return device, runner.step


def _profile(step, batches: list, steps: int, device, rows: int = 15) -> str:
    """The steps' top operators by self time (after the peak was read: profiling holds memory)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


def _count_syncs(step, batches: list, steps: int, device) -> list[dict[str, int]]:
    """The host waits inside each of ``steps`` steps, by origin (benchmarks/host_syncs.py). The bench's
    own synchronisation between steps is outside them."""
    from benchmarks.host_syncs import HostSyncs

    with HostSyncs(device) as syncs:
        for i in range(steps):
            syncs.at(i)
            step(batches[i % len(batches)])
        syncs.at(None)
    step.guard.settle()  # what a log step reads, outside the counted steps
    return [dict(syncs.counts[i]) for i in range(steps)]


def worker_main(side: str, spec_path: str) -> None:
    # The protocol keeps the real stdout; everything else printed goes to stderr (the log file).
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from cotmi_ds.config import TrainConfig
    from cotmi_ds.distributed import flush_subnormals

    spec = json.loads(Path(spec_path).read_text())
    opts = spec["options"]
    # Before any thread exists (the mode is per thread): the project side as the trainer sets it,
    # the released side as the release ran (IEEE subnormals).
    flushed = flush_subnormals(side == "project" and (spec.get("lever") or {}).get("flush_subnormals",
                                                                         TrainConfig().flush_subnormals))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)  # what init_distributed gives a lone rank
    batches = torch.load(spec["batches"], weights_only=True)
    sets = batches if isinstance(batches, dict) else {"random": batches}  # --lengths: random and grouped
    clock = None
    if (spec.get("lever") or {}).get("compile"):
        from cotmi_ds.model.compiled import CompileClock

        clock = CompileClock()
    torch.manual_seed(opts["seed"])
    t5 = T5ForConditionalGeneration(T5Config(**spec["t5"]))  # identical weights on both sides
    device = step = None
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "setup":
            device, step = (_project_step if side == "project" else _released_step)(spec, t5, sets["random"])
            sets = {name: [{k: v.to(device) for k, v in b.items()} for b in bs] for name, bs in sets.items()}
            batches = sets["random"]
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            reply = {"setup_gib": _start_peak(device), "subnormals_flushed": flushed}
        elif req["cmd"] == "run":
            times, loss, run_batches = [], None, sets[req.get("set", "random")]
            timers = getattr(step, "timers", None)
            if timers is not None:
                timers.reset()
            for i in range(req["steps"]):
                sync()
                t = time.perf_counter()
                parts = step(run_batches[i % len(run_batches)])
                sync()
                times.append(time.perf_counter() - t)
                loss = float(parts["total"])
            if device.type == "cuda":  # hand cached blocks back while the other side runs on the GPU
                torch.cuda.empty_cache()
            reply = {"step_s": times, "loss": loss, "compile_s": clock.since_report() if clock else 0.0,
                     "split_s": None if timers is None else timers.seconds()}
        elif req["cmd"] == "syncs":  # after the measured rounds: counting slows the steps down
            reply = {"per_step": _count_syncs(step, batches, req["steps"], device)}
        elif req["cmd"] == "memory":
            reply = {"peak_gib": _peak(device), "compile_s": clock.seconds if clock else 0.0}
        elif req["cmd"] == "profile":
            reply = {"table": _profile(step, batches, req["steps"], device)}
        else:  # quit
            proto.write("{}\n")
            break
        proto.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: cotmi bench step [flags]  (this file is the benchmark's worker)")
