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

@dataclass(frozen=True)
class Row:
    fields: dict[str, Any]   # the template's slots; gold ``label`` (None: no gold), ``choices``
    where: str               # file:line, for errors
    input: str               # the input as written to the output split


@dataclass
class Source:
    name: str                # a readable name (the benchmark's; for your data, data/own.py's)
    path: str                # the benchmark's name, or the data's path: what errors and the manifest name
    answering: Answering
    template: str            # the shipped template used when --template is not given
    splits: dict[str, list[Row]]
    files: list[Path] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)  # rows left out (no gold label), per split

    @property
    def fields(self) -> set[str]:
        """The fields every row has (a template may use these)."""
        common: set[str] | None = None
        for rows in self.splits.values():
            for r in rows:
                have = {k for k, v in r.fields.items() if v is not None}
                common = have if common is None else common & have
        return common or set()


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
            rows.append(Row({**raw, "input": gold[0], "label": gold[1]}, where, gold[0]))
        splits[split], excluded[split] = rows, skipped
        files.append(path)
    if not splits:
        raise UsageError(f"--dataset {name}: no gold file under {root / name}")
    return Source(name, name, for_benchmark(name), name, splits, files, excluded)


def own_source(path: str, task: str | None) -> Source:
    """Your data, read and checked by data/own.py (the reader `cotmi train --dataset PATH` uses). A
    row's ``input`` is shown to the teacher as the student reads it: with its choices, if it has any."""
    from cotmi_ds.data.own import format_choices, locate, read_split, resolve_task

    found = locate(path)
    task = resolve_task(found, task)
    splits = {}
    for split in found.files:
        own = read_split(found, split, task)
        splits[split] = [Row({**r, "input": format_choices(r["input"], r["choices"])}, f"{own.where}: row {i}",
                             r["input"]) for i, r in enumerate(own.rows, 1)]
    return Source(found.name, str(found.path), for_task(task), task, splits, found.input_files())


def load_source(dataset: str, data_root: str | None, task: str | None) -> Source:
    if dataset in DSS_DATASETS and not Path(dataset).exists():
        if task is not None and task != for_benchmark(dataset).task:
            raise UsageError(f"--task {task}: {dataset}'s answers are read as {for_benchmark(dataset).task}")
        return benchmark_source(dataset, data_root)
    if not Path(dataset).exists():
        raise UsageError(f"--dataset {dataset}: no such file or folder, and not a benchmark ({', '.join(DSS_DATASETS)})")
    return own_source(dataset, task)
