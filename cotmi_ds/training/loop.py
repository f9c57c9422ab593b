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
from cotmi_ds.config import TrainConfig, describe_batch, describe_lr, describe_settings, resolve_global_batch
from cotmi_ds.console import quiet_libraries
from cotmi_ds.data.batches import BatchSource
from cotmi_ds.data.datasets import check_data_files
from cotmi_ds.data.collate import row_lengths
from cotmi_ds.data.pipeline import prepare_data
from cotmi_ds.data.sampler import BatchOrder
from cotmi_ds.distributed import barrier, init_distributed, numerics, shutdown
from cotmi_ds.ds_configs import choose_ds_config
from cotmi_ds.ds_configs.precision import resolve_precision
from cotmi_ds.errors import UsageError
from cotmi_ds.evaluation.generate import evaluate_split, evaluation_settings, majority_baseline
from cotmi_ds.evaluation.results import run_metadata, select_metrics
from cotmi_ds.files import disk_full, write_json_atomic, write_jsonl_atomic, write_problem
from cotmi_ds.model.compiled import CompileClock, compile_refusal, eager_blocks
from cotmi_ds.model.hub import fetch_once_per_node
from cotmi_ds.model.student import DistillModel, build_student, student_config
from cotmi_ds.modes import mode_of
from cotmi_ds.training.engine import TrainEngine, create_engine, drop_priming_step
from cotmi_ds.training.faults import NO_FAULTS, Faults
from cotmi_ds.training.run_dir import choose_run_dir
from cotmi_ds.training.state import TrainState
from cotmi_ds.training.stopping import (EXIT_NO_SPACE, EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteGuard,
                                        PhaseAbandoned, RunStopped, StopRequest)
from cotmi_ds.training.telemetry import Telemetry


def run_training(cfg: TrainConfig, faults: Faults = NO_FAULTS, stop_request: StopRequest | None = None) -> dict:
    return Trainer(cfg, faults, stop_request).train()


def micro_step(engine: TrainEngine, guard: NonFiniteGuard, timed, batch: dict, step: int, position: int,
               weight: float = 1.0, adjust=None):
    """One micro-batch's forward, backward and optimizer call, queued without waiting for the device
    (`cotmi bench step` times this same function): (the loss parts, a device flag whether the loss
    was finite, whether the optimizer call skipped an update). ``weight``: the rows that count in a
    partial batch (sampler.py); ``adjust``: a fault-injection point on the loss parts."""
    with timed("forward"):
        parts = engine.ds(batch)
    if adjust is not None:
        parts = adjust(parts)
    loss, finite = guard.screen(parts["total"], step, position)
    with timed("backward"):
        engine.backward(loss * weight)
    with timed("optimizer"):
        skipped = engine.step()
    return parts, finite, skipped


class Trainer:
    def __init__(self, cfg: TrainConfig, faults: Faults = NO_FAULTS, stop_request: StopRequest | None = None):
        """``stop_request``: one made before the heavy imports (cli.py), so that a signal during them
        is not lost; from here on SIGTERM/SIGUSR1 end the run cleanly."""
        cfg = check_data_files(cfg)  # the config as the run records it (your own data's task resolved)
        self.cfg, self.faults = cfg, faults
        self.stop_request = stop_request or StopRequest()
        self.env = env = init_distributed(cfg.dist_timeout_s, cfg.flush_subnormals)
        self.precision = resolve_precision(cfg, env.device)  # probes this rank's own GPU
        self.numerics = numerics(env)
        quiet_libraries(env)
        self.cfg = cfg = resolve_global_batch(cfg, env.world_size)  # saved and used as resolved
        self.run = choose_run_dir(cfg, env)  # reads only; rank 0 may hold the directory's lock from here
        self.run_dir = self.run.path
        try:
            self._set_up()
        except BaseException:
            self.run.release()  # nothing was written: the directory (and a run it held) is as it was
            raise

    def _set_up(self) -> None:
        """Every check that can fail before training, the engine built and the checkpoint loaded;
        only then the run directory is claimed (created, or its old run replaced) and written."""
        cfg, env, precision, resume_from = self.cfg, self.env, self.precision, self.run.resume
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
        self.engine = create_engine(DistillModel(t5, cfg), ds_config, cfg, env.world_size)
        realigned = False  # a checkpoint whose AdamW counted bf16 ZeRO-0's priming step
        if resumed is not None:
            self.state.load_state_dict(ckpt.load(self.engine.ds, resumed, env, universal, cfg.seed), resumed.step,
                                       f"--resume {resumed.path}")
            realigned = drop_priming_step(self.engine.ds.optimizer, self.state.step - self.state.skipped_updates)

        self.config_yaml = cfg.to_yaml()
        self.run.claim(env, self.config_yaml, ds_config, data.tokenizer)  # the run starts here
        self._describe(identity, chosen.stage, resumed, universal, realigned)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, env, cfg.keep_last, {
            "world_size": env.world_size, "zero_stage": chosen.stage, "precision": precision,
            "model": {"name": cfg.model, **identity}, "config": cfg.to_dict()},
            after_write=self.faults.checkpoint_written)
        self.guard = NonFiniteGuard(cfg.max_bad_steps, env)
        self.batches = BatchSource(data.splits["train"], order, data.tokenizer.pad_token_id, mode_of(cfg),
                                   t5.config, env.device)
        self.telemetry = Telemetry(self.run_dir, env, start_step=self.state.step, max_steps=cfg.max_steps,
                                   log_every=cfg.log_every, config_yaml=self.config_yaml, hparams=cfg.to_dict(),
                                   precision=precision)
        self.eval_settings = evaluation_settings(cfg)
        self.saved = None  # the checkpoint this launch saved last

    def _describe(self, identity: dict, stage: int, resumed, universal: bool, realigned: bool) -> None:
        cfg, env, data = self.cfg, self.env, self.data
        if not env.is_main:
            return
        changed = describe_settings(cfg)
        print(f"config: the defaults{', with ' + changed if changed else ''} (every setting: "
              f"{self.run_dir / 'config.yaml'})", flush=True)
        lr_line, lr_warning = describe_lr(cfg)
        print(lr_line, flush=True)
        if lr_warning:
            print(f"warning: {lr_warning}", flush=True)
        print(f"batch: {describe_batch(cfg, env.world_size)}", flush=True)
        print(f"student: {cfg.model} ({identity['parameters']:,} parameters), {self.precision}, "
              f"ZeRO-{stage}, {env.world_size} rank(s) on {env.device.type}; "
              f"train/valid/test = {', '.join(str(len(s)) for s in data.splits.values())} examples",
              flush=True)
        repeats = ("the figures repeat exactly with these; another CPU or thread count rounds differently"
                   if env.device.type == "cpu" else "some GPU kernels sum in no fixed order: reruns differ slightly")
        print(f"numerics: seed {cfg.seed}, {', '.join(f'{k} {v}' for k, v in self.numerics.items())} ({repeats})",
              flush=True)
        print(f"{data.summary.describe()}\n  prepared in {data.seconds:.1f} s (tokenized-data cache: "
              f"{data.cache_status})", flush=True)
        if resumed is not None:
            via = " (through a universal checkpoint: the world size changed)" if universal else ""
            print(f"resumed from {resumed.path} at step {resumed.step}{via}", flush=True)
            if realigned:
                print("note: this checkpoint's AdamW counted one step before training began (bf16 at "
                      "ZeRO-0, before that step was undone); its step count is set back to the updates "
                      "applied", flush=True)

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        """The run; a disk that fills up anywhere in it (checkpoints, predictions, results, the
        export) ends it in one line naming the last good checkpoint (exit 2)."""
        try:
            return self._train()
        except (RunStopped, UsageError):
            raise
        except Exception as e:  # noqa: BLE001 - libraries report a full disk as all kinds of exceptions
            if not disk_full(e, self.run_dir):
                raise
            # Only rank 0 writes outside checkpoints: the others learn of it when it leaves.
            self.stop_no_space(self.state.step, write_problem(e, self.run_dir) if isinstance(e, OSError)
                               else f"no space left on {self.run_dir}", all_ranks=False)

    def _train(self) -> dict:
        cfg = self.cfg
        self.state.start_clock()
        if self.evaluation_due(self.state.step):  # abandoned when the run stopped (or it stopped just before)
            self.evaluate(self.state.step)
        for step in range(self.state.step + 1, cfg.max_steps + 1):
            self.faults.step_begins(self.env.rank, step)
            self.train_step(step)
            # every rank got (or was told of) SIGTERM/SIGUSR1
            if self.stop_request.due(step, self.env, self.sync_step(step)) and self.stop_request.agreed(self.env):
                self.stop_preempted(step)
            if self.evaluation_due(step):
                self.evaluate(step, limit=cfg.eval_max_examples)
            if self.save_due(step):
                self.save(step)
        self.evaluate(cfg.max_steps)
        return self.finish()

    def train_step(self, step: int) -> None:
        """One optimizer step, queued without waiting for the device: the loss's finiteness, the
        update's skip and the logged values stay on it until a sync step (``settle``)."""
        deepspeed_engine, telemetry = self.engine.ds, self.telemetry
        deepspeed_engine.train()  # dropout on, as the release's Trainer does every step (evaluation switches it off)
        for _ in range(self.cfg.grad_accum):
            with telemetry.timed("data_wait"):
                micro = self.batches.next()
            parts, finite, skipped = micro_step(  # the last micro-batch's `skipped` is the step's
                self.engine, self.guard, telemetry.timed, micro.batch, step, micro.position, micro.weight,
                adjust=lambda parts: self.faults.loss(parts, self.env.rank, micro.position))
            telemetry.record_micro_step(parts, samples=micro.samples, tokens=micro.tokens, flops=micro.flops,
                                        weight=micro.weight, finite=finite)
        self.state.step = step
        self.guard.update_done(step, skipped)
        if self.sync_step(step):
            self.settle()
        telemetry.end_step(step, lr=deepspeed_engine.get_lr()[0],
                           grad_norm=deepspeed_engine.get_global_grad_norm(),
                           skipped_micro_batches=self.state.skipped_micro_batches,
                           skipped_updates=self.state.skipped_updates)
        if self.compile_clock is not None and (seconds := self.compile_clock.since_report()) > 0:
            telemetry.print(f"step {step}: torch.compile compiled the blocks for {seconds:.1f} s "
                            f"({self.compile_clock.seconds:.1f} s in this launch)")

    def sync_step(self, step: int) -> bool:
        """The steps after which the host reads what the device holds: log, evaluation and save steps."""
        return (step % self.cfg.log_every == 0 or step == self.cfg.max_steps or self.evaluation_due(step)
                or self.save_due(step))

    def save_due(self, step: int) -> bool:
        return bool(self.cfg.save_every and step % self.cfg.save_every == 0) or step == self.cfg.max_steps

    def settle(self) -> None:
        """The skipped updates since the last sync step (NonFiniteGuard): counted, each said in one
        line, and --max_bad_steps of them in a row end the run (exit 3, nothing saved)."""
        for skip in self.guard.settle():
            self.state.skipped_updates += 1
            self.state.skipped_micro_batches += len(skip.nonfinite_losses)
            cause = (f"non-finite loss in micro-batch {', '.join(map(str, skip.nonfinite_losses))}"
                     if skip.nonfinite_losses else "non-finite gradients")
            self.telemetry.print(f"step {skip.step}: {cause} (on at least one rank); the update was skipped, "
                                 f"{skip.in_a_row} in a row, {self.state.skipped_updates} in total")
            if skip.in_a_row >= self.guard.max_in_a_row:
                self.stop_nonfinite(skip.step, f"{skip.in_a_row} consecutive optimizer updates were skipped "
                                               f"(non-finite loss or gradients), up to step {skip.step} "
                                               f"(--max_bad_steps {self.cfg.max_bad_steps})")

    def evaluation_due(self, step: int) -> bool:
        """An evaluation every --eval_every steps (the one at max_steps comes after the loop), unless
        this step's is already recorded."""
        every = self.cfg.eval_every
        return (0 < step < self.cfg.max_steps and bool(every) and step % every == 0
                and all(e["step"] != step for e in self.state.evaluations))

    def evaluate(self, step: int, limit: int = 0) -> None:
        """Both splits, or with ``limit`` their first ``limit`` examples (evaluations during training).
        A stop request ends the generation in progress and, agreed between two generation batches,
        abandons the evaluation (saved, exit 75; it is run again after the resume)."""
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
                                        stop=lambda: self.stop_request.received, **self.eval_settings)
                if self.env.is_main:
                    write_jsonl_atomic(self.run_dir / "predictions" / f"step{step:06d}-{split}.jsonl",
                                       result.records)
                self.telemetry.log_eval(step, split, result.metrics, seconds=time.perf_counter() - t)
                record[split] = result.metrics
            self.telemetry.log_eval_time(step, time.perf_counter() - started)
        self.state.evaluations.append(record)

    def save(self, step: int):
        """Publishes step's checkpoint, or ends the run (exit 3) when its weights are not finite or
        too many updates in a row were skipped."""
        self.settle()  # the checkpoint counts every skip up to its step
        with self.telemetry.paused():
            try:
                self.saved = self.checkpointer.save(self.engine.ds, step, self.engine.t5, self.data.tokenizer,
                                                    self.state.state_dict())
                return self.saved
            except ckpt.NonFiniteWeights as e:
                self.stop_nonfinite(step, f"{e} (the optimizer diverged: lower --lr or raise --warmup_steps)")
            except ckpt.NoSpace as e:
                self.stop_no_space(step, f"{e}: checkpoint {tag(step)} was not saved", all_ranks=True)

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

    def stop_no_space(self, step: int, problem: str, all_ranks: bool):
        message = (f"{problem}; last good checkpoint: {self.checkpointer.latest() or 'none'}; free some space, "
                   "then continue with --resume auto")
        if all_ranks:
            self.end_early(step, "no_space", EXIT_NO_SPACE, message)
        self._write_status(step, "no_space", EXIT_NO_SPACE, message)
        self.run.release()
        raise RunStopped(message, EXIT_NO_SPACE, show=self.env.is_main)

    def end_early(self, step: int, status: str, code: int, message: str):
        self._write_status(step, status, code, message)
        # No rank leaves before status.json exists: a launcher or srun --kill-on-bad-exit tears the
        # others down as soon as one rank exits non-zero.
        barrier(self.env)
        self.close()
        raise RunStopped(message, code, show=self.env.is_main)

    def _write_status(self, step: int, status: str, code: int, message: str) -> None:
        try:
            self._write("status.json", {"status": status, "step": step, "exit_code": code, "message": message})
        except OSError as e:
            if not disk_full(e, self.run_dir):
                raise  # on a full disk the exit code and the message still say what happened

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
            "precision": self.precision, "zero_stage": self.engine.stage, "numerics": self.numerics,
            "train_seconds": round(train_seconds, 1),
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
        self.run.release()

    def _write(self, name: str, payload: dict) -> None:
        """status.json and results.json: what a sweep or a requeued job trusts, so atomic and durable."""
        if self.env.is_main:
            write_json_atomic(self.run_dir / name, payload, durable=True)
