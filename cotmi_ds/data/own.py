"""A task of your own (docs/own-task.md): rows with ``input`` and ``label`` (both text), optionally
``rationale`` (the teacher's chain of thought), ``llm_label`` (the teacher's label) and ``choices``
(a list of texts, the label among them).

``--dataset PATH`` is one of
- a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``): the training split;
- a folder of split files named ``train``, ``valid`` (or ``validation``) and ``test`` with one of
  those extensions, and optionally ``manifest.json`` (written by ``cotmi teach``; its ``task`` and
  ``name`` are used);
- a folder written by `datasets`' ``save_to_disk``: a ``Dataset`` (the training split) or a
  ``DatasetDict`` with those split names.

The formats are read by `datasets` (JSON and JSON Lines, CSV with every cell as text, Parquet,
``load_from_disk``). Every row is then checked, and a problem is one ``UsageError`` that names the
file, the line (JSON Lines, CSV) or row (a JSON list, Parquet, saved folders), and the field.
Finding the files needs only the standard library, so the CLI checks them before its heavy imports;
reading them imports `datasets` (never torch). Nothing is written outside a temporary folder.
"""
from __future__ import annotations

import csv
import json
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cotmi_ds.data import DATASETS, TASK_KINDS
from cotmi_ds.data.arith import evaluate_arithmetic
from cotmi_ds.errors import UsageError, not_utf8
from cotmi_ds.files import json_error, read_json

TEXT_FIELDS = ("input", "label", "rationale", "llm_label")
FIELDS = (*TEXT_FIELDS, "choices")
REQUIRED = ("input", "label")
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MANIFEST = "manifest.json"
MAX_DEPTH = 60  # Arrow's JSON reader gives up at 64 levels, long before Python's json does


@dataclass(frozen=True)
class OwnSource:
    """Where the splits of a path dataset are, found without reading them."""
    path: Path
    files: dict[str, Path]  # split -> its file; a saved folder: split -> the folder
    saved: bool = False     # written by save_to_disk
    manifest: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A readable name for run directories and reports: the manifest's ``name``, else the
        folder's name (or the file's, unless it is named after its split)."""
        given = self.manifest.get("name")
        if isinstance(given, str) and given.strip():
            return given.strip()
        path = self.path.resolve()
        if path.suffix.lower() in FORMATS:
            return path.parent.name if path.stem in SPLIT_NAMES else path.stem
        return path.name

    @property
    def task(self) -> str | None:
        """The manifest's task kind (checked when the manifest was read)."""
        return self.manifest.get("task")

    def input_files(self) -> list[Path]:
        """Every file the rows come from (and the manifest), in a fixed order: the cache keys on
        their contents."""
        if self.saved:
            found = [p for p in sorted(self.path.rglob("*")) if p.is_file()]
        else:
            found = [self.files[s] for s in ("train", "valid", "test") if s in self.files]
            if (self.path / MANIFEST).is_file():
                found.append(self.path / MANIFEST)
        return found


@dataclass
class OwnSplit:
    """The checked rows of one split: every field of FIELDS in each row (None where absent)."""
    rows: list[dict]
    present: tuple[str, ...]   # the optional fields that the split has in some row
    ignored: tuple[str, ...]   # fields that are not ours, left out
    where: str                 # the file (or saved folder and split), for messages
    row_location: Callable[[int], str] = field(repr=False, compare=False)  # 1-based row -> "file:line"

    def missing(self, name: str) -> int | None:
        """1-based row number of the first row without ``name``, or None if every row has it."""
        return next((i for i, r in enumerate(self.rows, 1) if r[name] is None), None)

    def require(self, name: str, why: str) -> None:
        """Every row must have ``name``; else one line naming the first row without it, and ``why``."""
        first = self.missing(name)
        if first is None:
            return
        lacking = sum(r[name] is None for r in self.rows)
        if lacking == len(self.rows):
            raise UsageError(f"{self.where}: no row has a {name!r} field; {why}")
        raise UsageError(f"{self.row_location(first)}: missing field {name!r} ({lacking} of {len(self.rows)} rows "
                         f"lack it); {why}")


# --- finding the files ----------------------------------------------------------------------

def locate(spec: str, flag: str = "--dataset") -> OwnSource:
    """The splits of a file or folder (standard library only). At least one split must exist."""
    path = Path(spec).expanduser()
    if path.is_file():
        _format_of(path, flag)
        return OwnSource(path, {"train": path})
    if not path.is_dir():
        raise UsageError(f"{flag} {spec}: no such file or folder")
    manifest = _read_manifest(path)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return OwnSource(path, {s: path for s in _saved_splits(path)}, saved=True, manifest=manifest)
    files: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        split = SPLIT_NAMES.get(entry.stem)
        if split is None or entry.suffix.lower() not in FORMATS or not entry.is_file():
            continue
        if split in files:
            raise UsageError(f"{flag} {spec}: two files for the {split} split ({files[split].name}, {entry.name}); "
                             "keep one")
        files[split] = entry
    if not files:
        raise UsageError(f"{flag} {spec}: no split files in this folder (expected train, valid or validation, "
                         f"test, each {', '.join(FORMATS)}; or a folder written by save_to_disk)")
    return OwnSource(path, files, manifest=manifest)


def _format_of(path: Path, flag: str = "--dataset") -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{flag} {path}: unknown format {path.suffix or '(no extension)'!r}; use "
                         f"{', '.join(FORMATS)}, or a folder written by save_to_disk")
    return fmt


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    task = manifest.get("task")
    if task is not None and task not in TASK_KINDS:
        raise UsageError(f"{path}: task {_short(task)} is not one of: {', '.join(TASK_KINDS)}")
    return manifest


def _saved_splits(folder: Path) -> list[str]:
    """The split names of a save_to_disk folder (a lone Dataset is the training split)."""
    index = folder / "dataset_dict.json"
    if not index.is_file():
        return ["train"]
    content = read_json(index)
    names = content.get("splits") if isinstance(content, dict) else None
    if not isinstance(names, list) or not names:
        raise UsageError(f"{index}: no 'splits' list; is this folder written by DatasetDict.save_to_disk?")
    unknown = [n for n in names if n not in SPLIT_NAMES]
    if unknown:
        raise UsageError(f"{folder}: split {_short(unknown[0])} is not one of: train, valid, validation, test")
    splits = [SPLIT_NAMES[n] for n in names]
    if len(set(splits)) < len(splits):
        raise UsageError(f"{folder}: has both a valid and a validation split; keep one")
    return splits


def dataset_name(dataset: str) -> str:
    """The readable name of a --dataset value: a built-in one's own, else OwnSource.name (also for
    data that has moved since a run read it)."""
    if dataset in DATASETS:
        return dataset
    try:
        return locate(dataset).name
    except UsageError:
        return OwnSource(Path(dataset), {}).name


def resolve_task(source: OwnSource, task: str | None, flag: str = "--dataset") -> str:
    """--task, else the manifest's ``task``; one of them is needed to score the answers."""
    if task is not None:
        if task not in TASK_KINDS:
            raise UsageError(f"--task {task!r} is not one of: {', '.join(TASK_KINDS)}")
        return task
    if source.task is not None:
        return source.task
    raise UsageError(f"{flag} {source.path}: give --task choice, exact or numeric (how answers are scored: "
                     "one of the choices, the exact text, or the value of a number or arithmetic expression)")


# --- reading and checking rows --------------------------------------------------------------

def read_split(source: OwnSource, split: str, task: str | None = None) -> OwnSplit:
    """The checked rows of ``split``. With a ``task``, labels are also checked against it (numeric:
    a number or an arithmetic expression; any task: among the row's choices when it has them)."""
    path = source.files[split]
    if source.saved:
        columns, where = _load_saved(path, split), f"{path} (split {split})"
    else:
        columns, where = _load_file(path), str(path)

    def row_location(i: int) -> str:  # only for an error message: it may read the file again
        return f"{where}: row {i}" if source.saved else _row_location(path, i)

    csv_cells = not source.saved and _format_of(path) == "csv"
    n = len(next(iter(columns.values()), []))
    if n == 0:
        raise UsageError(f"{where}: empty split (0 rows)")
    for name in REQUIRED:
        if name not in columns:
            raise UsageError(f"{where}: no {name!r} field (its fields: {', '.join(columns) or 'none'}); every row "
                             "needs 'input' and 'label'")
    rows = []
    for i in range(n):
        raw = {name: columns[name][i] for name in FIELDS if name in columns}
        rows.append(_check_row(raw, lambda i=i: row_location(i + 1), task, csv_cells=csv_cells))
    present = tuple(f for f in FIELDS if f not in REQUIRED and any(r[f] is not None for r in rows))
    return OwnSplit(rows, present, tuple(c for c in columns if c not in FIELDS), where, row_location)


def _check_row(raw: dict, where, task: str | None, csv_cells: bool) -> dict:
    """One row with every field (None where absent), or a UsageError naming ``where()`` and the field."""
    row: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = raw.get(name)
        if csv_cells and value == "" and name not in REQUIRED:
            value = None  # an empty CSV cell is an absent value
        if value is None:
            if name in REQUIRED:
                raise UsageError(f"{where()}: missing field {name!r}")
        elif not isinstance(value, str):
            raise UsageError(f"{where()}: field {name!r} must be a string, got {type(value).__name__} "
                             f"{_short(value)}" + (f' (write it as "{value}")' if name == "label" and
                                                   isinstance(value, (int, float)) else ""))
        elif name in REQUIRED and not value.strip():
            raise UsageError(f"{where()}: field {name!r} is empty")
        row[name] = value
    row["choices"] = _check_choices(raw.get("choices"), row["label"], where, csv_cells)
    if task == "numeric" and evaluate_arithmetic(row["label"]) is None:
        raise UsageError(f"{where()}: field 'label' {_short(row['label'])} is not a number or arithmetic expression "
                         "(--task numeric scores answers by value); use --task exact to compare text")
    return row


def _check_choices(value, label: str, where, csv_cells: bool) -> list[str] | None:
    if value is None or (csv_cells and value == ""):
        return None
    if csv_cells and isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise UsageError(f"{where()}: field 'choices' must be a JSON list of strings in a CSV cell, "
                             'e.g. ["yes", "no"]') from None
    if not (isinstance(value, list) and value and all(isinstance(c, str) and c.strip() for c in value)):
        raise UsageError(f"{where()}: field 'choices' must be a list of non-empty strings, got {_short(value)}")
    if label.strip() not in [c.strip() for c in value]:
        raise UsageError(f"{where()}: label {_short(label)} is not one of its choices {_short(value)}")
    return value


def format_choices(input: str, choices: list[str] | None) -> str:
    """The text a model reads: the input, then the choices as CommonsenseQA's inputs list them
    (``Answer Choices:`` and ``(a) ...`` lines)."""
    if not choices:
        return input
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = [f"({letters[i]}) {c}" if i < len(letters) else f"({i + 1}) {c}" for i, c in enumerate(choices)]
    return "\n".join([input, "Answer Choices:", *lines])


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- datasets, and naming what it could not read --------------------------------------------

def _load_file(path: Path) -> dict[str, list]:
    """Columns of one split file, read by `datasets` into memory (its cache in a temporary folder)."""
    fmt = _format_of(path)
    if fmt != "parquet" and not path.read_bytes().strip():
        raise UsageError(f"{path}: empty split (0 rows)")
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        from datasets import Features, Value

        header = _csv_header(path)
        # Every cell as text (pandas would turn "007" into 7), an empty cell as "" (not NaN).
        kwargs = dict(features=Features({c: Value("string") for c in header}), keep_default_na=False,
                      index_col=False)
    import pandas
    from datasets import load_dataset

    with _quiet_datasets() as cache, warnings.catch_warnings():
        # pandas only warns when the first row has more cells than the header: make it an error.
        warnings.simplefilter("error", pandas.errors.ParserWarning)
        try:
            return load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True,
                                **kwargs).to_dict()
        except Exception as e:  # datasets wraps what pyarrow or pandas raised; find the line ourselves
            raise _diagnose(path, fmt, e) from None


def _load_saved(folder: Path, split: str) -> dict[str, list]:
    from datasets import Dataset, load_from_disk

    with _quiet_datasets():
        try:
            loaded = load_from_disk(str(folder), keep_in_memory=True)
            if not isinstance(loaded, Dataset):
                loaded = loaded[next(k for k in loaded if SPLIT_NAMES[k] == split)]
            return loaded.to_dict()
        except UnicodeDecodeError:
            raise UsageError(f"{folder} (split {split}): holds text that is not valid UTF-8") from None
        except Exception as e:  # a folder save_to_disk did not write whole
            raise UsageError(f"{folder}: cannot be read by datasets.load_from_disk ({_first_line(e)})") from None


@contextmanager
def _quiet_datasets():
    """datasets' progress bars and logs off for a read (a reader's output is ours: a file it cannot
    parse becomes our one line, not its logged error as well), its cache in a temporary folder that
    is removed afterwards."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_off, level = datasets.are_progress_bars_disabled(), ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="cotmi-own-") as cache:
            yield cache
    finally:
        ds_logging.set_verbosity(level)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if not header:
        raise UsageError(f"{path}:1: no header line (the first line names the columns: input,label,...)")
    dup = next((c for i, c in enumerate(header) if c in header[:i]), None)
    if dup is not None:
        raise UsageError(f"{path}:1: column {dup!r} appears twice in the header")
    return header


def _not_utf8(path: Path) -> UsageError:
    """The line of the first byte that is not UTF-8 (the offset datasets reports is into a block)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return UsageError(f"{path}:{line}: {not_utf8(e)}")
    return UsageError(f"{path}: not UTF-8 text; save it as UTF-8")


def _diagnose(path: Path, fmt: str, error: BaseException) -> UsageError:
    """What datasets could not read, as one line naming the file and, where we can find it, the line."""
    if isinstance(error, UnicodeDecodeError) or isinstance(error.__cause__, UnicodeDecodeError):
        if fmt == "parquet":
            return _parquet_bad_text(path) or UsageError(f"{path}: holds text that is not valid UTF-8")
        return _not_utf8(path)
    if fmt == "json":
        found = _json_problem(path)
        if found is not None:
            return found
    if fmt == "csv":
        found = _csv_problem(path)
        if found is not None:
            return found
    kind = {"json": "JSON or JSON Lines", "csv": "CSV", "parquet": "Parquet"}[fmt]
    return UsageError(f"{path}: cannot be read as {kind} ({_first_line(_innermost(error))})")


def _json_problem(path: Path) -> UsageError | None:
    """Parse the file with the standard library to name the line (or list item) that is wrong."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            return json_error(path, e)
        except RecursionError:
            return UsageError(f"{path}: nested too deeply to read")
        if not isinstance(items, list):
            return None
        if not items:
            return UsageError(f"{path}: empty split (0 rows)")
        return next((p for i, item in enumerate(items, 1)
                     if (p := _json_item_problem(item, f"{path}: row {i}")) is not None), None)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return json_error(path, e, lineno)
        except RecursionError:
            return UsageError(f"{path}:{lineno}: nested too deeply to read")
        problem = _json_item_problem(obj, f"{path}:{lineno}")
        if problem is not None:
            return problem
    return None


def _json_item_problem(obj: Any, where: str) -> UsageError | None:
    if not isinstance(obj, dict):
        return UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name, value in obj.items():
        if _depth(value) > MAX_DEPTH:
            return UsageError(f"{where}: field {name!r} is nested more than {MAX_DEPTH} levels deep")
        bad = _unencodable(value)
        if bad is not None:
            return UsageError(f"{where}: field {name!r} holds text that is not valid Unicode ({bad!r}: a lone "
                              "surrogate)")
    return None


def _depth(value: Any, limit: int = MAX_DEPTH + 1) -> int:
    """Nesting depth of lists and objects, counted up to ``limit``."""
    if limit <= 0 or not isinstance(value, (list, dict)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _unencodable(value: Any) -> str | None:
    """The first character of ``value``'s texts that UTF-8 cannot encode (``value`` is shallow)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return value[e.start]
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for v in items if (bad := _unencodable(v)) is not None), None)


def _csv_problem(path: Path) -> UsageError | None:
    """A row with more cells than the header (pandas names the line only in its message)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        start = reader.line_num + 1
        rows = 0
        for cells in reader:
            if cells and len(cells) > len(header):
                return UsageError(f"{path}:{start}: {len(cells)} cells, but the header has {len(header)} "
                                  f"({','.join(header)}); quote cells that hold a comma")
            rows += bool(cells)
            start = reader.line_num + 1
    return UsageError(f"{path}: empty split (0 rows)") if rows == 0 else None


def _parquet_bad_text(path: Path) -> UsageError | None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for name in table.column_names:
        for i, value in enumerate(table.column(name)):
            try:
                value.as_py()
            except UnicodeDecodeError:
                return UsageError(f"{path}: row {i + 1}: field {name!r} holds text that is not valid UTF-8")
    return None


def _row_location(path: Path, row: int) -> str:
    """``file:LINE`` of the 1-based ``row`` of a JSON Lines or CSV file, ``file: row N`` otherwise
    (a JSON list, Parquet). Computed only for an error message."""
    fmt = _format_of(path)
    if fmt == "csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            start, seen = reader.line_num + 1, 0
            for cells in reader:
                if cells:  # pandas skips blank lines
                    seen += 1
                    if seen == row:
                        return f"{path}:{start}"
                start = reader.line_num + 1
    elif fmt == "json":
        text = path.read_text(encoding="utf-8-sig")
        if not text.lstrip().startswith("["):  # JSON Lines; datasets skips blank lines
            lines = [i for i, line in enumerate(text.splitlines(), 1) if line.strip()]
            if row <= len(lines):
                return f"{path}:{lines[row - 1]}"
    return f"{path}: row {row}"


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
