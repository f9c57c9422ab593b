"""The flags of `cotmi teach`: defaults, help and ranges in one dataclass, checked with the standard
library only, so a bad flag costs a fraction of a second and writes nothing."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cotmi_ds.data import TASK_KINDS
from cotmi_ds.errors import UsageError

APIS = ("chat", "completion")
BACKENDS = ("openai", "transformers")
FILTERS = ("drop_wrong", "gold_label", "keep_all")
SPLITS = ("train", "valid", "test")


def _opt(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum})


@dataclass(frozen=True)
class TeachOptions:
    dataset: str = _opt("", "a benchmark (cqa, svamp, esnli, anli1; read from --data_root) or your data: a "
                        ".jsonl/.json/.csv/.parquet file, a folder of split files, or a save_to_disk folder")
    out: str = _opt("", "output folder: train/valid/test.jsonl, manifest.json and the answer cache "
                    "(cache.jsonl); the same command with the same --out resumes")
    data_root: str | None = _opt(None, "the benchmarks' folder in DSS's layout (default ./datasets, then "
                                 "$COTMI_DATA_ROOT)")
    task: str | None = _opt(None, "how answers are read and checked: choice, exact or numeric (the benchmarks "
                            "know theirs; your data: this, or the task in its manifest.json)", TASK_KINDS)
    template: str | None = _opt(None, "a shipped template name or a template file (YAML/JSON); default: the "
                                "benchmark's few-shot set, or the shipped template of --task")
    api: str = _opt("chat", "chat (messages) or completion (one prompt string)", APIS)
    backend: str = _opt("openai", "openai: OpenAI-compatible endpoints (vllm serve, SGLang, TGI, llama.cpp, "
                        "transformers serve, a hosted API); transformers: the model loaded in this process",
                        BACKENDS)
    base_url: str = _opt("http://localhost:8000/v1", "the endpoint's URL, or several separated by commas "
                         "(data-parallel teachers serving the same model)")
    model: str | None = _opt(None, "the served model's name (default: the one model the endpoint lists); "
                             "--backend transformers: a model folder or hub name")
    api_key_env: str | None = _opt(None, "the environment variable that holds the API key (the key itself is "
                                   "never written anywhere); local servers need none")
    concurrency: int = _opt(32, "requests in flight per endpoint", minimum=1)
    batch_size: int = _opt(8, "prompts per generate() call (--backend transformers)", minimum=1)
    max_tokens: int = _opt(256, "most tokens per completion", minimum=1)
    temperature: float = _opt(0.0, "sampling temperature (0: greedy)", minimum=0.0)
    top_p: float = _opt(1.0, "nucleus sampling mass", minimum=0.0)
    samples: int = _opt(1, "completions per example (needs --temperature > 0 for more than one); the kept "
                        "rationale agrees with gold, or with the majority answer where there is no gold",
                        minimum=1)
    seed: int = _opt(0, "sampling seed: sample i of each example asks with seed + i", minimum=0)
    filter: str = _opt("drop_wrong", "which training rows are kept: drop_wrong (the teacher's answer agrees "
                       "with gold), gold_label (every row with a rationale, trained on the gold label), "
                       "keep_all (every row, also those whose completion gave no rationale)", FILTERS)
    splits: str | None = _opt(None, "the splits to annotate, e.g. train,test (default: every split found)")
    limit: int = _opt(0, "annotate only the first N rows of each split (0: all): a trial run", minimum=0)
    timeout_s: float = _opt(600.0, "seconds one request may take before it is retried", minimum=1.0)
    max_retries: int = _opt(6, "retries of a failed request (connection errors, timeouts, HTTP 408/409/429/5xx; "
                            "Retry-After is honoured), with exponential back-off", minimum=0)

    @property
    def base_urls(self) -> list[str]:
        return [u.strip() for u in self.base_url.split(",") if u.strip()]

    @property
    def split_names(self) -> tuple[str, ...] | None:
        return None if self.splits is None else tuple(s.strip() for s in self.splits.split(",") if s.strip())


_FIELDS = {f.name: f for f in fields(TeachOptions)}


def describe_teach_flags() -> str:
    """One line per flag, for `cotmi teach --help`."""
    out = []
    for name, f in _FIELDS.items():
        choices = f.metadata["choices"]
        out.append(f"  --{name} (default {f.default!r})" + (f" {{{', '.join(choices)}}}" if choices else "")
                   + f": {f.metadata['help']}")
    return "\n".join(out)


def _value(name: str, value: Any) -> Any:
    f = _FIELDS[name]
    kind = type(f.default) if f.default is not None else str
    if isinstance(value, (tuple, list)):  # Fire reads a,b as a tuple
        value = ",".join(str(v) for v in value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"--{name}: expected a whole number, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"--{name}: expected a number, got {value!r}")
        value = float(value)
    else:
        value = str(value)
    if f.metadata["min"] is not None and value < f.metadata["min"]:
        raise UsageError(f"--{name}: must be at least {f.metadata['min']:g}, got {value!r}")
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise UsageError(f"--{name} {value}: not one of {', '.join(f.metadata['choices'])}")
    return value


def parse_teach_flags(flags: dict[str, Any], environ: dict[str, str] | None = None) -> TeachOptions:
    """Flags as Fire passes them -> checked options. Everything the flags alone decide is checked
    here; files are checked by the job before it writes anything."""
    for key in flags:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            raise UsageError(f"unknown flag --{key} for `cotmi teach`" + (f" (did you mean --{close[0]}?)" if close else ""))
    opts = replace(TeachOptions(), **{k: _value(k, v) for k, v in flags.items()})
    if not opts.dataset:
        raise UsageError("--dataset is required: a benchmark name (cqa, svamp, esnli, anli1) or your data file/folder")
    if not opts.out:
        raise UsageError("--out is required: the folder the annotated splits and the manifest go to")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise UsageError(f"--out {opts.out}: exists and is not a folder")
    if opts.samples > 1 and opts.temperature == 0:
        raise UsageError(f"--samples {opts.samples} with --temperature 0 asks the same greedy question "
                         f"{opts.samples} times; set --temperature (e.g. 0.7)")
    if opts.top_p > 1:
        raise UsageError(f"--top_p: must be at most 1, got {opts.top_p!r}")
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
