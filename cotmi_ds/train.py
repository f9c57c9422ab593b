"""The training loop: set up -> for each step: batch, forward/backward/step, maybe log, maybe
evaluate -> final evaluation, results, export. Read it top to bottom."""
from __future__ import annotations

import time

import torch

from .checkpoint import export_hf_model
from .config import TrainConfig, UsageError
from .data.collate import collate, count_tokens
from .data.pipeline import check_data_files, prepare_data
from .data.sampler import BatchOrder
from .distributed import init_distributed, shutdown
from .engine import build_ds_config, create_engine, read_ds_config, resolve_precision, zero_stage
from .evaluate import evaluate_split, majority_baseline
from .model import DistillModel, build_student
from .modes import MODES, generation_length, label_from_generation
from .run_dir import choose_run_dir, create_run_dir, write_json
from .telemetry import Telemetry, quiet_libraries


def run_training(cfg: TrainConfig) -> dict:
    # What can be checked without start-up cost fails first.
    read_ds_config(cfg.ds_config)
    check_data_files(cfg)
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
    max_new_tokens = generation_length(mode, cfg.max_new_tokens, cfg.max_target_length)
    label_from_text = (lambda text: label_from_generation(text, mode)) if mode.single_target else None
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
        print(f"{data.summary.describe()}\n  prepared in {data.seconds:.1f} s (tokenized-data cache: "
              f"{data.cache_status})", flush=True)
        data.tokenizer.save_pretrained(run_dir / "tokenizer")

    engine = create_engine(DistillModel(t5, cfg), ds_config, cfg)
    telemetry = Telemetry(run_dir, env, start_step=0, max_steps=cfg.max_steps, log_every=cfg.log_every,
                          config_yaml=config_yaml)
    train_split = data.splits["train"]
    history: list[dict] = []
    t_start = time.perf_counter()

    def evaluate(step: int) -> None:
        record = {"step": step}
        with telemetry.paused():
            for split in ("valid", "test"):
                metrics = evaluate_split(engine.module.t5, data.tokenizer, data.splits[split], env,
                                         batch_size=cfg.eval_batch_size, max_new_tokens=max_new_tokens,
                                         zero3=zero3, label_from_text=label_from_text)
                telemetry.log_eval(step, split, metrics)
                record[split] = metrics
        history.append(record)

    for step in range(1, cfg.max_steps + 1):
        for _ in range(cfg.grad_accum):
            rows = train_split[order.next_indices()]
            batch = collate(rows, data.tokenizer.pad_token_id, mode.rationale_pass, mode.target_column)
            tokens = count_tokens(batch)
            parts = engine({k: v.to(env.device) for k, v in batch.items()})
            engine.backward(parts["total"])
            engine.step()
            telemetry.record_micro_step(parts, samples=len(rows["input"]), tokens=tokens)
        telemetry.end_step(step, lr=engine.get_lr()[0], grad_norm=engine.get_global_grad_norm())
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            evaluate(step)
    evaluate(cfg.max_steps)
    train_seconds = time.perf_counter() - t_start

    export_hf_model(engine, data.tokenizer, run_dir / "model", env, zero3)
    final = history[-1]
    results = {
        "dataset": cfg.dataset, "model": cfg.model, "mode": cfg.mode, "alpha": cfg.alpha, "beta": cfg.beta,
        "seed": cfg.seed, "steps": cfg.max_steps, "world_size": env.world_size, "precision": precision,
        "zero_stage": zero_stage(ds_config), "train_seconds": round(train_seconds, 1),
        "test_accuracy": final["test"]["accuracy"], "valid_accuracy": final["valid"]["accuracy"],
        "majority_label_test_accuracy": majority_baseline(train_split, data.splits["test"]),
        "data": data.summary.to_dict(),
        "evaluations": history,
    }
    write_json(run_dir / "results.json", results, env)
    telemetry.print(
        f"done in {train_seconds:.0f} s: test accuracy {results['test_accuracy']:.4f} "
        f"({final['test']['correct']}/{final['test']['total']}), valid {results['valid_accuracy']:.4f}; "
        f"always answering the most common training label scores "
        f"{results['majority_label_test_accuracy']:.4f}. Model: {run_dir / 'model'}; "
        f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    telemetry.close()
    shutdown()
    return results
