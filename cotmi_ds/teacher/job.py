"""The resumable job behind `cotmi teach`.

    check    the data, the template and the teachers (GET /models), before anything is written
    ask      every (row, sample) whose answer is not in OUT/cache.jsonl, ``--concurrency`` at a time per
             teacher, each answer appended to the cache as it arrives
    publish  parse, check against gold, filter; OUT/<split>.jsonl then OUT/manifest.json, each atomically

A request's cache key is the hash of what decides its completion: the rendered prompt, the model,
the API and the decoding settings, and the sample's index. The same command run again (after a
crash, `kill -9`, a stopped server or SIGTERM) asks only what is missing.

Exit codes: 0 published; 2 bad input (nothing written); 75 (stopping.py's "rerun to continue")
stopped by SIGTERM/SIGINT, or no teacher could answer after the client's retries: what was
answered is in the cache, and the same command continues.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotmi_ds import __version__
from cotmi_ds.errors import UsageError
from cotmi_ds.files import write_json_atomic, write_jsonl_atomic
from cotmi_ds.teacher import filters
from cotmi_ds.teacher.cache import AnswerCache
from cotmi_ds.teacher.clients import Answer, Rejected, Request, Unavailable, decoding, teachers
from cotmi_ds.teacher.options import SPLITS, TeachOptions
from cotmi_ds.teacher.prompts import Template, load_template, settings_sha256
from cotmi_ds.teacher.sources import Source, load_source
from cotmi_ds.training.stopping import EXIT_PREEMPTED, RunStopped

CACHE = "cache.jsonl"
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Plan:
    opts: TeachOptions
    source: Source
    template: Template
    out: Path
    requests: list[Request]            # one per (split, row, sample), in order
    settings: dict[str, Any]

    @property
    def settings_sha256(self) -> str:
        return settings_sha256({**self.settings, "template": self.template.sha256})


def prepare(opts: TeachOptions) -> tuple[Source, Template]:
    """The data and the template, checked against each other (no network, nothing written)."""
    source = load_source(opts.dataset, opts.data_root, opts.task)
    wanted = opts.split_names or tuple(source.splits)
    missing = [s for s in wanted if s not in source.splits]
    if missing:
        raise UsageError(f"--splits: {source.path} has no {missing[0]} split (it has {', '.join(source.splits)})")
    source.splits = {s: source.splits[s][:opts.limit] if opts.limit else source.splits[s]
                     for s in SPLITS if s in source.splits and s in wanted}
    template = load_template(opts.template or source.template)
    if template.task is not None and template.task != source.answering.task:
        raise UsageError(f"{template.where}: written for task {template.task}, but the answers of {source.path} "
                         f"are read as {source.answering.task}")
    template.check_fields(source.fields, source.path)
    out = Path(opts.out).resolve()
    for split in source.splits:
        if (out / f"{split}.jsonl").resolve() in {p.resolve() for p in source.files}:
            raise UsageError(f"--out {opts.out}: would overwrite the input file {out / f'{split}.jsonl'}")
    return source, template


def plan_requests(opts: TeachOptions, source: Source, template: Template, model: str) -> Plan:
    settings = {"model": model, "api": opts.api, **decoding(opts, template.stop)}
    if opts.temperature > 0:
        settings["seed"] = opts.seed
    key_settings = json.dumps(settings, sort_keys=True)
    requests = []
    for split, rows in source.splits.items():
        for i, row in enumerate(rows):
            body = template.render(row.fields, opts.api, row.where)
            prompt = json.dumps(body, ensure_ascii=False)
            for sample in range(opts.samples):
                key = hashlib.sha256(f"{key_settings}\n{prompt}\n{sample}".encode()).hexdigest()
                requests.append(Request(key, split, i, sample, body))
    return Plan(opts, source, template, Path(opts.out), requests, settings)


def run(opts: TeachOptions) -> None:
    source, template = prepare(opts)
    plan, answers = asyncio.run(_teach(opts, source, template))
    publish(plan, answers)


async def _teach(opts: TeachOptions, source: Source, template: Template) -> tuple[Plan, dict[str, dict]]:
    pool = teachers(opts, template.stop)
    cache = None
    try:
        models = {t.url: await t.check() for t in pool}
        if len(set(models.values())) > 1:
            raise UsageError(f"--base_url: the endpoints serve different models ({models}); pass --model")
        plan = plan_requests(opts, source, template, next(iter(models.values())))
        cache = AnswerCache(plan.out / CACHE)
        answers = cache.read()
        if cache.torn:
            print(f"{cache.path}: dropped a torn last line (the job was killed while writing it)", flush=True)
        keys = {r.key for r in plan.requests}
        pending = list({r.key: r for r in plan.requests if r.key not in answers}.values())
        print(f"teach {source.path}: {len(plan.requests):,} requests ("
              + ", ".join(f"{s} {len(r):,} rows" for s, r in source.splits.items())
              + (f", {opts.samples} samples each" if opts.samples > 1 else "")
              + f") to {', '.join(models)} as {plan.settings['model']}; {len(keys) - len(pending):,} already "
              f"answered in {cache.path}", flush=True)
        if pending:
            state = await _ask(pool, pending, cache.open(), answers, len(keys))
            answered = sum(k in answers for k in keys)
            if answered < len(keys):
                why = (f"stopped by {state.stopped}" if state.stopped else
                       "no teacher could answer (" + "; ".join(state.down.values()) + ")")
                raise RunStopped(f"{why}: {answered:,} of {len(keys):,} requests answered and cached in "
                                 f"{cache.path}; run the same command again to continue", EXIT_PREEMPTED)
        return plan, answers
    finally:
        if cache is not None:
            cache.close()
        for t in pool:
            await t.close()


class _State:
    def __init__(self, pending: list[Request]):
        self.queue = collections.deque(pending)
        self.stopped: str | None = None
        self.down: dict[str, str] = {}
        self.in_flight = 0
        self.changed = asyncio.Event()  # a batch finished or came back


async def _ask(pool, pending: list[Request], cache: AnswerCache, answers: dict, total: int) -> _State:
    state = _State(pending)
    progress = Progress(total, total - len(pending))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (setattr(state, "stopped", state.stopped or s.name), stop.set()))

    async def worker(teacher) -> None:
        while teacher.url not in state.down and not stop.is_set():
            if not state.queue:
                if not state.in_flight:
                    return
                # Another teacher's requests may come back if it goes down: wait for news.
                state.changed.clear()
                await state.changed.wait()
                continue
            batch = [state.queue.popleft() for _ in range(min(teacher.batch, len(state.queue)))]
            state.in_flight += len(batch)
            try:
                got: list[Answer] | str = await teacher.answer(batch)
            except Rejected as e:
                got = str(e)
            except Unavailable as e:
                state.queue.extendleft(reversed(batch))
                state.down[teacher.url] = str(e)
                return
            finally:
                state.in_flight -= len(batch)
                state.changed.set()
            for request, answer in zip(batch, got if isinstance(got, list) else [None] * len(batch)):
                record = {"key": request.key, "split": request.split, "row": request.row, "sample": request.sample}
                if answer is None:
                    record["error"] = got
                else:
                    record.update(text=answer.text, finish_reason=answer.finish_reason,
                                  prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)
                cache.append(record)
                answers[request.key] = record
                progress.update(answer.completion_tokens if answer else 0)

    # Slots interleaved over the teachers: the first requests go to every teacher, not to the first.
    tasks = [asyncio.create_task(worker(t)) for slot in range(max(t.slots for t in pool)) for t in pool
             if slot < t.slots]
    stopper = asyncio.create_task(stop.wait())
    try:
        pending_tasks = set(tasks)
        while pending_tasks and not stop.is_set():
            done, pending_tasks = await asyncio.wait(pending_tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            pending_tasks.discard(stopper)
            for task in done - {stopper}:
                task.result()  # a UsageError from a worker (a refused key, ...) ends the job here
    finally:
        for task in tasks + [stopper]:
            task.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        progress.close()
    return state


class Progress:
    """A tqdm bar (requests, req/s, completion tok/s, ETA) where a person watches a terminal, else a
    line every 10 seconds with the same figures."""

    def __init__(self, total: int, done: int):
        from cotmi_ds.console import terminal_width_known

        self.total, self.done, self.tokens, self.start = total, done, 0, time.monotonic()
        self.asked, self.last = 0, self.start
        self.bar = None
        if terminal_width_known():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="req", dynamic_ncols=True, desc="teach")

    def update(self, tokens: int) -> None:
        self.done, self.asked, self.tokens = self.done + 1, self.asked + 1, self.tokens + tokens
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
            if now - self.last > 0.5:
                self.bar.set_postfix_str(f"{self.tokens / (now - self.start):,.0f} tok/s", refresh=False)
                self.last = now
        elif now - self.last >= 10 or self.done == self.total:
            self.last = now
            rate = self.asked / (now - self.start)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"teach: {self.done:,}/{self.total:,} requests ({self.done / self.total:.0%}), {rate:.1f} req/s, "
                  f"{self.tokens / (now - self.start):,.0f} tok/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def publish(plan: Plan, answers: dict[str, dict]) -> None:
    """Parse, check, filter; write the splits, then the manifest (present = complete)."""
    opts, source, answering = plan.opts, plan.source, plan.source.answering
    by_row: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for r in plan.requests:
        by_row[(r.split, r.row)].append(answers[r.key])
    summaries, outputs = {}, {}
    for split, rows in source.splits.items():
        count = collections.Counter()
        dropped = collections.Counter()
        kept = []
        for i, row in enumerate(rows):
            records = by_row[(split, i)]
            texts = [rec["text"] for rec in records if "text" in rec]
            count["rejected"] += sum("error" in rec for rec in records)
            count["empty"] += sum(not t.strip() for t in texts)
            count["cut_at_max_tokens"] += sum(rec.get("finish_reason") == "length" for rec in records)
            samples = [answering.parse(t, row.fields) for t in texts]
            count["unparsable"] += sum(s.fallback for s in samples)
            gold = row.fields.get("label")
            outcome = filters.choose(samples, gold, answering, opts.filter if split == "train" else "keep_all")
            count["with_gold"] += gold is not None
            count["correct"] += bool(outcome.correct)
            count["agreeing_samples"] += outcome.agreeing_samples if gold is not None else 0
            count["samples_with_gold"] += len(samples) if gold is not None else 0
            if split == "train" and outcome.drop:
                dropped[outcome.drop] += 1
                continue
            out = {"input": row.input, "label": gold if gold is not None else outcome.answer,
                   "rationale": outcome.rationale, "llm_label": outcome.answer}
            if isinstance(row.fields.get("choices"), list):
                out["choices"] = row.fields["choices"]
            kept.append(out)
        outputs[split] = kept
        summaries[split] = _summary(len(rows), count, dropped, len(kept), source.excluded.get(split, 0), opts.samples)
    for split, rows in outputs.items():
        write_jsonl_atomic(plan.out / f"{split}.jsonl", rows)
    write_json_atomic(plan.out / MANIFEST, _manifest(plan, summaries), durable=True)
    for split, s in summaries.items():
        print(describe(split, s), flush=True)
    print(f"wrote {', '.join(str(plan.out / f'{s}.jsonl') for s in outputs)} and {plan.out / MANIFEST}", flush=True)


def _summary(rows: int, count: collections.Counter, dropped: collections.Counter, kept: int, excluded: int,
             samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows, "kept": kept, "dropped": dict(dropped)}
    if excluded:
        out["excluded_no_gold_label"] = excluded
    if count["with_gold"]:
        out["teacher_accuracy"] = count["correct"] / count["with_gold"]
        out["teacher_correct"] = count["correct"]
        out["rows_with_gold"] = count["with_gold"]
        if samples > 1:
            out["sample_accuracy"] = count["agreeing_samples"] / max(count["samples_with_gold"], 1)
    for key in ("unparsable", "empty", "rejected", "cut_at_max_tokens"):
        out[key] = count[key]
    return out


def describe(split: str, s: dict[str, Any]) -> str:
    acc = (f"teacher accuracy {s['teacher_accuracy']:.2%} ({s['teacher_correct']:,}/{s['rows_with_gold']:,})"
           if "teacher_accuracy" in s else "no gold labels (labels are the teacher's majority answers)")
    why = ", ".join(f"{n:,} ({reason})" for reason, n in s["dropped"].items())
    return (f"{split}: {s['rows']:,} rows, {acc}; kept {s['kept']:,}" + (f", dropped {why}" if why else "")
            + f"; completions unparsable {s['unparsable']:,}, empty {s['empty']:,}, rejected {s['rejected']:,}, "
              f"cut at --max_tokens {s['cut_at_max_tokens']:,}")


def _manifest(plan: Plan, summaries: dict[str, dict]) -> dict[str, Any]:
    import openai

    opts = plan.opts
    return {
        "format": FORMAT,
        "task": plan.source.answering.task,
        "name": plan.source.name,
        "dataset": plan.source.path,
        "teacher": {"backend": opts.backend, "model": plan.settings["model"],
                    "endpoints": opts.base_urls if opts.backend == "openai" else [],
                    "api": opts.api},
        "prompt": {"template": plan.template.where, "template_sha256": plan.template.sha256},
        "decoding": {k: v for k, v in plan.settings.items() if k not in ("model", "api")},
        "samples": opts.samples,
        "settings_sha256": plan.settings_sha256,
        "filter": opts.filter,
        "filtered_splits": ["train"],
        "splits": summaries,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"cotmi_ds": __version__, "openai": openai.__version__},
    }
