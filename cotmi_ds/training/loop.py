"""The training loop. ``Trainer.__init__`` sets up (or resumes) a run; ``Trainer.train`` reads top to
bottom: for each step train, maybe stop, maybe evaluate, maybe save; then the final evaluation,
results and export."""
from __future__ import annotations

import contextlib
import itertools
import time

import torch

from cotmi_ds.checkpoint import checkpointer as ckpt
from cotmi_ds.checkpoint.export import export_hf_model
from cotmi_ds.checkpoint.layout import model_identity, read_checkpoint, tag
from cotmi_ds.config import TrainConfig, describe_batch, resolve_global_batch
from cotmi_ds.console import quiet_libraries
from cotmi_ds.data.batches import BatchSource
from cotmi_ds.data.datasets import check_data_files
from cotmi_ds.data.collate import row_lengths
from cotmi_ds.data.pipeline import prepare_data
from cotmi_ds.data.sampler import BatchOrder
from cotmi_ds.distributed import barrier, init_distributed, shutdown
from cotmi_ds.ds_configs import choose_ds_config
from cotmi_ds.ds_configs.precision import resolve_precision
from cotmi_ds.errors import UsageError
from cotmi_ds.evaluation.generate import evaluate_split, evaluation_settings, majority_baseline
from cotmi_ds.evaluation.results import run_metadata, select_metrics
from cotmi_ds.files import write_json_atomic, write_jsonl_atomic
from cotmi_ds.model.compiled import CompileClock, compile_refusal, eager_blocks
from cotmi_ds.model.hub import fetch_once_per_node
from cotmi_ds.model.student import DistillModel, build_student, student_config
from cotmi_ds.modes import mode_of
from cotmi_ds.training.engine import create_engine
from cotmi_ds.training.faults import NO_FAULTS, Faults
from cotmi_ds.training.run_dir import choose_run_dir, create_run_dir
from cotmi_ds.training.state import TrainState
from cotmi_ds.training.stopping import (EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteGuard, PhaseAbandoned, RunStopped,
                                        StopRequest)
from cotmi_ds.training.telemetry import Telemetry


def run_training(cfg: TrainConfig, faults: Faults = NO_FAULTS) -> dict:
    return Trainer(cfg, faults).train()


class Trainer:
    def __init__(self, cfg: TrainConfig, faults: Faults = NO_FAULTS):
        cfg = check_data_files(cfg)  # the config as the run records it (your own data's task resolved)
        self.cfg, self.faults = cfg, faults
        self.stop_request = StopRequest()  # from here on SIGTERM/SIGUSR1 end the run cleanly
        self.env = env = init_distributed(cfg.dist_timeout_s)
        self.precision = precision = resolve_precision(cfg, env.device)  # probes this rank's own GPU
        quiet_libraries(env)
        self.cfg = cfg = resolve_global_batch(cfg, env.world_size)  # saved and used as resolved
        self.run_dir, resume_from, replace = choose_run_dir(cfg, env)
        torch.manual_seed(cfg.seed)

        # Its stage and world size only: rank 0 verified the checkpoint's sums when it chose it.
        saved = None if resume_from is None else read_checkpoint(resume_from, "--resume", verify=False)
        chosen = choose_ds_config(cfg.ds_config, env.world_size, None if saved is None else saved.zero_stage)
        universal = saved is not None and ckpt.needs_universal(saved, env.world_size, chosen.stage)
        for warning in chosen.check_ops(env.device.type):  # compiled ops: before any loading
            if env.is_main:
                print(f"warning: {warning}", flush=True)
        if cfg.compile and (refusal := compile_refusal(env.device.type, chosen.stage)):
            raise UsageError(refusal)
        self.compile_clock = CompileClock() if cfg.compile else None
        fetch_once_per_node(cfg, env)
        self.data = data = prepare_data(cfg, env)
        # Filled before the build: at ZeRO-3 the student is created already partitioned (zero.Init).
        ds_config = chosen.fill(cfg, env, precision, student_config(cfg, data.tokenizer).d_model, universal)
        t5 = build_student(cfg, data.tokenizer, ds_config)
        identity = model_identity(t5, data.tokenizer)
        # checked against this run before anything is written
        resumed = None if resume_from is None else ckpt.open_for_resume(resume_from, identity, cfg.max_steps)
        try:
            mode, train = mode_of(cfg), data.splits["train"]
            # lengths even without grouping: a resumed epoch that was started grouped keeps its order
            order = BatchOrder(len(train), cfg.batch_size, env.rank, env.world_size, cfg.seed, cfg.grad_accum,
                               lengths=row_lengths(train, mode.rationale_pass, mode.target_column),
                               group_by_length=cfg.group_by_length)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.state = TrainState(order)

        self.config_yaml = cfg.to_yaml()
        create_run_dir(self.run_dir, env, self.config_yaml, ds_config, replace)
        self._describe(identity, chosen.stage)
        self.engine = create_engine(DistillModel(t5, cfg), ds_config, cfg, env.world_size)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, env, cfg.keep_last, {
            "world_size": env.world_size, "zero_stage": chosen.stage, "precision": precision,
            "model": {"name": cfg.model, **identity}, "config": cfg.to_dict()},
            after_write=faults.checkpoint_written)
        if resumed is not None:
            trainer_state = ckpt.load(self.engine.ds, resumed, env, universal, cfg.seed)
            self.state.load_state_dict(trainer_state, resumed.step)
            if env.is_main:
                via = " (through a universal checkpoint: the world size changed)" if universal else ""
                print(f"resumed from {resumed.path} at step {resumed.step}{via}", flush=True)
        self.guard = NonFiniteGuard(cfg.max_bad_steps, env)
        self.batches = BatchSource(data.splits["train"], order, data.tokenizer.pad_token_id, mode_of(cfg),
                                   t5.config, env.device)
        self.telemetry = Telemetry(self.run_dir, env, start_step=self.state.step, max_steps=cfg.max_steps,
                                   log_every=cfg.log_every, config_yaml=self.config_yaml, hparams=cfg.to_dict(),
                                   precision=precision, sync_timers=cfg.sync_timers)
        self.eval_settings = evaluation_settings(cfg)
        self.saved = None  # the checkpoint this launch saved last

    def _describe(self, identity: dict, stage: int) -> None:
        cfg, env, data = self.cfg, self.env, self.data
        if not env.is_main:
            return
        print(f"resolved config (saved to {self.run_dir / 'config.yaml'}):\n{self.config_yaml}", flush=True)
        print(f"batch: {describe_batch(cfg, env.world_size)}", flush=True)
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
        if self.evaluation_due(self.state.step):  # abandoned when the run stopped (or it stopped just before)
            self.evaluate(self.state.step)
        for step in range(self.state.step + 1, cfg.max_steps + 1):
            self.faults.step_begins(self.env.rank, step)
            self.train_step(step)
            if self.stop_request.agreed(self.env):  # every rank got (or was told of) SIGTERM/SIGUSR1
                self.stop_preempted(step)
            if self.evaluation_due(step):
                self.evaluate(step, limit=cfg.eval_max_examples)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                self.save(step)
        self.evaluate(cfg.max_steps)
        return self.finish()

    def train_step(self, step: int) -> None:
        deepspeed_engine, telemetry = self.engine.ds, self.telemetry
        deepspeed_engine.train()  # dropout on, as the release's Trainer does every step (evaluation switches it off)
        skipped = False
        for _ in range(self.cfg.grad_accum):
            micro, parts = self.finite_micro_batch(step)
            with telemetry.timed("backward"):
                self.engine.backward(parts["total"] * micro.weight)  # weight: rows in a partial batch (sampler.py)
            with telemetry.timed("optimizer"):
                skipped |= self.engine.step()
            telemetry.record_micro_step(parts, samples=micro.samples, tokens=micro.tokens, flops=micro.flops,
                                        weight=micro.weight)
        self.state.step = step
        self.count_update(step, skipped=skipped)
        telemetry.end_step(step, lr=deepspeed_engine.get_lr()[0], grad_norm=deepspeed_engine.get_global_grad_norm(),
                           skipped_micro_batches=self.state.skipped_micro_batches,
                           skipped_updates=self.state.skipped_updates)
        if self.compile_clock is not None and (seconds := self.compile_clock.since_report()) > 0:
            telemetry.print(f"step {step}: torch.compile compiled the blocks for {seconds:.1f} s "
                            f"({self.compile_clock.seconds:.1f} s in this launch)")

    def count_update(self, step: int, skipped: bool) -> None:
        """Every optimizer step ends here: a skipped update (whatever skipped it) is counted, and
        --max_bad_steps of them in a row end the run as non-finite losses do."""
        self.guard.update_done(skipped)
        if not skipped:
            return
        self.state.skipped_updates += 1
        self.telemetry.print(f"step {step}: non-finite gradients (on at least one rank); the update was skipped, "
                             f"{self.guard.updates_in_a_row} in a row, {self.state.skipped_updates} in total")
        if self.guard.updates_exhausted:
            self.stop_nonfinite(step, f"{self.guard.updates_in_a_row} consecutive optimizer updates were skipped "
                                      f"for non-finite gradients, up to step {step} "
                                      f"(--max_bad_steps {self.cfg.max_bad_steps})")

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
                self.stop_nonfinite(step, f"the loss was NaN/inf in {self.guard.in_a_row} consecutive micro-batches "
                                          f"at step {step} (--max_bad_steps {self.cfg.max_bad_steps})")

    def evaluation_due(self, step: int) -> bool:
        """An evaluation every --eval_every steps (the one at max_steps comes after the loop), unless
        this step's is already recorded."""
        every = self.cfg.eval_every
        return (0 < step < self.cfg.max_steps and bool(every) and step % every == 0
                and all(e["step"] != step for e in self.state.evaluations))

    def evaluate(self, step: int, limit: int = 0) -> None:
        """Both splits, or with ``limit`` their first ``limit`` examples (evaluations during training).
        A stop request agreed between two generation batches abandons it (saved, exit 75; it is run
        again after the resume)."""
        batches = itertools.count()

        def before_batch():
            self.faults.evaluation_batch(self.env.rank, step, next(batches))
            self.stop_request.abandon_if_agreed(self.env, "evaluation")

        try:
            self._evaluate(step, before_batch, limit)
        except PhaseAbandoned as e:
            self.stop_preempted(step, during=str(e))

    def _evaluate(self, step: int, before_batch, limit: int) -> None:
        record = {"step": step}
        with self.telemetry.paused(), (eager_blocks() if self.cfg.compile else contextlib.nullcontext()):
            started = time.perf_counter()
            for split in ("valid", "test"):
                examples = self.data.splits[split]
                if 0 < limit < len(examples):
                    examples = examples.select(range(limit))
                t = time.perf_counter()
                result = evaluate_split(self.engine.t5, self.data.tokenizer, examples, self.env,
                                        synced=self.engine.synced_generation, before_batch=before_batch,
                                        **self.eval_settings)
                if self.env.is_main:
                    write_jsonl_atomic(self.run_dir / "predictions" / f"step{step:06d}-{split}.jsonl",
                                       result.records)
                self.telemetry.log_eval(step, split, result.metrics, seconds=time.perf_counter() - t)
                record[split] = result.metrics
            self.telemetry.log_eval_time(step, time.perf_counter() - started)
        self.state.evaluations.append(record)

    def save(self, step: int):
        """Publishes step's checkpoint, or ends the run (exit 3) when its weights are not finite."""
        with self.telemetry.paused():
            try:
                self.saved = self.checkpointer.save(self.engine.ds, step, self.engine.t5, self.data.tokenizer,
                                                    self.state.state_dict())
                return self.saved
            except ckpt.NonFiniteWeights as e:
                self.stop_nonfinite(step, f"{e} (the optimizer diverged: lower --lr or raise --warmup_steps)")

    # --- endings -------------------------------------------------------------------------------

    def stop_preempted(self, step: int, during: str | None = None) -> None:
        """Save (unless step's checkpoint was just saved: the final evaluation and export come after
        it) and exit 75."""
        saved = self.saved if self.saved is not None and self.saved.name == tag(step) else self.save(step)
        where = f"during the {during} at step {step} (run again after the resume)" if during else f"after step {step}"
        self.end_early(step, "preempted", EXIT_PREEMPTED,
                       f"stopped by {self.stop_request.signal_name or 'a signal to another rank'} {where}; "
                       f"checkpoint {saved} saved; continue with --resume auto (exit code {EXIT_PREEMPTED})")

    def stop_nonfinite(self, step: int, reason: str):
        self.end_early(step, "nonfinite", EXIT_NONFINITE, f"{reason}; stopped without saving; last good "
                                                          f"checkpoint: {self.checkpointer.latest() or 'none'}")

    def end_early(self, step: int, status: str, code: int, message: str):
        self._write("status.json", {"status": status, "step": step, "exit_code": code, "message": message})
        # No rank leaves before status.json exists: a launcher or srun --kill-on-bad-exit tears the
        # others down as soon as one rank exits non-zero.
        barrier(self.env)
        self.close()
        raise RunStopped(message, code, show=self.env.is_main)

    def finish(self) -> dict:
        cfg, state, data = self.cfg, self.state, self.data
        train_seconds = state.train_seconds
        if self.stop_request.agreed(self.env):  # the export can be long: redone after the resume
            self.stop_preempted(cfg.max_steps, during="final export")
        final = state.evaluations[-1]
        results = {
            **run_metadata(cfg), "steps": cfg.max_steps, "world_size": self.env.world_size,
            "global_batch_size": cfg.batch_size * cfg.grad_accum * self.env.world_size,
            "micro_batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "precision": self.precision, "zero_stage": self.engine.stage, "train_seconds": round(train_seconds, 1),
            **select_metrics(state.evaluations),
            "test_accuracy": final["test"]["accuracy"], "valid_accuracy": final["valid"]["accuracy"],
            "majority_label_test_accuracy": majority_baseline(data.splits["train"], data.splits["test"],
                                                              self.eval_settings["scorer"]),
            "skipped_micro_batches": state.skipped_micro_batches, "skipped_updates": state.skipped_updates,
            "data": data.summary.to_dict(),
            "evaluations": state.evaluations,
        }
        # From the final checkpoint (always saved at max_steps): the same weights as `cotmi export` of
        # it; then results.json, which tells a sweep the run is finished.
        export_hf_model(self.checkpointer.latest(), self.run_dir / "model", self.env, results)
        self._write("results.json", results)
        self._write("status.json", {"status": "completed", "step": cfg.max_steps, "exit_code": 0})
        test = final["test"]
        rationales = (f", rationales BLEU {test['rationale_bleu']:.1f} chrF {test['rationale_chrf']:.1f} "
                      f"(first {test['rationale_examples']} test examples)" if "rationale_bleu" in test else "")
        self.telemetry.print(
            f"done in {train_seconds:.0f} s: test accuracy {results['test_accuracy']:.4f} "
            f"({test['correct']}/{test['total']}){rationales}, valid {results['valid_accuracy']:.4f} "
            f"(best test {results['accuracy_best_test']:.4f} at step {results['step_best_test']}, "
            f"test at best valid {results['accuracy_at_best_valid']:.4f} at step {results['step_at_best_valid']}); "
            f"always answering the most common training label scores "
            f"{results['majority_label_test_accuracy']:.4f}. Model: {self.run_dir / 'model'}; "
            f"TensorBoard: tensorboard --logdir {self.run_dir / 'tb'}")
        self.close()
        return results

    def close(self) -> None:
        if self.compile_clock is not None:
            self.compile_clock.close()
        self.telemetry.close()
        shutdown(self.engine.ds)

    def _write(self, name: str, payload: dict) -> None:
        """status.json and results.json: what a sweep or a requeued job trusts, so atomic and durable."""
        if self.env.is_main:
            write_json_atomic(self.run_dir / name, payload, durable=True)
