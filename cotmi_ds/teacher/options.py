"""The flags of `cotmi teach`: one dataclass parsed by cotmi_ds/flags.py, as every command's flags are
(standard library only, so a bad flag costs a fraction of a second and writes nothing)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotmi_ds.data import TASK_KINDS
from cotmi_ds.errors import UsageError
from cotmi_ds.flags import describe_flags, flag, parse_flags

APIS = ("chat", "completion")
BACKENDS = ("openai", "transformers")
FILTERS = ("drop_wrong", "gold_label", "keep_all")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class TeachOptions:
    dataset: str = flag("", "a benchmark (cqa, svamp, esnli, anli1; read from --data_root) or your data: a "
                        ".jsonl/.json/.csv/.parquet file, a folder of split files, or a save_to_disk folder",
                        paths=True)
    out: str = flag("", "output folder: train/valid/test.jsonl, manifest.json and the answer cache "
                    "(cache.jsonl); the same command with the same --out resumes", paths=True)
    data_root: str | None = flag(None, "the benchmarks' folder in DSS's layout (default ./datasets, then "
                                 "$COTMI_DATA_ROOT)", paths=True)
    task: str | None = flag(None, "how answers are read and checked: choice, exact or numeric (the benchmarks "
                            "know theirs; your data: this, or the task in its manifest.json)", TASK_KINDS)
    template: str | None = flag(None, "a shipped template name or a template file (YAML/JSON); default: the "
                                "benchmark's few-shot set, or the shipped template of --task", paths=True)
    api: str = flag("chat", "chat (messages) or completion (one prompt string)", APIS)
    backend: str = flag("openai", "openai: OpenAI-compatible endpoints (vllm serve, SGLang, TGI, llama.cpp, "
                        "transformers serve, a hosted API); transformers: the model loaded in this process",
                        BACKENDS)
    base_url: str = flag("http://localhost:8000/v1", "the endpoint's URL, or several separated by commas "
                         "(data-parallel teachers serving the same model)")
    model: str | None = flag(None, "the served model's name (default: the one model the endpoint lists); "
                             "--backend transformers: a model folder or hub name")
    api_key_env: str | None = flag(None, "the environment variable that holds the API key (the key itself is "
                                   "never written anywhere); local servers need none")
    concurrency: int = flag(32, "requests in flight per endpoint", range=">= 1")
    batch_size: int = flag(8, "prompts per generate() call (--backend transformers)", range=">= 1")
    max_tokens: int = flag(256, "most tokens per completion", range=">= 1")
    temperature: float = flag(0.0, "sampling temperature (0: greedy)", range=">= 0")
    top_p: float = flag(1.0, "nucleus sampling mass", range="(0, 1]")
    samples: int = flag(1, "completions per example (needs --temperature > 0 for more than one); the kept "
                        "rationale agrees with gold, or with the majority answer where there is no gold",
                        range=">= 1")
    seed: int = flag(0, "sampling seed: sample i of each example asks with seed + i", range=">= 0")
    filter: str = flag("drop_wrong", "which training rows are kept: drop_wrong (the teacher's answer agrees "
                       "with gold), gold_label (every row with a rationale, trained on the gold label), "
                       "keep_all (every row, also those whose completion gave no rationale)", FILTERS)
    splits: str | None = flag(None, "the splits to annotate, e.g. train,test (default: every split found)")
    limit: int = flag(0, "annotate only the first N rows of each split (0: all): a trial run", range=">= 0")
    timeout_s: float = flag(600.0, "seconds one request may take before it is retried", range=">= 1")
    max_retries: int = flag(6, "retries of a failed request (connection errors, timeouts, HTTP 408/409/429/5xx; "
                            "Retry-After is honoured), with exponential back-off", range=">= 0")

    @property
    def base_urls(self) -> list[str]:
        return [u.strip() for u in self.base_url.split(",") if u.strip()]

    @property
    def split_names(self) -> tuple[str, ...] | None:
        return None if self.splits is None else tuple(s.strip() for s in self.splits.split(",") if s.strip())


def describe_teach_flags() -> str:
    """One line per flag, for `cotmi teach --help`."""
    return describe_flags(TeachOptions)


def parse_teach_flags(flags: dict[str, Any], environ: dict[str, str] | None = None) -> TeachOptions:
    """Flags as Fire passes them -> checked options. Everything the flags alone decide is checked
    here; files are checked by the job before it writes anything."""
    opts = parse_flags(TeachOptions, flags, "cotmi teach")
    if not opts.dataset:
        raise UsageError("--dataset is required: a benchmark name (cqa, svamp, esnli, anli1) or your data file/folder")
    if not opts.out:
        raise UsageError("--out is required: the folder the annotated splits and the manifest go to")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise UsageError(f"--out {opts.out}: exists and is not a folder")
    if opts.samples > 1 and opts.temperature == 0:
        raise UsageError(f"--samples {opts.samples} with --temperature 0 asks the same greedy question "
                         f"{opts.samples} times; set --temperature (e.g. 0.7)")
    names = opts.split_names
    if names is not None and (not names or any(s not in SPLITS for s in names) or len(set(names)) < len(names)):
        raise UsageError(f"--splits {opts.splits}: expected distinct names among {', '.join(SPLITS)}")
    if opts.backend == "openai":
        if not opts.base_urls:
            raise UsageError("--base_url: no URL given")
        for url in opts.base_urls:
            if not url.startswith(("http://", "https://")):
                raise UsageError(f"--base_url {url}: expected an http:// or https:// URL, e.g. http://localhost:8000/v1")
        if len(set(opts.base_urls)) < len(opts.base_urls):
            raise UsageError(f"--base_url {opts.base_url}: a URL is listed twice")
    elif not opts.model:
        raise UsageError("--backend transformers needs --model: a model folder or hub name")
    if opts.api_key_env is not None:
        env = os.environ if environ is None else environ
        if not env.get(opts.api_key_env):
            raise UsageError(f"--api_key_env {opts.api_key_env}: that environment variable is not set or empty")
    return opts


def api_key(opts: TeachOptions) -> str:
    """The key, read when the client is made and held only in memory. Local servers take any."""
    return os.environ[opts.api_key_env] if opts.api_key_env else "EMPTY"
