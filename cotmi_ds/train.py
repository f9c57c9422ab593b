"""The training loop: set up (or resume) -> for each step: batch, forward/backward/step, maybe log,
evaluate, save -> final evaluation, results, export. Read it top to bottom."""
from __future__ import annotations

import time

import torch

from . import checkpoint, testhooks
from .checkpoint import Checkpointer, export_hf_model
from .checkpoint_layout import model_identity
from .config import TrainConfig, UsageError
from .data.collate import collate, count_tokens
from .data.pipeline import prepare_data
from .data.sampler import BatchOrder
from .distributed import barrier, init_distributed, shutdown
from .engine import build_ds_config, create_engine, read_ds_config, resolve_precision, zero_stage
from .evaluate import evaluate_split, evaluation_settings, majority_baseline
from .flops import train_step_flops
from .model import DistillModel, build_student
from .modes import MODES
from .results import run_metadata, select_accuracies
from .run_dir import choose_run_dir, create_run_dir, write_json, write_jsonl
from .stopping import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteGuard, RunStopped, StopRequest
from .telemetry import Telemetry, quiet_libraries


def run_training(cfg: TrainConfig) -> dict:
    # What can be checked without start-up cost fails first.
    raw_ds, _ = read_ds_config(cfg.ds_config)
    precision = resolve_precision(cfg)
    stop_request = StopRequest()  # from here on SIGTERM/SIGUSR1 end the run cleanly
    env = init_distributed(cfg.dist_timeout_s)
    quiet_libraries(env)
    run_dir, resume_from = choose_run_dir(cfg, env)
    torch.manual_seed(cfg.seed)

    data = prepare_data(cfg, env)
    t5 = build_student(cfg, data.tokenizer)
    identity = model_identity(t5, data.tokenizer)
    stage = zero_stage(raw_ds)
    resumed, universal = None, False
    if resume_from is not None:  # checked against this run before anything is written
        resumed, universal = checkpoint.open_for_resume(resume_from, identity, cfg.max_steps,
                                                        env.world_size, stage)
    ds_config = build_ds_config(cfg, env, precision, t5.config.d_model, load_universal=universal)
    try:
        order = BatchOrder(len(data.splits["train"]), cfg.batch_size, env.rank, env.world_size, cfg.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    mode = MODES[cfg.mode]
    zero3 = stage == 3

    config_yaml = cfg.to_yaml()
    create_run_dir(run_dir, env, config_yaml, ds_config)
    if env.is_main:
        print(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{config_yaml}", flush=True)
        print(f"student: {cfg.model} ({identity['parameters']:,} parameters), {precision}, "
              f"ZeRO-{stage}, {env.world_size} rank(s) on {env.device.type}; "
              f"train/valid/test = {', '.join(str(len(s)) for s in data.splits.values())} examples",
              flush=True)
        print(f"{data.summary.describe()}\n  prepared in {data.seconds:.1f} s (tokenized-data cache: "
              f"{data.cache_status})", flush=True)
        data.tokenizer.save_pretrained(run_dir / "tokenizer")

    engine = create_engine(DistillModel(t5, cfg), ds_config, cfg)
    checkpointer = Checkpointer(run_dir, env, cfg.keep_last, {
        "world_size": env.world_size, "zero_stage": stage, "precision": precision,
        "model": {"name": cfg.model, **identity}, "config": cfg.to_dict()})
    guard = NonFiniteGuard(cfg.max_bad_steps, env)
    history: list[dict] = []
    start_step, seconds_before = 0, 0.0
    if resumed is not None:
        state = checkpoint.load(engine, resumed, env, universal, cfg.seed)
        start_step, history = resumed.step, state["evaluations"]
        seconds_before, guard.total = state["train_seconds"], state["skipped_micro_batches"]
        order.load_state_dict(state["order"])
        if env.is_main:
            via = " (through a universal checkpoint: the world size changed)" if universal else ""
            print(f"resumed from {resumed.path} at step {start_step}{via}", flush=True)
    telemetry = Telemetry(run_dir, env, start_step=start_step, max_steps=cfg.max_steps,
                          log_every=cfg.log_every, config_yaml=config_yaml, hparams=cfg.to_dict(),
                          precision=precision, sync_timers=cfg.sync_timers)
    train_split = data.splits["train"]
    eval_settings = evaluation_settings(cfg)
    t_start = time.perf_counter()

    def trainer_state() -> dict:
        return {"order": order.state_dict(), "evaluations": history, "skipped_micro_batches": guard.total,
                "train_seconds": seconds_before + time.perf_counter() - t_start}

    def save(step: int):
        with telemetry.paused():
            return checkpointer.save(engine, step, t5, data.tokenizer, trainer_state())

    def evaluate(step: int) -> None:
        record = {"step": step}
        with telemetry.paused():
            for split in ("valid", "test"):
                result = evaluate_split(engine.module.t5, data.tokenizer, data.splits[split], env,
                                        zero3=zero3, **eval_settings)
                write_jsonl(run_dir / "predictions" / f"step{step:06d}-{split}.jsonl", result.records, env)
                telemetry.log_eval(step, split, result.metrics)
                record[split] = result.metrics
        history.append(record)

    def finite_micro_batch(step: int):
        """The next micro-batch whose loss is finite on every rank; non-finite ones are skipped."""
        while True:
            position = order.position
            with telemetry.timed("data_wait"):
                rows = train_split[order.next_indices()]
                batch = collate(rows, data.tokenizer.pad_token_id, mode.rationale_pass, mode.target_column)
                tokens, flops = count_tokens(batch), train_step_flops(t5.config, batch)
                batch = {k: v.to(env.device) for k, v in batch.items()}
            with telemetry.timed("forward"):
                parts = engine(batch)
            parts = testhooks.poison_loss(parts, env.rank, position)
            if guard.all_finite(parts["total"]):
                return parts, rows, tokens, flops
            telemetry.print(f"step {step}: non-finite loss in micro-batch {position} (on at least one rank); "
                            f"skipped, {guard.in_a_row} in a row, {guard.total} in total")
            if guard.exhausted:
                end_early(step, "nonfinite", EXIT_NONFINITE,
                          f"the loss was NaN/inf in {guard.in_a_row} consecutive micro-batches at step {step} "
                          f"(--max_bad_steps {cfg.max_bad_steps}); stopped without saving; last good "
                          f"checkpoint: {checkpointer.latest() or 'none'}")

    def end_early(step: int, status: str, code: int, message: str):
        write_json(run_dir / "status.json", {"status": status, "step": step, "exit_code": code,
                                             "message": message}, env)
        # No rank leaves before status.json exists: a launcher or srun --kill-on-bad-exit tears the
        # others down as soon as one rank exits non-zero.
        barrier(env)
        telemetry.close()
        shutdown()
        raise RunStopped(message, code, show=env.is_main)

    for step in range(start_step + 1, cfg.max_steps + 1):
        testhooks.signal_at_step(env.rank, step)
        for _ in range(cfg.grad_accum):
            parts, rows, tokens, flops = finite_micro_batch(step)
            with telemetry.timed("backward"):
                engine.backward(parts["total"])
            with telemetry.timed("optimizer"):
                engine.step()
            telemetry.record_micro_step(parts, samples=len(rows["input"]), tokens=tokens, flops=flops)
        telemetry.end_step(step, lr=engine.get_lr()[0], grad_norm=engine.get_global_grad_norm(),
                           skipped_steps=guard.total)
        if stop_request.agreed(env):  # every rank got (or was told of) SIGTERM/SIGUSR1
            saved = save(step)
            end_early(step, "preempted", EXIT_PREEMPTED,
                      f"stopped by {stop_request.signal_name or 'a signal to another rank'} after step {step}; "
                      f"checkpoint {saved} saved; continue with --resume auto (exit code {EXIT_PREEMPTED})")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            evaluate(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            save(step)
    evaluate(cfg.max_steps)
    train_seconds = seconds_before + time.perf_counter() - t_start

    testhooks.dump_greedy(engine.module.t5, data.tokenizer, data.splits["test"], env,
                          synced=zero3 and env.world_size > 1)
    export_hf_model(engine, data.tokenizer, run_dir / "model", env, zero3)
    final = history[-1]
    results = {
        **run_metadata(cfg), "steps": cfg.max_steps, "world_size": env.world_size, "precision": precision,
        "zero_stage": stage, "train_seconds": round(train_seconds, 1),
        **select_accuracies(history),
        "test_accuracy": final["test"]["accuracy"], "valid_accuracy": final["valid"]["accuracy"],
        "majority_label_test_accuracy": majority_baseline(train_split, data.splits["test"], eval_settings["scorer"]),
        "skipped_micro_batches": guard.total,
        "data": data.summary.to_dict(),
        "evaluations": history,
    }
    write_json(run_dir / "results.json", results, env)
    write_json(run_dir / "status.json", {"status": "completed", "step": cfg.max_steps, "exit_code": 0}, env)
    telemetry.print(
        f"done in {train_seconds:.0f} s: test accuracy {results['test_accuracy']:.4f} "
        f"({final['test']['correct']}/{final['test']['total']}), valid {results['valid_accuracy']:.4f} "
        f"(best test {results['accuracy_best_test']:.4f} at step {results['step_best_test']}, "
        f"test at best valid {results['accuracy_at_best_valid']:.4f} at step {results['step_at_best_valid']}); "
        f"always answering the most common training label scores "
        f"{results['majority_label_test_accuracy']:.4f}. Model: {run_dir / 'model'}; "
        f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    telemetry.close()
    shutdown()
    return results
