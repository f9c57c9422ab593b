"""The training loop: set up -> for each step: batch, forward/backward/step, maybe log, maybe
evaluate -> final evaluation, results, export. Read it top to bottom."""
from __future__ import annotations

import time

import torch

from .checkpoint import export_hf_model
from .config import TrainConfig, UsageError
from .data.collate import collate, count_tokens
from .data.pipeline import prepare_data
from .data.sampler import BatchOrder
from .distributed import init_distributed, shutdown
from .engine import build_ds_config, create_engine, read_ds_config, resolve_precision, zero_stage
from .evaluate import evaluate_split, majority_baseline
from .flops import train_step_flops
from .model import DistillModel, build_student
from .modes import MODES
from .results import run_metadata, select_accuracies
from .run_dir import choose_run_dir, create_run_dir, write_json, write_jsonl
from .scoring import scorer_for
from .telemetry import Telemetry, quiet_libraries


def run_training(cfg: TrainConfig) -> dict:
    # What can be checked without start-up cost fails first.
    read_ds_config(cfg.ds_config)
    precision = resolve_precision(cfg)
    env = init_distributed(cfg.dist_timeout_s)
    quiet_libraries(env)
    run_dir = choose_run_dir(cfg, env)
    torch.manual_seed(cfg.seed)

    data = prepare_data(cfg, env)
    t5 = build_student(cfg, data.tokenizer)
    ds_config = build_ds_config(cfg, env, precision, t5.config.d_model)
    try:
        order = BatchOrder(len(data.splits["train"]), cfg.batch_size, env.rank, env.world_size, cfg.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    mode = MODES[cfg.mode]
    zero3 = zero_stage(ds_config) == 3

    config_yaml = cfg.to_yaml()
    create_run_dir(run_dir, env, config_yaml, ds_config)
    if env.is_main:
        print(f"resolved config (saved to {run_dir / 'config.yaml'}):\n{config_yaml}", flush=True)
        n_params = sum(p.numel() for p in t5.parameters())
        print(f"student: {cfg.model} ({n_params:,} parameters), {precision}, "
              f"ZeRO-{zero_stage(ds_config)}, {env.world_size} rank(s) on {env.device.type}; "
              f"train/valid/test = {', '.join(str(len(s)) for s in data.splits.values())} examples",
              flush=True)
        data.tokenizer.save_pretrained(run_dir / "tokenizer")

    engine = create_engine(DistillModel(t5, cfg), ds_config, cfg)
    telemetry = Telemetry(run_dir, env, start_step=0, max_steps=cfg.max_steps, log_every=cfg.log_every,
                          config_yaml=config_yaml, hparams=cfg.to_dict(), precision=precision,
                          sync_timers=cfg.sync_timers)
    train_split = data.splits["train"]
    history: list[dict] = []
    scorer = scorer_for(cfg.dataset)
    t_start = time.perf_counter()

    def evaluate(step: int) -> None:
        record = {"step": step}
        with telemetry.paused():
            for split in ("valid", "test"):
                result = evaluate_split(engine.module.t5, data.tokenizer, data.splits[split], env,
                                        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                        zero3=zero3, scorer=scorer, rationales=cfg.eval_rationales,
                                        rationale_max_new_tokens=cfg.max_target_length)
                write_jsonl(run_dir / "predictions" / f"step{step:06d}-{split}.jsonl", result.records, env)
                telemetry.log_eval(step, split, result.metrics)
                record[split] = result.metrics
        history.append(record)

    for step in range(1, cfg.max_steps + 1):
        for _ in range(cfg.grad_accum):
            with telemetry.timed("data_wait"):
                rows = train_split[order.next_indices()]
                batch = collate(rows, data.tokenizer.pad_token_id, mode.rationale_pass)
                tokens, flops = count_tokens(batch), train_step_flops(t5.config, batch)
                batch = {k: v.to(env.device) for k, v in batch.items()}
            with telemetry.timed("forward"):
                parts = engine(batch)
            with telemetry.timed("backward"):
                engine.backward(parts["total"])
            with telemetry.timed("optimizer"):
                engine.step()
            telemetry.record_micro_step(parts, samples=len(rows["input"]), tokens=tokens, flops=flops)
        telemetry.end_step(step, lr=engine.get_lr()[0], grad_norm=engine.get_global_grad_norm(),
                           skipped_steps=engine.skipped_steps)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            evaluate(step)
    evaluate(cfg.max_steps)
    train_seconds = time.perf_counter() - t_start

    export_hf_model(engine, data.tokenizer, run_dir / "model", env, zero3)
    final = history[-1]
    results = {
        **run_metadata(cfg), "steps": cfg.max_steps, "world_size": env.world_size, "precision": precision,
        "zero_stage": zero_stage(ds_config), "train_seconds": round(train_seconds, 1),
        **select_accuracies(history),
        "test_accuracy": final["test"]["accuracy"], "valid_accuracy": final["valid"]["accuracy"],
        "majority_label_test_accuracy": majority_baseline(train_split, data.splits["test"]),
        "evaluations": history,
    }
    write_json(run_dir / "results.json", results, env)
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
