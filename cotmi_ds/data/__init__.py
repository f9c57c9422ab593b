"""Everything that reads or shapes data: datasets, tokenizers, encoding, batching.

This file is also the registry of the built-in datasets and of the kinds of task, kept free of
imports: the config validates --dataset against it before anything heavy is imported.
"""

# How a task's predicted labels are scored (evaluation/scoring.py): numeric, equations compared by
# value (data/arith.py); choice, one of the question's answers; exact, a class name as text.
TASK_KINDS = ("choice", "exact", "numeric")

# The built-in datasets and their task kinds: the embedded synthetic one (data/synthetic.py), then
# the four DSS benchmarks (data/datasets.py).
DATASET_TASKS = {"synthetic": "numeric", "esnli": "exact", "anli1": "exact", "cqa": "choice", "svamp": "numeric"}
DATASETS = tuple(DATASET_TASKS)


def task_kind(dataset: str, task: str | None = None) -> str:
    """A run's task kind: its --task (for your own data, resolved from the manifest when the run
    starts: data/datasets.py, check_data_files), else the built-in dataset's."""
    return task if task is not None else DATASET_TASKS[dataset]
