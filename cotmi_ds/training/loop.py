"""The training loop. ``Trainer.__init__`` sets up (or resumes) a run; ``Trainer.train`` reads top to
bottom: for each step train, maybe stop, maybe evaluate, maybe save; then the final evaluation,
results and export."""
from __future__ import annotations

import torch

from cotmi_ds.checkpoint import checkpointer as ckpt
from cotmi_ds.checkpoint.export import export_hf_model
from cotmi_ds.checkpoint.layout import model_identity
from cotmi_ds.config import TrainConfig, UsageError
from cotmi_ds.console import quiet_libraries
from cotmi_ds.data.batches import BatchSource
from cotmi_ds.data.pipeline import prepare_data
from cotmi_ds.data.sampler import BatchOrder
from cotmi_ds.distributed import barrier, init_distributed, shutdown
from cotmi_ds.evaluation.generate import evaluate_split, evaluation_settings, majority_baseline
from cotmi_ds.evaluation.results import run_metadata, select_accuracies
from cotmi_ds.files import write_json_atomic, write_jsonl_atomic
from cotmi_ds.model.hub import fetch_once_per_node
from cotmi_ds.model.student import DistillModel, build_student
from cotmi_ds.modes import MODES
from cotmi_ds.training.ds_ops import check_ops
from cotmi_ds.training.engine import create_engine, fill_ds_config, read_ds_config, resolve_precision, zero_stage
from cotmi_ds.training.faults import NO_FAULTS, Faults
from cotmi_ds.training.run_dir import choose_run_dir, create_run_dir
from cotmi_ds.training.state import TrainState
from cotmi_ds.training.stopping import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteGuard, RunStopped, StopRequest
from cotmi_ds.training.telemetry import Telemetry


def run_training(cfg: TrainConfig, faults: Faults = NO_FAULTS) -> dict:
    return Trainer(cfg, faults).train()


class Trainer:
    def __init__(self, cfg: TrainConfig, faults: Faults = NO_FAULTS):
        self.cfg, self.faults = cfg, faults
        # What can be checked without start-up cost fails first.
        raw_ds, ds_where = read_ds_config(cfg.ds_config)
        self.precision = precision = resolve_precision(cfg)
        self.stop_request = StopRequest()  # from here on SIGTERM/SIGUSR1 end the run cleanly
        self.env = env = init_distributed(cfg.dist_timeout_s)
        quiet_libraries(env)
        for warning in check_ops(raw_ds, ds_where, env.device.type):  # compiled ops: before any loading
            if env.is_main:
                print(f"warning: {warning}", flush=True)
        self.run_dir, resume_from = choose_run_dir(cfg, env)
        torch.manual_seed(cfg.seed)

        fetch_once_per_node(cfg, env)
        self.data = data = prepare_data(cfg, env)
        t5 = build_student(cfg, data.tokenizer)
        identity = model_identity(t5, data.tokenizer)
        stage = zero_stage(raw_ds)
        resumed, universal = None, False
        if resume_from is not None:  # checked against this run before anything is written
            resumed, universal = ckpt.open_for_resume(resume_from, identity, cfg.max_steps,
                                                      env.world_size, stage)
        ds_config = fill_ds_config(raw_ds, ds_where, cfg, env, precision, t5.config.d_model, universal)
        try:
            order = BatchOrder(len(data.splits["train"]), cfg.batch_size, env.rank, env.world_size, cfg.seed)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.state = TrainState(order)

        self.config_yaml = cfg.to_yaml()
        create_run_dir(self.run_dir, env, self.config_yaml, ds_config)
        self._describe(identity, stage)
        self.engine = create_engine(DistillModel(t5, cfg), ds_config, cfg, env.world_size)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, env, cfg.keep_last, {
            "world_size": env.world_size, "zero_stage": stage, "precision": precision,
            "model": {"name": cfg.model, **identity}, "config": cfg.to_dict()},
            after_write=faults.checkpoint_written)
        if resumed is not None:
            trainer_state = ckpt.load(self.engine.ds, resumed, env, universal, cfg.seed)
            self.state.load_state_dict(trainer_state, resumed.step)
            if env.is_main:
                via = " (through a universal checkpoint: the world size changed)" if universal else ""
                print(f"resumed from {resumed.path} at step {resumed.step}{via}", flush=True)
        self.guard = NonFiniteGuard(cfg.max_bad_steps, env)
        self.batches = BatchSource(data.splits["train"], order, data.tokenizer.pad_token_id, MODES[cfg.mode],
                                   t5.config, env.device)
        self.telemetry = Telemetry(self.run_dir, env, start_step=self.state.step, max_steps=cfg.max_steps,
                                   log_every=cfg.log_every, config_yaml=self.config_yaml, hparams=cfg.to_dict(),
                                   precision=precision, sync_timers=cfg.sync_timers)
        self.eval_settings = evaluation_settings(cfg)

    def _describe(self, identity: dict, stage: int) -> None:
        cfg, env, data = self.cfg, self.env, self.data
        if not env.is_main:
            return
        print(f"resolved config (saved to {self.run_dir / 'config.yaml'}):\n{self.config_yaml}", flush=True)
        print(f"student: {cfg.model} ({identity['parameters']:,} parameters), {self.precision}, "
              f"ZeRO-{stage}, {env.world_size} rank(s) on {env.device.type}; "
              f"train/valid/test = {', '.join(str(len(s)) for s in data.splits.values())} examples",
              flush=True)
        print(f"{data.summary.describe()}\n  prepared in {data.seconds:.1f} s (tokenized-data cache: "
              f"{data.cache_status})", flush=True)
        data.tokenizer.save_pretrained(self.run_dir / "tokenizer")

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.cfg
        self.state.start_clock()
        for step in range(self.state.step + 1, cfg.max_steps + 1):
            self.faults.step_begins(self.env.rank, step)
            self.train_step(step)
            if self.stop_request.agreed(self.env):  # every rank got (or was told of) SIGTERM/SIGUSR1
                self.stop_preempted(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                self.evaluate(step)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                self.save(step)
        self.evaluate(cfg.max_steps)
        return self.finish()

    def train_step(self, step: int) -> None:
        engine, telemetry = self.engine.ds, self.telemetry
        for _ in range(self.cfg.grad_accum):
            micro, parts = self.finite_micro_batch(step)
            with telemetry.timed("backward"):
                engine.backward(parts["total"])
            with telemetry.timed("optimizer"):
                engine.step()
            telemetry.record_micro_step(parts, samples=micro.samples, tokens=micro.tokens, flops=micro.flops)
        self.state.step = step
        telemetry.end_step(step, lr=engine.get_lr()[0], grad_norm=engine.get_global_grad_norm(),
                           skipped_steps=self.state.skipped_micro_batches)

    def finite_micro_batch(self, step: int):
        """The next micro-batch whose loss is finite on every rank; non-finite ones are skipped."""
        while True:
            with self.telemetry.timed("data_wait"):
                micro = self.batches.next()
            with self.telemetry.timed("forward"):
                parts = self.engine.ds(micro.batch)
            parts = self.faults.loss(parts, self.env.rank, micro.position)
            if self.guard.all_finite(parts["total"]):
                return micro, parts
            self.state.skipped_micro_batches += 1
            self.telemetry.print(f"step {step}: non-finite loss in micro-batch {micro.position} (on at least one "
                                 f"rank); skipped, {self.guard.in_a_row} in a row, "
                                 f"{self.state.skipped_micro_batches} in total")
            if self.guard.exhausted:
                self.end_early(step, "nonfinite", EXIT_NONFINITE,
                               f"the loss was NaN/inf in {self.guard.in_a_row} consecutive micro-batches at step "
                               f"{step} (--max_bad_steps {self.cfg.max_bad_steps}); stopped without saving; last "
                               f"good checkpoint: {self.checkpointer.latest() or 'none'}")

    def evaluate(self, step: int) -> None:
        record = {"step": step}
        with self.telemetry.paused():
            for split in ("valid", "test"):
                result = evaluate_split(self.engine.t5, self.data.tokenizer, self.data.splits[split], self.env,
                                        synced=self.engine.synced_generation, **self.eval_settings)
                if self.env.is_main:
                    write_jsonl_atomic(self.run_dir / "predictions" / f"step{step:06d}-{split}.jsonl",
                                       result.records)
                self.telemetry.log_eval(step, split, result.metrics)
                record[split] = result.metrics
        self.state.evaluations.append(record)

    def save(self, step: int):
        with self.telemetry.paused():
            return self.checkpointer.save(self.engine.ds, step, self.engine.t5, self.data.tokenizer,
                                          self.state.state_dict())

    # --- endings -------------------------------------------------------------------------------

    def stop_preempted(self, step: int) -> None:
        saved = self.save(step)
        self.end_early(step, "preempted", EXIT_PREEMPTED,
                       f"stopped by {self.stop_request.signal_name or 'a signal to another rank'} after step "
                       f"{step}; checkpoint {saved} saved; continue with --resume auto (exit code {EXIT_PREEMPTED})")

    def end_early(self, step: int, status: str, code: int, message: str):
        self._write("status.json", {"status": status, "step": step, "exit_code": code, "message": message})
        # No rank leaves before status.json exists: a launcher or srun --kill-on-bad-exit tears the
        # others down as soon as one rank exits non-zero.
        barrier(self.env)
        self.telemetry.close()
        shutdown()
        raise RunStopped(message, code, show=self.env.is_main)

    def finish(self) -> dict:
        cfg, state, data = self.cfg, self.state, self.data
        train_seconds = state.train_seconds
        export_hf_model(self.engine.ds, data.tokenizer, self.run_dir / "model", self.env, self.engine.zero3)
        final = state.evaluations[-1]
        results = {
            **run_metadata(cfg), "steps": cfg.max_steps, "world_size": self.env.world_size,
            "precision": self.precision, "zero_stage": self.engine.stage, "train_seconds": round(train_seconds, 1),
            **select_accuracies(state.evaluations),
            "test_accuracy": final["test"]["accuracy"], "valid_accuracy": final["valid"]["accuracy"],
            "majority_label_test_accuracy": majority_baseline(data.splits["train"], data.splits["test"],
                                                              self.eval_settings["scorer"]),
            "skipped_micro_batches": state.skipped_micro_batches,
            "data": data.summary.to_dict(),
            "evaluations": state.evaluations,
        }
        self._write("results.json", results)
        self._write("status.json", {"status": "completed", "step": cfg.max_steps, "exit_code": 0})
        self.telemetry.print(
            f"done in {train_seconds:.0f} s: test accuracy {results['test_accuracy']:.4f} "
            f"({final['test']['correct']}/{final['test']['total']}), valid {results['valid_accuracy']:.4f} "
            f"(best test {results['accuracy_best_test']:.4f} at step {results['step_best_test']}, "
            f"test at best valid {results['accuracy_at_best_valid']:.4f} at step {results['step_at_best_valid']}); "
            f"always answering the most common training label scores "
            f"{results['majority_label_test_accuracy']:.4f}. Model: {self.run_dir / 'model'}; "
            f"TensorBoard: tensorboard --logdir {self.run_dir / 'tb'}")
        self.telemetry.close()
        shutdown()
        return results

    def _write(self, name: str, payload: dict) -> None:
        if self.env.is_main:
            write_json_atomic(self.run_dir / name, payload)
