"""Rows of the train/valid/test splits as DSS builds them (its run.py, in this order):

0. your own data without a test file: 10% of its training file becomes test,
   ``train_test_split(test_size=0.1, seed=0)`` (the same for every run on it; not in DSS);
1. the dataset-size sweep keeps a fraction f of train: ``train_test_split(test_size=1-f, seed=run)``
   (skipped for f = 1);
2. cqa and svamp (and your own data without a valid file) have no valid file: 10% of (the kept)
   train becomes valid, ``train_test_split(test_size=0.1, seed=0)``;
3. ``label_type=llm`` replaces the training labels (only train's) by the teacher's.

The splits are drawn with HF datasets' own ``train_test_split``, so they are DSS's, row for row.
A summary counts everything a user should know: rows, rows excluded, teacher outputs that fell back
to the placeholder label, and how often the teacher's label agrees with gold.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from datasets import Dataset

from cotmi_ds.config import TrainConfig
from cotmi_ds.data import DATASETS, task_kind
from cotmi_ds.data.datasets import DSS_DATASETS, T5_EOS, labels_agree, load_split, resolve_data_root
from cotmi_ds.data.own import OwnSplit, format_choices, locate, read_split, resolve_task
from cotmi_ds.data.synthetic import synthetic_splits
from cotmi_ds.errors import UsageError
from cotmi_ds.modes import label_type_of, mode_of

VALID_FRACTION, VALID_SEED = 0.1, 0  # DSS: valid = 10% of train, always seed 0
TEST_FRACTION = VALID_FRACTION  # your own data without a test file (seed VALID_SEED too)


@dataclass
class SplitSummary:
    rows: int
    teacher_fallbacks: int     # teacher outputs that did not parse: placeholder label
    teacher_agree: int         # teacher label == gold label (SVAMP: as numbers)
    excluded: int = 0          # rows of the file left out, with the reason
    excluded_why: str = ""
    teacher_labelled: int | None = None  # rows with a teacher label (None: all; your own data may have none)

    @property
    def teacher_labels(self) -> int:
        return self.rows if self.teacher_labelled is None else self.teacher_labelled

    @property
    def teacher_accuracy(self) -> float:
        return self.teacher_agree / self.teacher_labels if self.teacher_labels else 0.0


@dataclass
class DataSummary:
    dataset: str
    data_root: str | None
    label_type: str
    subsample: float
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # file splits absent (stats only)
    task: str = ""                                    # the task kind (how answers are scored)
    notes: list[str] = field(default_factory=list)    # splits drawn from train, fields ignored

    def to_dict(self) -> dict:
        out = asdict(self)
        for name, s in self.splits.items():
            out["splits"][name]["teacher_accuracy"] = round(s.teacher_accuracy, 6)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DataSummary":
        splits = {k: SplitSummary(**{f: v[f] for f in SplitSummary.__dataclass_fields__})
                  for k, v in d["splits"].items()}
        return cls(d["dataset"], d["data_root"], d["label_type"], d["subsample"], splits, d.get("missing", []),
                   d.get("task", ""), d.get("notes", []))

    def describe(self) -> str:
        """A few lines for the start of a run."""
        where = f" from {self.data_root}" if self.data_root else ""
        sizes = ", ".join(f"{k} {s.rows:,}" for k, s in self.splits.items())
        lines = [f"data: {self.dataset}{where}: {sizes} rows"
                 + (f" (train subsampled to {self.subsample:g})" if self.subsample < 1 else "")
                 + (f"; task {self.task}" if self.task else "")]
        lines += [f"  {note}" for note in self.notes]
        lines.append(f"  {self._teacher()}")
        excluded = [f"{k} {s.excluded} ({s.excluded_why})" for k, s in self.splits.items() if s.excluded]
        if excluded:
            lines.append("  rows excluded: " + ", ".join(excluded))
        lines.append(f"  training labels: {'teacher (label_type llm)' if self.label_type == 'llm' else 'gold (label_type gt)'}")
        return "\n".join(lines)

    def _teacher(self) -> str:
        """How often the teacher's label is the gold one, per split (over the rows that have one)."""
        splits = self.splits.items()
        if not any(s.teacher_labels for _, s in splits):
            return "no teacher labels (field 'llm_label')"

        def accuracy(s: SplitSummary) -> str:
            if not s.teacher_labels:
                return "none"
            return f"{s.teacher_accuracy:.2%}" + (f" of {s.teacher_labels:,}" if s.teacher_labels < s.rows else "")

        line = "teacher label = gold: " + ", ".join(f"{k} {accuracy(s)}" for k, s in splits)
        if any(s.teacher_fallbacks for _, s in splits):
            line += "; placeholder labels (teacher output did not parse): " + ", ".join(
                f"{k} {s.teacher_fallbacks}" for k, s in splits)
        return line


@dataclass
class Splits:
    rows: dict[str, Dataset]  # train/valid/test: input, label, llm_label, rationale, teacher_fallback
    summary: DataSummary


@dataclass
class FileSplits:
    """What the files hold, before any split is drawn."""
    name: str                    # the dataset's readable name
    task: str                    # its task kind
    rows: dict[str, list[dict]]  # per file split: input, label, llm_label, rationale, teacher_fallback
    source: str | None = None    # the data root, or your own data's path
    excluded: dict[str, tuple[int, str]] = field(default_factory=dict)  # split -> (rows left out, why)
    missing: list[str] = field(default_factory=list)  # with allow_missing: file splits absent
    notes: list[str] = field(default_factory=list)


def read_file_splits(cfg: TrainConfig, eos: str, allow_missing: bool = False) -> FileSplits:
    """Rows per file split, rows excluded per split, where they came from, and (with
    ``allow_missing``, for `cotmi data stats`) the splits whose gold file is absent."""
    if cfg.dataset == "synthetic":
        raw = synthetic_splits(cfg.synthetic_train_size, cfg.synthetic_eval_size, cfg.seed)
        # The synthetic teacher is exact: its label is the gold label, and it always parses.
        rows = {k: [dict(r, llm_label=r["label"], teacher_fallback=False) for r in v] for k, v in raw.items()}
        return FileSplits(cfg.dataset, task_kind(cfg.dataset), rows)
    if cfg.dataset not in DATASETS:
        return read_own_splits(cfg, check_mode=not allow_missing)
    bench = DSS_DATASETS[cfg.dataset]
    root = resolve_data_root(cfg.data_root, cfg.dataset)
    out = FileSplits(cfg.dataset, task_kind(cfg.dataset), {}, str(root))
    for split in bench.file_splits:
        if allow_missing and not bench.gold_file(root, split).is_file():
            out.missing.append(split)
            continue
        loaded = load_split(bench, root, split, eos)
        out.rows[split] = loaded.rows
        if loaded.excluded:
            out.excluded[split] = (loaded.excluded, loaded.excluded_why)
    return out


def read_own_splits(cfg: TrainConfig, check_mode: bool = True) -> FileSplits:
    """Your own data's split files (data/own.py), checked against the task and the label type (the
    teacher's labels must be there to train on) and, with ``check_mode``, against the mode (its
    rationales) and for a train split."""
    source = locate(cfg.dataset)
    task = resolve_task(source, cfg.task)
    if check_mode and "train" not in source.files:
        raise UsageError(f"--dataset {cfg.dataset}: no train split (a train.jsonl, .csv, ... file) to train on")
    out, ignored = FileSplits(source.name, task, {}, str(source.path)), set()
    for split in ("train", "valid", "test"):
        if split not in source.files:
            continue
        data = read_split(source, split, task)
        if split == "train":
            _require_what_training_reads(data, cfg, check_mode)
        out.rows[split] = [{"input": format_choices(r["input"], r["choices"]), "label": r["label"],
                            "llm_label": r["llm_label"], "rationale": r["rationale"], "teacher_fallback": False}
                           for r in data.rows]
        ignored.update(data.ignored)
    if ignored:
        out.notes.append(f"fields ignored: {', '.join(sorted(ignored))}")
    return out


def _require_what_training_reads(train: OwnSplit, cfg: TrainConfig, check_mode: bool) -> None:
    teach = "generate them with `cotmi teach` (docs/teacher.md)"
    if check_mode and mode_of(cfg).needs_rationales:
        train.require("rationale", f"--mode {cfg.mode} learns from the teacher's rationales: {teach}, or train "
                                   "--mode standard")
    if label_type_of(cfg) == "llm":
        flag = "--mode distill" if cfg.mode == "distill" else "--label_type llm"
        train.require("llm_label", f"{flag} trains on the teacher's labels: {teach}, or train on the gold labels")


def _split_off(ds: Dataset, fraction: float, what: str, name: str) -> tuple[Dataset, Dataset]:
    """(the rest, a seeded ``fraction`` of ``ds``) as DSS draws its valid split."""
    if len(ds) < 2:
        raise UsageError(f"{name}: {len(ds)} training row(s) left; cannot split off a {what} set")
    parts = ds.train_test_split(test_size=fraction, seed=VALID_SEED)
    return parts["train"], parts["test"]


def build_splits(cfg: TrainConfig, eos: str = T5_EOS, allow_missing: bool = False) -> Splits:
    """The splits a run trains and evaluates on. With ``allow_missing`` (stats), file splits that
    are absent are left out (without train, valid/test are shown as they are)."""
    files = read_file_splits(cfg, eos, allow_missing)
    rows, name = files.rows, files.name
    drawn = [s for s in ("test", "valid") if s not in rows and s not in files.missing]
    splits: dict[str, Dataset] = {}
    if "train" in rows:
        train = Dataset.from_list(rows["train"])
        if "test" in drawn:  # before the subsample: one test set for every run on the data
            train, splits["test"] = _split_off(train, TEST_FRACTION, "test", name)
        if cfg.subsample < 1.0:
            try:
                train = train.train_test_split(test_size=1.0 - cfg.subsample, seed=cfg.seed)["train"]
            except ValueError as e:  # datasets: the kept part would be empty
                raise UsageError(f"--subsample {cfg.subsample}: keeps no training rows of "
                                 f"{len(rows['train'])} ({e})") from None
        splits["train"] = train
        if "valid" in drawn:
            splits["train"], splits["valid"] = _split_off(train, VALID_FRACTION, "valid", name)
    for split in ("valid", "test"):
        if split in rows:
            splits[split] = Dataset.from_list(rows[split])
    splits = {s: splits[s] for s in ("train", "valid", "test") if s in splits}
    notes = [f"{s}: {TEST_FRACTION if s == 'test' else VALID_FRACTION:.0%} of the training rows (seed {VALID_SEED})"
             for s in drawn if s in splits and cfg.dataset not in DATASETS] + files.notes

    label_type = label_type_of(cfg)
    summary = DataSummary(name, files.source, label_type, cfg.subsample, missing=files.missing, task=files.task,
                          notes=notes)
    for split, ds in splits.items():
        if len(ds) == 0:
            raise UsageError(f"{name}: the {split} split is empty")
        teacher = [(a, b) for a, b in zip(ds["llm_label"], ds["label"]) if a is not None]
        n_ex, why = files.excluded.get(split, (0, ""))
        summary.splits[split] = SplitSummary(len(ds), sum(ds["teacher_fallback"]),
                                             sum(labels_agree(a, b, files.task) for a, b in teacher), n_ex, why,
                                             len(teacher))
    if label_type == "llm" and "train" in splits:
        splits["train"] = splits["train"].map(lambda b: {"label": b["llm_label"]}, batched=True,
                                              keep_in_memory=True, desc="teacher labels")
    return Splits(splits, summary)
