"""`cotmi teach`: a teacher LLM's chain of thought for a dataset, checked against gold and written in
the layout `cotmi train --dataset PATH` reads (docs/teacher.md).

    options.py   the flags, checked with the standard library only (before any heavy import)
    prompts.py   templates (chat or completion) and the shipped few-shot sets (prompts/*.yaml)
    sources.py   the rows to annotate: a benchmark's gold rows or the user's own files
    answers.py   the teacher's answer in a completion, per task kind, and agreement with gold
    filters.py   which rationale of each example trains, and why the others were dropped
    cache.py     the append-only answer cache that makes a job resumable
    clients.py   teachers: OpenAI-compatible endpoints (the `openai` client), or in-process transformers
    job.py       the resumable job: requests, progress, signals, the published splits and manifest
"""
