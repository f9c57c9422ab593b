"""Hostile inputs, as a user's bad day brings them: each case is a command run through cli.main in
this process, its exit code, a piece of the one line it must print, and the disk afterwards:
nothing written, nothing lost (every file under the case's folder as it was, byte for byte). One
tiny run is trained once, in this process, for the cases that need a run, a checkpoint or a model."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from cotmi_ds.cli import main
from tests.conftest import TINY
from tests.dss_fixture import SVAMP_OK, write_split

QUICK = [*TINY, "--max_steps", "2", "--eval_every", "0", "--save_every", "0", "--ds_config", "zero0"]


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[["Bench"], list]  # writes the case's files, returns the command's arguments
    code: int
    says: str                          # in the one `cotmi:` line


class Bench:
    """The case's folder (``root``), the module's trained run and data cache."""

    def __init__(self, root: Path, trained: Path, cache: Path):
        self.root, self.trained, self.cache = root, trained, cache

    def train(self, *args) -> list:
        return ["train", *QUICK, "--data_cache_dir", self.cache, *args]

    def run_copy(self, name: str = "run") -> Path:
        return Path(shutil.copytree(self.trained, self.root / name, symlinks=True))

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def ds_json(self, **keys) -> Path:
        from cotmi_ds.ds_configs import DS_CONFIG_DIR

        return self.write("my_ds.json", json.dumps({**json.loads((DS_CONFIG_DIR / "zero0.json").read_text()), **keys}))

    def meta(self, edit: Callable[[dict], object]) -> list:
        """The trained run with its checkpoint's metadata edited, continued with --resume auto."""
        run = self.run_copy()
        file = run / "checkpoints" / "step-2" / "cotmi_checkpoint.json"
        meta = json.loads(file.read_text())
        edit(meta)
        file.write_text(json.dumps(meta))
        return self.train("--output_dir", run, "--resume", "auto", "--max_steps", "4")

    def truncated_model(self) -> Path:
        run = self.run_copy()
        weights = run / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return run

    def svamp(self, rows: list | None = None, completions: list | None = None) -> Path:
        root = self.root / "data"
        rows = rows or [{"input": f"Luke had {i} apples. How many?", "label": f"( {i} + 1 )"} for i in range(20)]
        write_split(root, "svamp", "train", rows, completions or [SVAMP_OK] * len(rows))
        write_split(root, "svamp", "test", [{"input": "How many?", "label": "( 1 + 1 )"}] * 4, [SVAMP_OK] * 4)
        return root

    def svamp_train(self, root: Path) -> list:
        return self.train("--dataset", "svamp", "--data_root", root, "--output_dir", self.root / "out")

    def results(self, **changes) -> list:
        """`cotmi report` on the trained run with its results.json changed."""
        run = self.run_copy()
        results = json.loads((run / "results.json").read_text())
        for key, value in changes.items():
            if key == "accuracy":
                for evaluation in results["evaluations"]:
                    evaluation["test"]["accuracy"] = value
            else:
                results[key] = value
        (run / "results.json").write_text(json.dumps(results))
        return ["report", run, "--output_dir", self.root / "report"]


NESTED = "[" * 100_000 + "]" * 100_000
# 391 bytes standing for 9^9 strings, under a flag whose value an error message would show
BOMB = "lr:\n  - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  - &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


def _unspelling_tokenizer(bench: Bench) -> Path:
    """A real sentencepiece vocabulary that has never seen a digit: the synthetic labels (equations)
    decode to something else."""
    from cotmi_ds.data.tokenizer import tokenizer_from_sentencepiece, train_sentencepiece

    words = [f"{a}{b} {b}{a}{a} apples and pears" for a in "abcdefghij" for b in "klmnopqrst"]
    folder = bench.root / "letters"
    tokenizer_from_sentencepiece(train_sentencepiece(words, 64)).save_pretrained(folder)
    return folder


def _project(bench: Bench) -> list:
    bench.write("proj/config.yaml", "max_steps: 2\n")
    bench.write("proj/src/main.py", "print('mine')\n")
    bench.write("proj/data.csv", "a,b\n1,2\n")
    proj = bench.root / "proj"
    return bench.train("--config", proj / "config.yaml", "--overwrite", "true", "--output_dir", proj)


def _live_run(bench: Bench, *args) -> list:
    """The trained run locked, as a live run holds it, until the case ends (``args``: the second
    writer's flags)."""
    from cotmi_ds.training.run_dir import RunLock

    run = bench.run_copy()
    bench.lock = RunLock.take(run)
    return bench.train("--output_dir", run, *args)


def _starting_run(bench: Bench) -> list:
    """A directory another cotmi train has locked while it starts (nothing written in it yet)."""
    from cotmi_ds.training.run_dir import RunLock

    (bench.root / "dual").mkdir()
    bench.lock = RunLock.take(bench.root / "dual")
    return bench.train("--output_dir", bench.root / "dual", "--seed", "1")


CASES = [
    # flags and config files (before any heavy import)
    Case("seed beyond what numpy accepts", lambda b: b.train("--seed", "1e100", "--output_dir", b.root / "out"),
         2, "--seed must be in [0, 4294967295]"),
    Case("require holding a mapping", lambda b: b.train("--config", b.write("c.yaml", "require: [{a: 1}]\n")), 2,
         "c.yaml: require: expected a list of flag names, got [{'a': 1}]"),
    Case("YAML alias bomb", lambda b: b.train("--config", b.write("c.yaml", BOMB)), 2,
         "c.yaml: stands for more than 100,000 values"),
    Case("config nested 100k deep (YAML)", lambda b: b.train("--config", b.write("c.yaml", f"lr: {NESTED}\n")), 2,
         "c.yaml: nested deeper than 64 levels"),
    Case("config nested 100k deep (JSON)", lambda b: b.train("--config", b.write("c.json", f'{{"lr": {NESTED}}}')),
         2, "c.json: nested deeper than 64 levels"),
    Case("unpaired surrogate in a config", lambda b: b.train("--config", b.write("c.yaml", 'seed: 1\nmodel: "t\\ud800"\n')),
         2, "c.yaml:2: text with an unpaired surrogate escape (\\ud800)"),
    Case("config not UTF-8", lambda b: b.train("--config", b.write("c.yaml", b"model: \xff\n")), 2,
         "c.yaml: not UTF-8 text (byte 0xff at offset 7)"),
    Case("extends a file that is not beside it", lambda b: b.train("--config", b.write("cfg/c.yaml", "extends: base.yaml\n")),
         2, "--config base.yaml: no such file (relative to"),
    # DeepSpeed configs: refused before the run directory exists
    Case("unknown optimizer type", lambda b: b.train("--ds_config", b.ds_json(optimizer={"type": "Adamm", "params": {}}),
                                                     "--output_dir", b.root / "out"),
         2, "my_ds.json: optimizer.type 'Adamm': not an optimizer DeepSpeed knows"),
    Case("optimizer params a list", lambda b: b.train("--ds_config", b.ds_json(optimizer={"type": "AdamW", "params": [1, 2]}),
                                                      "--output_dir", b.root / "out"),
         2, "my_ds.json: optimizer.params: expected an object of keyword arguments, got [1, 2]"),
    Case("optimizer null", lambda b: b.train("--ds_config", b.ds_json(optimizer=None), "--output_dir", b.root / "out"),
         2, "my_ds.json: optimizer: expected an object"),
    Case("scheduler warm-up not a number",
         lambda b: b.train("--ds_config", b.ds_json(scheduler={"type": "WarmupDecayLR", "params": {
             "warmup_num_steps": "x", "total_num_steps": 10}}), "--output_dir", b.root / "out"),
         2, "my_ds.json: scheduler.params: WarmupDecayLR cannot be built from them"),
    Case("steps_per_print a string", lambda b: b.train("--ds_config", b.ds_json(steps_per_print="x"),
                                                       "--output_dir", b.root / "out"),
         2, "my_ds.json: steps_per_print: expected an integer, got 'x'"),
    # --overwrite: only a run cotmi made, and only after every check
    Case("overwrite with a DeepSpeed config DeepSpeed rejects",
         lambda b: b.train("--output_dir", b.run_copy(), "--overwrite", "true",
                           "--ds_config", b.ds_json(optimizer={"type": "NoSuchOptimizer", "params": {}})),
         2, "optimizer.type 'NoSuchOptimizer'"),
    Case("overwrite a project folder with a config.yaml", _project, 2,
         "holds no run cotmi train made (no cotmi_run.json)"),
    # one writer per run directory
    Case("resume auto of a live run", lambda b: _live_run(b, "--resume", "auto", "--max_steps", "4"), 2,
         f"is in use by another cotmi train (pid {os.getpid()} on host"),
    Case("overwrite of a live run", lambda b: _live_run(b, "--overwrite", "true"), 2,
         f"is in use by another cotmi train (pid {os.getpid()} on host"),
    Case("a second train into a directory another is starting in", _starting_run, 2,
         f"is in use by another cotmi train (pid {os.getpid()} on host"),
    # paths the system cannot even look up: one line, not OSError's traceback
    Case("an --output_dir with a name longer than a file name can be",
         lambda b: b.train("--output_dir", b.root / ("y" * 300)), 2,
         "not a usable path: a name of 300 bytes in it, where a file name holds at most 255"),
    Case("a --model path longer than a path can be", lambda b: b.train("--model", "x" * 5000), 2,
         "--model 'xxxx"),
    Case("a --dataset with a NUL byte", lambda b: b.train("--dataset", "data\0.jsonl"), 2,
         "--dataset 'data\\x00.jsonl': not a usable path: it holds a NUL byte"),
    # tokenizers
    Case("tokenizer folder with only tokenizer_config.json",
         lambda b: b.train("--tokenizer", b.write("tok/tokenizer_config.json", (
             b.trained / "tokenizer" / "tokenizer_config.json").read_text()).parent, "--output_dir", b.root / "out"),
         2, "no tokenizer vocabulary in this folder"),
    Case("tokenizer folder with no tokenizer files",
         lambda b: b.train("--tokenizer", b.write("tok/notes.txt", "not a tokenizer").parent, "--output_dir",
                           b.root / "out"),
         2, "no tokenizer vocabulary in this folder (none of tokenizer.json"),
    Case("tokenizer that cannot spell the labels",
         lambda b: b.train("--tokenizer", _unspelling_tokenizer(b), "--output_dir", b.root / "out"),
         2, "not a real vocabulary for this data"),
    # checkpoint metadata under --resume auto: nothing of the run changes
    Case("sha256 a list", lambda b: b.meta(lambda m: m.update(sha256=[1, 2])), 2, "sha256: expected an object"),
    Case("sha256 empty", lambda b: b.meta(lambda m: m.update(sha256={})), 2, "sha256: expected a SHA-256 for every file"),
    Case("shapes_sha256 missing", lambda b: b.meta(lambda m: m["model"].pop("shapes_sha256")), 2,
         "model.shapes_sha256: missing"),
    Case("trainer state replaced", lambda b: b.meta(lambda m: m.update(trainer={"x": 1})), 2, "trainer.order: missing"),
    Case("a file outside the checkpoint", lambda b: b.meta(lambda m: m["files"].update({"../../config.yaml": 1})), 2,
         "files: '../../config.yaml' lies outside the checkpoint"),
    Case("metadata nested 100k deep",
         lambda b: (b.meta(lambda m: None), b.write("run/checkpoints/step-2/cotmi_checkpoint.json", NESTED))[0],
         2, "cotmi_checkpoint.json: nested deeper than 64 levels"),
    Case("latest not UTF-8",
         lambda b: (b.meta(lambda m: None), b.write("run/checkpoints/latest", b"step-\xff\xfe"))[0],
         2, "latest: not UTF-8 text"),
    Case("latest pointing outside", lambda b: (b.meta(lambda m: None), b.write("run/checkpoints/latest", "../../x"))[0],
         2, "latest: names '../../x', not a checkpoint (step-N)"),
    # damaged weights
    Case("truncated safetensors in train --model",
         lambda b: ["train", "--model", b.truncated_model() / "model", "--output_dir", b.root / "out"],
         2, "model.safetensors is damaged"),
    Case("truncated safetensors in eval of a run", lambda b: ["eval", "--checkpoint", b.truncated_model()], 2,
         "model.safetensors is damaged"),
    Case("truncated safetensors in eval of a model folder",
         lambda b: ["eval", "--checkpoint", b.truncated_model() / "model"], 2, "model.safetensors is damaged"),
    # data files
    Case("teacher outputs nested 100k deep",
         lambda b: (root := b.svamp(), (root / "svamp/llm/train_CoT_0.json").write_text(NESTED), b.svamp_train(root))[2],
         2, "train_CoT_0.json: nested deeper than 64 levels"),
    Case("a data line nested 100k deep",
         lambda b: b.svamp_train(b.svamp(rows=[{"input": "a?", "label": "( 1 + 1 )"}] * 3 + [
             '{"input": ' + NESTED + ', "label": "( 1 + 1 )"}'] + [{"input": "b?", "label": "( 2 + 1 )"}] * 9)),
         2, "svamp_train.json:4: nested deeper than 64 levels"),
    Case("an unpaired surrogate in a question",
         lambda b: b.svamp_train(b.svamp(rows=[{"input": "a?", "label": "( 1 + 1 )"}] * 5 + [
             '{"input": "How many \\ud800 apples?", "label": "( 1 + 1 )"}'] + [{"input": "b?", "label": "( 2 + 1 )"}] * 9)),
         2, "svamp_train.json:6: text with an unpaired surrogate escape"),
    Case("your own data: a label that is a number",
         lambda b: b.train("--dataset", b.write("own/t.jsonl", '{"input": "a?", "label": 42, "rationale": "r"}\n'),
                           "--task", "exact", "--output_dir", b.root / "out"),
         2, "t.jsonl:1: field 'label' must be a string, got int 42"),
    Case("your own data: an unpaired surrogate in a question",
         lambda b: b.train("--dataset", b.write("own/t.jsonl", '{"input": "a?", "label": "1", "rationale": "r"}\n'
                                                '{"input": "How many \\ud800?", "label": "2", "rationale": "r"}\n'),
                           "--task", "exact", "--output_dir", b.root / "out"),
         2, "t.jsonl:2: field 'input' holds text that is not valid Unicode"),
    # cotmi report: each results file checked, the one skipped named
    Case("report: mode a list", lambda b: b.results(mode=["mi"]), 2, "(results.json: mode: expected a string"),
    Case("report: seed an object", lambda b: b.results(seed={"a": 1}), 2, "(results.json: seed: expected an integer"),
    Case("report: accuracy a string", lambda b: b.results(accuracy="high"), 2,
         "evaluations[0].test.accuracy: expected a number, got 'high'"),
    Case("report: accuracy NaN", lambda b: b.results(accuracy=float("nan")), 2,
         "evaluations[0].test.accuracy: expected a number, got nan"),
    Case("report: results nested 100k deep",
         lambda b: (args := b.results(), b.write("run/results.json", NESTED))[0], 2, "results.json: nested deeper"),
    Case("report: config.yaml not UTF-8",
         lambda b: (args := b.results(), b.write("run/config.yaml", b"seed: 0\nmode: \xff\n"))[0], 2,
         "config.yaml: not UTF-8 text"),
    # writes that fail
    Case("export where no folder can be made",
         lambda b: ["export", b.run_copy(), b.write("a_file", "not a folder") / "out"], 2,
         "; nothing was written"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file (its SHA-256) and folder under ``root``; a lock file by its name only (who holds it
    is the lock's own bookkeeping)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("dir" if p.is_dir() else "lock" if p.name == "cotmi_run.lock"
                    else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def in_process():
    """What a command run in this process changes globally, put back afterwards: the environment
    (a process group's variables), the stop signals' handlers, warning filters, library verbosity."""
    import datasets
    import transformers

    saved_env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    verbosity, bars = transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    with warnings.catch_warnings():
        yield
    from cotmi_ds.distributed import shutdown

    shutdown()
    os.environ.clear()
    os.environ.update(saved_env)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    transformers.logging.set_verbosity(verbosity)
    if bars:
        datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, in_process) -> tuple[Path, Path]:
    """A finished two-step run (checkpoint, exported model, results) and the data cache it filled."""
    root = tmp_path_factory.mktemp("trained")
    code, err = run_main(["train", *QUICK, "--data_cache_dir", root / "cache", "--output_dir", root / "run"])
    assert code == 0, err
    return root / "run", root / "cache"


def run_main(argv: list) -> tuple[int, str]:
    """cli.main in this process: (exit code, what it wrote to stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the trainer's handlers stay with the trainer
        signal.signal(sig, signal.SIG_DFL)
    return code, err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_input_is_one_line_and_changes_nothing(case, tmp_path, trained):
    bench = Bench(tmp_path, *trained)
    bench.lock = None
    argv = case.setup(bench)
    before = snapshot(tmp_path)
    try:
        code, err = run_main(argv)
    finally:
        if bench.lock is not None:
            bench.lock.release()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert case.says in lines[0] and len(lines[0]) < 600, lines[0]
    assert snapshot(tmp_path) == before  # nothing written, nothing lost


def test_overwrite_would_remove_exactly_what_a_finished_run_wrote(trained):
    """Everything in a finished run is cotmi's by RUN_ENTRIES, but its mark and lock (which stay)."""
    from cotmi_ds.training.run_dir import LOCK, MARKER, cotmi_entries

    run, _ = trained
    assert {p.name for p in run.iterdir()} - {p.name for p in cotmi_entries(run)} == {MARKER, LOCK}
