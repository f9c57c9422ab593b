"""The run directory's ownership and lock, without training: RunLock between two holders, what
--overwrite counts as cotmi's, and a replacement that fails its first write putting the old run back."""
import json
import os

import pytest
import torch

from cotmi_ds.distributed import DistEnv
from cotmi_ds.errors import UsageError
from cotmi_ds.training.run_dir import LOCK, MARKER, REPLACED, RunDir, RunLock, cotmi_entries

ENV1 = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def test_a_held_lock_refuses_a_second_holder_naming_the_first_and_is_free_once_released(tmp_path):
    first = RunLock.take(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(UsageError) as e:
        RunLock.take(tmp_path)
    assert f"is in use by another cotmi train (pid {os.getpid()} on host " in str(e.value)
    first.release()
    RunLock.take(tmp_path).release()


def test_overwrite_counts_only_what_cotmi_writes(tmp_path):
    names = ["config.yaml", "config.yaml.tmp", "checkpoints", "model", "model.partial", "model.replaced.partial",
             "tb", "results.json", "status.json", "eval_results.json", REPLACED,  # cotmi's
             "notes.txt", "slurm.log", ".doctor", "data.csv", "config.yaml.bak", "models", MARKER, LOCK]
    for name in names:
        (tmp_path / name).write_text("x")
    assert [p.name for p in cotmi_entries(tmp_path)] == sorted(names[:11])


class Tokenizer:
    def __init__(self, fails=False):
        self.fails = fails

    def save_pretrained(self, path):
        if self.fails:
            raise OSError(28, "No space left on device", str(path))
        path.mkdir()
        (path / "tokenizer.json").write_text("{}")


def _old_run(path):
    for name, text in [("config.yaml", "old: true\n"), ("results.json", "{}"), ("notes.txt", "mine"), (MARKER, "{}")]:
        (path / name).write_text(text)
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "latest").write_text("step-9")


def test_a_replacement_whose_first_write_fails_puts_the_old_run_back(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _old_run(run)
    before = sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None) for p in run.rglob("*"))
    claim = RunDir(run, None, replace=True, fresh=False, lock=RunLock.take(run))
    with pytest.raises(UsageError, match=f"no space left on {run / 'tokenizer'}; the run did not start"):
        claim.claim(ENV1, "new: true\n", {}, Tokenizer(fails=True))
    after = sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None) for p in run.rglob("*")
                   if p.name != LOCK)
    assert after == [entry for entry in before]
    assert claim.lock is None  # let go: a rerun may take it


def test_a_replacement_keeps_what_is_not_cotmis(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _old_run(run)
    RunDir(run, None, replace=True, fresh=False, lock=RunLock.take(run)).claim(ENV1, "new: true\n", {"a": 1}, Tokenizer())
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.yaml", "ds_config.json", "tokenizer", "notes.txt",
                                                            MARKER, LOCK])
    assert (run / "config.yaml").read_text() == "new: true\n" and (run / "notes.txt").read_text() == "mine"


def test_a_run_that_appeared_while_this_one_started_is_not_written_into(tmp_path):
    run = tmp_path / "run"  # empty when this run was chosen; another run finished there since
    run.mkdir()
    _old_run(run)
    with pytest.raises(UsageError, match="another cotmi train started a run there while this one was starting"):
        RunDir(run, None, replace=False).claim(ENV1, "new: true\n", {}, Tokenizer())
    assert (run / "config.yaml").read_text() == "old: true\n" and not (run / "ds_config.json").exists()


def test_a_new_run_whose_first_write_fails_leaves_nothing(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(UsageError, match="the run did not start"):
        RunDir(run, None, replace=False).claim(ENV1, "new: true\n", {}, Tokenizer(fails=True))
    assert not run.exists() and (tmp_path / "new").is_dir()  # what existed stays
    run.mkdir()  # an empty folder of the user's: emptied of what the run wrote, kept
    with pytest.raises(UsageError, match="the run did not start"):
        RunDir(run, None, replace=False).claim(ENV1, "new: true\n", {}, Tokenizer(fails=True))
    assert list(run.iterdir()) == []
