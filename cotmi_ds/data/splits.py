"""Rows of the train/valid/test splits as DSS builds them (its run.py, in this order):

1. the dataset-size sweep keeps a fraction f of train: ``train_test_split(test_size=1-f, seed=run)``
   (skipped for f = 1);
2. cqa and svamp have no valid file: 10% of (the kept) train becomes valid,
   ``train_test_split(test_size=0.1, seed=0)``;
3. ``label_type=llm`` replaces the training labels (only train's) by the teacher's.

The splits are drawn with HF datasets' own ``train_test_split``, so they are DSS's, row for row.
A summary counts everything a user should know: rows, rows excluded, teacher outputs that fell back
to the placeholder label, and how often the teacher's label agrees with gold.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from datasets import Dataset

from cotmi_ds.config import TrainConfig
from cotmi_ds.data import task_kind
from cotmi_ds.data.datasets import DSS_DATASETS, T5_EOS, labels_agree, load_split, resolve_data_root
from cotmi_ds.data.synthetic import synthetic_splits
from cotmi_ds.modes import label_type_of
from cotmi_ds.errors import UsageError

VALID_FRACTION, VALID_SEED = 0.1, 0  # DSS: valid = 10% of train, always seed 0


@dataclass
class SplitSummary:
    rows: int
    teacher_fallbacks: int     # teacher outputs that did not parse: placeholder label
    teacher_agree: int         # teacher label == gold label (SVAMP: as numbers)
    excluded: int = 0          # rows of the file left out, with the reason
    excluded_why: str = ""

    @property
    def teacher_accuracy(self) -> float:
        return self.teacher_agree / self.rows if self.rows else 0.0


@dataclass
class DataSummary:
    dataset: str
    data_root: str | None
    label_type: str
    subsample: float
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # file splits absent (stats only)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name, s in self.splits.items():
            out["splits"][name]["teacher_accuracy"] = round(s.teacher_accuracy, 6)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DataSummary":
        splits = {k: SplitSummary(**{f: v[f] for f in SplitSummary.__dataclass_fields__})
                  for k, v in d["splits"].items()}
        return cls(d["dataset"], d["data_root"], d["label_type"], d["subsample"], splits, d.get("missing", []))

    def describe(self) -> str:
        """A few lines for the start of a run."""
        where = f" from {self.data_root}" if self.data_root else ""
        sizes = ", ".join(f"{k} {s.rows:,}" for k, s in self.splits.items())
        lines = [f"data: {self.dataset}{where}: {sizes} rows"
                 + (f" (train subsampled to {self.subsample:g})" if self.subsample < 1 else "")]
        lines.append("  teacher label = gold: " + ", ".join(
            f"{k} {s.teacher_accuracy:.2%}" for k, s in self.splits.items())
            + "; placeholder labels (teacher output did not parse): "
            + ", ".join(f"{k} {s.teacher_fallbacks}" for k, s in self.splits.items()))
        excluded = [f"{k} {s.excluded} ({s.excluded_why})" for k, s in self.splits.items() if s.excluded]
        if excluded:
            lines.append("  rows excluded: " + ", ".join(excluded))
        lines.append(f"  training labels: {'teacher (label_type llm)' if self.label_type == 'llm' else 'gold (label_type gt)'}")
        return "\n".join(lines)


@dataclass
class Splits:
    rows: dict[str, Dataset]  # train/valid/test: input, label, llm_label, rationale, teacher_fallback
    summary: DataSummary


def read_file_splits(cfg: TrainConfig, eos: str, allow_missing: bool = False):
    """Rows per file split, (count, reason) of rows excluded per split, the data root, and (with
    ``allow_missing``, for `cotmi data stats`) the splits whose gold file is absent."""
    if cfg.dataset == "synthetic":
        raw = synthetic_splits(cfg.synthetic_train_size, cfg.synthetic_eval_size, cfg.seed)
        # The synthetic teacher is exact: its label is the gold label, and it always parses.
        rows = {k: [dict(r, llm_label=r["label"], teacher_fallback=False) for r in v] for k, v in raw.items()}
        return rows, {}, None, []
    bench = DSS_DATASETS[cfg.dataset]
    root = resolve_data_root(cfg.data_root, cfg.dataset)
    rows, excluded, missing = {}, {}, []
    for split in bench.file_splits:
        if allow_missing and not bench.gold_file(root, split).is_file():
            missing.append(split)
            continue
        loaded = load_split(bench, root, split, eos)
        rows[split] = loaded.rows
        if loaded.excluded:
            excluded[split] = (loaded.excluded, loaded.excluded_why)
    return rows, excluded, root, missing


def build_splits(cfg: TrainConfig, eos: str = T5_EOS, allow_missing: bool = False) -> Splits:
    """The splits a run trains and evaluates on. With ``allow_missing`` (stats), file splits that
    are absent are left out (without train, valid/test are shown as they are)."""
    rows, excluded, root, missing = read_file_splits(cfg, eos, allow_missing)
    has_valid = cfg.dataset == "synthetic" or DSS_DATASETS[cfg.dataset].has_valid
    splits: dict[str, Dataset] = {}
    if "train" in rows:
        train = Dataset.from_list(rows["train"])
        if cfg.subsample < 1.0:
            try:
                train = train.train_test_split(test_size=1.0 - cfg.subsample, seed=cfg.seed)["train"]
            except ValueError as e:  # datasets: the kept part would be empty
                raise UsageError(f"--subsample {cfg.subsample}: keeps no training rows of "
                                 f"{len(rows['train'])} ({e})") from None
        splits["train"] = train
        if not has_valid:
            if len(train) < 2:
                raise UsageError(f"{cfg.dataset}: {len(train)} training row(s) left; cannot split off a valid set")
            parts = train.train_test_split(test_size=VALID_FRACTION, seed=VALID_SEED)
            splits["train"], splits["valid"] = parts["train"], parts["test"]
    for name in ("valid", "test"):
        if name in rows:
            splits[name] = Dataset.from_list(rows[name])

    label_type = label_type_of(cfg)
    summary = DataSummary(cfg.dataset, str(root) if root else None, label_type, cfg.subsample, missing=missing)
    for name, ds in splits.items():
        if len(ds) == 0:
            raise UsageError(f"{cfg.dataset}: the {name} split is empty")
        agree = sum(labels_agree(a, b, task_kind(cfg.dataset)) for a, b in zip(ds["llm_label"], ds["label"]))
        n_ex, why = excluded.get(name, (0, ""))
        summary.splits[name] = SplitSummary(len(ds), sum(ds["teacher_fallback"]), agree, n_ex, why)
    if label_type == "llm" and "train" in splits:
        splits["train"] = splits["train"].map(lambda b: {"label": b["llm_label"]}, batched=True,
                                              keep_in_memory=True, desc="teacher labels")
    return Splits(splits, summary)
