"""The four DSS datasets (docs/method.md): read the DSS ``datasets/`` layout, parse the teacher's
completions into (rationale, label), align them one-to-one with the gold rows.

Layout under the data root::

    <name>/<name>_{train,valid,test}.json    JSON Lines, one gold row per line
    <name>/llm/{split}_CoT_{i}.json          JSON list of the teacher's raw completions, i = 0, 1, ...

Every problem with the files is a ``UsageError`` naming the file (and line, field or counts).
Only the standard library is imported here, so the checks run before any heavy import.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from cotmi_ds.data import DATASETS
from cotmi_ds.data.arith import same_value
from cotmi_ds.data.own import locate, resolve_task
from cotmi_ds.errors import UsageError, not_utf8
from cotmi_ds.files import loads_json, read_json

NLI_LABELS = ("entailment", "neutral", "contradiction")  # gold 0, 1, 2
# The T5 eos text that joins premise and hypothesis (DSS: ``tokenizer.eos_token.join(...)``).
T5_EOS = "</s>"


@dataclass(frozen=True)
class Parsed:
    rationale: str
    label: str
    fallback: bool  # the parser's failure branch ran: label is the placeholder


# --- teacher-output parsers, each exactly as DSS's ``_parse_llm_output`` -------------------------

def parse_cqa(output: str) -> Parsed:
    """Cut at the first ``Q:``; split on ``So the answer is``; the label is the text after the
    ``(x)`` choice marker, stripped, one trailing ``.`` removed; on failure ``' '``.

    DSS's PaLM parser crashes when ``So the answer is`` is missing or repeated (the released files
    never do that); its GPT parser answers ``(' ', ' ')`` there, and so does this one.
    """
    pieces = output.split("Q:")[0].rstrip().split("So the answer is")
    if len(pieces) != 2:
        return Parsed(" ", " ", True)
    rationale, rest = pieces[0].rstrip(), pieces[1]
    after_marker = re.split(r"\(.\)", rest)
    if len(after_marker) < 2 or not after_marker[1].strip():
        return Parsed(rationale, " ", True)
    label = after_marker[1].strip()
    return Parsed(rationale, label[:-1] if label.endswith(".") else label, False)


def parse_svamp(output: str) -> Parsed:
    """Cut at the first ``Q:``; split on ``The answer is`` (exactly once, else ``(' ', ' ')``);
    the label is the first ``\\(.*\\)`` match of the right part, else ``' '``."""
    pieces = output.split("Q:")[0].rstrip().split("The answer is")
    if len(pieces) != 2:
        return Parsed(" ", " ", True)
    match = re.search(r"\(.*\)", pieces[1])
    return Parsed(pieces[0].rstrip(), match.group(0) if match else " ", match is None)


def parse_esnli(output: str) -> Parsed:
    """Rationale: the text before ``Answer:``, right-stripped. Label: the text after the first
    ``Answer: `` up to ``Premise``, right-stripped; ``' '`` when there is no ``Answer: ``."""
    rationale = output.split("Answer:")[0].rstrip()
    pieces = output.split("Answer: ")
    if len(pieces) < 2:
        return Parsed(rationale, " ", True)
    return Parsed(rationale, pieces[1].split("Premise")[0].rstrip(), False)


def parse_anli(output: str) -> Parsed:
    """Cut at ``Premise:``, right-strip, split on ``So the answer is`` (exactly once); rationale
    right-stripped; label = the right part left-stripped minus its last character (the ``.``);
    on failure both ``''``."""
    pieces = output.split("Premise:")[0].rstrip().split("So the answer is")
    if len(pieces) != 2:
        return Parsed("", "", True)
    return Parsed(pieces[0].rstrip(), pieces[1].lstrip()[:-1], False)


# --- gold rows -> (input, label) ----------------------------------------------------------------

def _text(row: dict, name: str, where: str) -> str:
    if name not in row:
        raise UsageError(f"{where}: missing field {name!r}")
    if not isinstance(row[name], str):
        raise UsageError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    return row[name]


def gold_cqa(row: dict, where: str, eos: str) -> tuple[str, str] | None:
    question, answer = _text(row, "question", where), _text(row, "answer", where)
    if "choices" not in row:
        raise UsageError(f"{where}: missing field 'choices'")
    c = row["choices"]
    if not (isinstance(c, list) and len(c) == 5 and all(isinstance(x, str) for x in c)):
        raise UsageError(f"{where}: field 'choices' must be a list of 5 strings")
    x = f"{question}\nAnswer Choices:\n(a) {c[0]}\n(b) {c[1]}\n(c) {c[2]}\n(d) {c[3]}\n(e) {c[4]}"
    return x, answer


def gold_svamp(row: dict, where: str, eos: str) -> tuple[str, str] | None:
    return _text(row, "input", where), _text(row, "label", where)


def gold_nli(row: dict, where: str, eos: str) -> tuple[str, str] | None:
    """None for a row without a gold label (SNLI's -1): excluded, and counted."""
    premise, hypothesis = _text(row, "premise", where), _text(row, "hypothesis", where)
    if "label" not in row:
        raise UsageError(f"{where}: missing field 'label'")
    label = row["label"]
    if isinstance(label, bool) or label not in (0, 1, 2):
        return None
    return eos.join([premise, hypothesis]), NLI_LABELS[label]


# --- the benchmarks -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DssDataset:
    name: str
    has_valid: bool  # else DSS takes 10% of train as valid: train_test_split(test_size=0.1, seed=0)
    gold: Callable[[dict, str, str], tuple[str, str] | None]
    parse: Callable[[str], Parsed]

    @property
    def file_splits(self) -> tuple[str, ...]:
        return ("train", "valid", "test") if self.has_valid else ("train", "test")

    def gold_file(self, root: Path, split: str) -> Path:
        return root / self.name / f"{self.name}_{split}.json"

    def teacher_glob(self, root: Path, split: str) -> Path:
        return root / self.name / "llm" / f"{split}_CoT_*.json"


DSS_DATASETS: dict[str, DssDataset] = {
    "esnli": DssDataset("esnli", True, gold_nli, parse_esnli),
    "anli1": DssDataset("anli1", True, gold_nli, parse_anli),
    "cqa": DssDataset("cqa", False, gold_cqa, parse_cqa),
    "svamp": DssDataset("svamp", False, gold_svamp, parse_svamp),
}


def labels_agree(a: str, b: str, kind: str) -> bool:
    """DSS's teacher-label accuracy: exact text match, or for numeric tasks (SVAMP) equal numbers
    (through the safe parser; an equation that does not parse never agrees)."""
    return same_value(a, b) if kind == "numeric" else a == b


# --- files --------------------------------------------------------------------------------------

def teacher_files(bench: DssDataset, root: Path, split: str) -> list[Path]:
    """``{split}_CoT_0.json, _1, ...`` in index order; a gap or no file at all is an error."""
    pattern = bench.teacher_glob(root, split)
    found: dict[int, Path] = {}
    for path in pattern.parent.glob(pattern.name) if pattern.parent.is_dir() else []:
        index = path.stem.rsplit("_", 1)[-1]
        if index.isdigit():
            found[int(index)] = path
    if not found:
        raise UsageError(f"{pattern}: no teacher outputs (expected {split}_CoT_0.json, ...)")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise UsageError(f"{pattern.parent / f'{split}_CoT_{missing[0]}.json'}: no such file, but "
                         f"{split}_CoT_{max(found)}.json exists (the chunks are concatenated in order)")
    return [found[i] for i in sorted(found)]


def split_files(bench: DssDataset, root: Path, split: str) -> list[Path]:
    """The gold file and the teacher chunks of one split, checked to exist."""
    gold = bench.gold_file(root, split)
    if not gold.is_file():
        raise UsageError(f"{gold}: no such file{MISSING_HINT.get((bench.name, split), '')}")
    return [gold] + teacher_files(bench, root, split)


MISSING_HINT = {
    ("esnli", "train"): " (e-SNLI's training inputs come from HF datasets: see docs/datasets.md, 'Getting the data')",
    ("anli1", "train"): " (ANLI-R1's training inputs come from HF datasets: see docs/datasets.md, 'Getting the data')",
}


def read_json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming it."""
    try:
        rows = _json_lines(path)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: {not_utf8(e)}") from None
    if not rows:
        raise UsageError(f"{path}: empty split (0 rows)")
    return rows


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = loads_json(line, path, lineno)
            if not isinstance(obj, dict):
                raise UsageError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def read_teacher_outputs(paths: list[Path]) -> list[str]:
    outputs: list[str] = []
    for path in paths:
        chunk = read_json(path)
        if not isinstance(chunk, list):
            raise UsageError(f"{path}: expected a JSON list of completions, got {type(chunk).__name__}")
        bad = next((i for i, s in enumerate(chunk) if not isinstance(s, str)), None)
        if bad is not None:
            raise UsageError(f"{path}: item {bad} is a {type(chunk[bad]).__name__}, expected a string")
        outputs += chunk
    return outputs


@dataclass
class SplitRows:
    """One file split, aligned and parsed. ``excluded`` rows are not in ``rows``; they are counted."""
    rows: list[dict]        # input, label (gold), llm_label, rationale, teacher_fallback
    excluded: int = 0
    excluded_why: str = ""


def load_split(bench: DssDataset, root: Path, split: str, eos: str = T5_EOS) -> SplitRows:
    """Read the gold rows and the teacher's completions of one split and pair them by position."""
    gold_path, *chunks = split_files(bench, root, split)
    gold_rows = read_json_lines(gold_path)
    outputs = read_teacher_outputs(chunks)
    if len(outputs) != len(gold_rows):
        raise UsageError(
            f"{gold_path}: {len(gold_rows)} rows but {len(outputs)} teacher outputs in "
            f"{bench.teacher_glob(root, split)} ({len(chunks)} files); they must align one-to-one")
    out = SplitRows(rows=[])
    for (lineno, row), output in zip(gold_rows, outputs):
        gold = bench.gold(row, f"{gold_path}:{lineno}", eos)
        if gold is None:
            out.excluded += 1
            out.excluded_why = "gold label not 0, 1 or 2"
            continue
        parsed = bench.parse(output)
        out.rows.append({"input": gold[0], "label": gold[1], "llm_label": parsed.label,
                         "rationale": parsed.rationale, "teacher_fallback": parsed.fallback})
    if not out.rows:
        raise UsageError(f"{gold_path}: empty split (all {out.excluded} rows excluded: {out.excluded_why})")
    return out


# --- the data root ------------------------------------------------------------------------------

def default_data_roots() -> list[Path]:
    """Where the data is looked for without --data_root: ``./datasets`` (where DSS keeps it and
    ``cotmi data fetch`` puts it), then ``$COTMI_DATA_ROOT`` if set (a shared copy on a cluster)."""
    shared = os.environ.get("COTMI_DATA_ROOT")
    return [Path("datasets")] + ([Path(shared).expanduser()] if shared else [])


def resolve_data_root(data_root: str | None, dataset: str) -> Path:
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise UsageError(f"--data_root {data_root}: no such directory")
        if not (root / dataset).is_dir():
            raise UsageError(f"--data_root {data_root}: has no {dataset}/ folder (the DSS layout is "
                             f"<data_root>/{dataset}/{dataset}_train.json, ...)")
        return root
    for root in default_data_roots():
        if (root / dataset).is_dir():
            return root
    looked = ", ".join(str(r) for r in default_data_roots())
    raise UsageError(f"--dataset {dataset} needs the DSS data folder: pass --data_root DIR (looked in "
                     f"{looked}); `cotmi data fetch --to datasets` downloads it")


def input_files(bench: DssDataset, root: Path) -> list[Path]:
    """Every file a training run reads (checked to exist), in a fixed order."""
    return [p for split in bench.file_splits for p in split_files(bench, root, split)]


def check_data_files(cfg):
    """Fail fast, before any heavy start-up, on a missing data root or file (``cfg``: TrainConfig).
    Returns the config as a run records it: your own data's path made absolute and its task kind
    resolved (--task, else its manifest's)."""
    if cfg.dataset in DSS_DATASETS:
        input_files(DSS_DATASETS[cfg.dataset], resolve_data_root(cfg.data_root, cfg.dataset))
    elif cfg.dataset not in DATASETS:
        source = locate(cfg.dataset)
        return replace(cfg, dataset=str(source.path.resolve()), task=resolve_task(source, cfg.task))
    return cfg
