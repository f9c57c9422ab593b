"""The rows a teacher annotates, split by split: a benchmark's gold rows (so Distilling Step-by-Step's
data can be regenerated with an open model), or your own data.

Each row keeps every field of its file, for the template's ``{field}`` slots, beside ``input``, the
gold ``label`` (None where the data has none) and ``choices``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotmi_ds.data.datasets import DSS_DATASETS, T5_EOS, read_json_lines, resolve_data_root
from cotmi_ds.errors import UsageError
from cotmi_ds.teacher.answers import Answering, for_benchmark, for_task

OWN_SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}


@dataclass(frozen=True)
class Row:
    fields: dict[str, Any]
    where: str               # file:line, for errors


@dataclass
class Source:
    name: str                # the benchmark, or the data's path (the manifest records it)
    answering: Answering
    template: str            # the shipped template used when --template is not given
    splits: dict[str, list[Row]]
    files: list[Path] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)  # rows left out (no gold label), per split

    @property
    def fields(self) -> set[str]:
        """The fields every row has (a template may use these)."""
        rows = [r for rs in self.splits.values() for r in rs]
        common = set(rows[0].fields)
        for r in rows[1:]:
            common &= {k for k, v in r.fields.items() if v is not None}
        return common


def benchmark_source(name: str, data_root: str | None) -> Source:
    """The gold rows of a DSS benchmark, with the input and label the trainer builds from them."""
    bench = DSS_DATASETS[name]
    root = resolve_data_root(data_root, name)
    splits, files, excluded = {}, [], {}
    for split in bench.file_splits:
        path = bench.gold_file(root, split)
        if not path.is_file():
            continue  # e-SNLI's and ANLI's training inputs are not in DSS's archive
        rows, skipped = [], 0
        for lineno, raw in read_json_lines(path):
            where = f"{path}:{lineno}"
            gold = bench.gold(raw, where, T5_EOS)
            if gold is None:
                skipped += 1
                continue
            rows.append(Row({**raw, "input": gold[0], "label": gold[1]}, where))
        splits[split], excluded[split] = rows, skipped
        files.append(path)
    if not splits:
        raise UsageError(f"--dataset {name}: no gold file under {root / name}")
    return Source(name, for_benchmark(name), name, splits, files, excluded)


def own_source(path: str, task: str | None) -> Source:
    """Your data: a .jsonl file (the training split) or a folder of train/valid/test .jsonl files."""
    if task is None:
        raise UsageError(f"--dataset {path}: pass --task choice, exact or numeric (how the teacher's answers "
                         "are read and checked against your labels)")
    root = Path(path)
    if root.is_dir():
        files = {OWN_SPLIT_NAMES[p.stem]: p for p in sorted(root.glob("*.jsonl")) if p.stem in OWN_SPLIT_NAMES}
        if not files:
            raise UsageError(f"--dataset {path}: no train.jsonl, valid.jsonl or test.jsonl in this folder")
    elif root.is_file():
        if root.suffix != ".jsonl":
            raise UsageError(f"--dataset {path}: expected a .jsonl file (one JSON object a line)")
        files = {"train": root}
    else:
        raise UsageError(f"--dataset {path}: no such file or folder, and not a benchmark "
                         f"({', '.join(DSS_DATASETS)})")
    splits = {split: [_own_row(raw, f"{p}:{lineno}", task) for lineno, raw in read_json_lines(p)]
              for split, p in files.items()}
    return Source(str(root), for_task(task), task, splits, list(files.values()))


def _own_row(raw: dict, where: str, task: str) -> Row:
    if not isinstance(raw.get("input"), str) or not raw["input"].strip():
        raise UsageError(f"{where}: field 'input' must be a non-empty string")
    label = raw.get("label")
    if label is not None and not isinstance(label, str):
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)
        else:
            raise UsageError(f"{where}: field 'label' must be a string, got {type(label).__name__}")
    choices = raw.get("choices")
    if choices is not None and not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
        raise UsageError(f"{where}: field 'choices' must be a non-empty list of strings")
    if task == "choice" and choices is None:
        raise UsageError(f"{where}: --task choice needs a 'choices' list in every row")
    if choices is not None and label is not None and task == "choice" and label not in choices:
        raise UsageError(f"{where}: label {label!r} is not one of the row's choices")
    return Row({**raw, "label": label}, where)


def load_source(dataset: str, data_root: str | None, task: str | None) -> Source:
    if dataset in DSS_DATASETS and not Path(dataset).exists():
        if task is not None and task != for_benchmark(dataset).task:
            raise UsageError(f"--task {task}: {dataset}'s answers are read as {for_benchmark(dataset).task}")
        return benchmark_source(dataset, data_root)
    return own_source(dataset, task)
