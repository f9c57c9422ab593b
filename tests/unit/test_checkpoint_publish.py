"""Checkpointer.save with a stand-in engine (no DeepSpeed): what is published, when, and what a
reader can see at every moment of a save."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cotmi_ds.checkpoint.checkpointer import Checkpointer, NonFiniteWeights, weights_finite
from cotmi_ds.checkpoint.layout import CHECKPOINTS, LATEST, META, read_checkpoint, resolve
from cotmi_ds.distributed import DistEnv
from cotmi_ds.errors import UsageError

ENV1 = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


class FakeEngine:
    """What Checkpointer.save uses of a DeepSpeed engine."""
    global_steps = global_samples = skipped_steps = 0

    def __init__(self):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(4, 3)

    def save_checkpoint(self, root, tag, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict()}, folder / "mp_rank_00_model_states.pt")


T5 = SimpleNamespace(config=SimpleNamespace(to_json_file=lambda path: Path(path).write_text("{}")))
TOKENIZER = SimpleNamespace(save_pretrained=lambda path: (Path(path).mkdir(),
                                                          (Path(path) / "tokenizer.json").write_text("{}")))


def trainer_state() -> dict:
    """What the trainer stores in a checkpoint (TrainState.state_dict), as the metadata schema wants it."""
    from cotmi_ds.data.sampler import BatchOrder
    from cotmi_ds.training.state import TrainState

    return TrainState(BatchOrder(10, 2, 0, 1, 0)).state_dict()


MODEL = {"name": "scratch", "parameters": 15, "summary": "a Linear(4, 3)", "shapes_sha256": "a" * 64,
         "vocab_sha256": "b" * 64}


def _save(checkpointer, engine, step):
    return checkpointer.save(engine, step, T5, TOKENIZER, trainer_state())


def _checkpointer(run, keep_last=0):
    return Checkpointer(run, ENV1, keep_last, {"world_size": 1, "zero_stage": 0})


def test_non_finite_weights_are_never_written(tmp_path):
    engine, checkpointer = FakeEngine(), _checkpointer(tmp_path / "run", keep_last=1)
    _save(checkpointer, engine, 1)
    with torch.no_grad():
        engine.module.weight[1, 2] = float("inf")
    with pytest.raises(NonFiniteWeights, match="after step 2"):
        _save(checkpointer, engine, 2)
    root = tmp_path / "run" / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-1"]
    assert (root / LATEST).read_text() == "step-1"


def test_weights_finite_looks_at_a_zero3_partition():
    module = torch.nn.Linear(2, 2)
    for p in module.parameters():  # ZeRO-3: the parameter is empty, the rank holds a partition
        p.data = torch.empty(0)
        p.ds_tensor = torch.ones(3)
    engine = SimpleNamespace(module=module)
    assert weights_finite(engine, ENV1)
    module.bias.ds_tensor[1] = float("nan")
    assert not weights_finite(engine, ENV1)


def test_latest_always_names_a_complete_checkpoint_even_when_a_step_is_saved_again(tmp_path, monkeypatch):
    # A run resumed from an earlier checkpoint saves a step that exists from the abandoned timeline:
    # the old folder is moved aside; at no moment may `latest` name a folder that is gone.
    engine, checkpointer = FakeEngine(), _checkpointer(tmp_path / "run")
    root = tmp_path / "run" / CHECKPOINTS
    seen = []
    real_rename = Path.rename

    def rename(self, target):
        out = real_rename(self, target)
        if (root / LATEST).is_file():
            name = (root / LATEST).read_text().strip()
            seen.append(name)
            read_checkpoint(root / name, "latest")  # raises when gone or incomplete
        return out

    for steps in ([2, 2], [1, 2, 2]):
        monkeypatch.setattr(Path, "rename", rename)
        for step in steps:
            _save(checkpointer, engine, step)
        monkeypatch.undo()
        assert (root / LATEST).read_text() == "step-2"
        assert sorted(p.name for p in root.iterdir()) == sorted({LATEST, *(f"step-{s}" for s in steps)})
    assert "step-1" in seen  # while step-2 was replaced the second time


def test_a_partial_checkpoint_is_never_loaded_even_with_its_metadata(tmp_path):
    engine, checkpointer = FakeEngine(), _checkpointer(tmp_path / "run")
    folder = _save(checkpointer, engine, 2)
    partial = folder.rename(folder.with_name("step-2.partial"))
    assert (partial / META).is_file()
    for path in (partial, resolve(partial, "--resume")):
        with pytest.raises(UsageError, match="unfinished save") as e:
            read_checkpoint(path, "--resume")
        assert "\n" not in str(e.value)
    assert json.loads((partial / META).read_text())["step"] == 2


def test_every_file_has_a_sha256_and_a_flipped_byte_is_named(tmp_path):
    engine, checkpointer = FakeEngine(), _checkpointer(tmp_path / "run")
    folder = _save(checkpointer, engine, 3)
    meta = json.loads((folder / META).read_text())
    assert set(meta["sha256"]) == set(meta["files"]) >= {"mp_rank_00_model_states.pt", "rank-0.json",
                                                         "t5_config.json", "tokenizer/tokenizer.json"}
    assert read_checkpoint(folder, "export:").step == 3
    weights = folder / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sum can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError) as e:
        read_checkpoint(folder, "export:")
    assert str(e.value) == (f"export: {folder}: corrupt checkpoint: mp_rank_00_model_states.pt does not "
                            "match the SHA-256 recorded in cotmi_checkpoint.json")
    assert read_checkpoint(folder, "--resume", verify=False).step == 3  # sizes only


def test_each_rank_hashes_its_own_shards_and_a_balanced_share_of_the_rest():
    from cotmi_ds.checkpoint.layout import share_of

    sizes = {"zero_pp_rank_0_mp_rank_00_optim_states.pt": 50, "zero_pp_rank_1_mp_rank_00_optim_states.pt": 50,
             "rank-0.json": 1, "rank-1.json": 1, "mp_rank_00_model_states.pt": 40, "t5_config.json": 2,
             "tokenizer/spiece.model": 30}
    shares = [share_of(sizes, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shares[1] and "rank-1.json" in shares[1]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shares[0] and "rank-0.json" in shares[0]
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) - min(loads) <= 40
    assert share_of(sizes, 0, 1) == sorted(sizes)


@pytest.mark.parametrize("field", ["step", "files", "model", "trainer"])
def test_metadata_without_a_field_is_one_line(tmp_path, field):
    from cotmi_ds.checkpoint.checkpointer import open_for_resume

    engine = FakeEngine()
    checkpointer = Checkpointer(tmp_path / "run", ENV1, 0, {"world_size": 1, "zero_stage": 0, "model": MODEL})
    folder = _save(checkpointer, engine, 2)
    meta = json.loads((folder / META).read_text())
    del meta[field]
    (folder / META).write_text(json.dumps(meta))
    with pytest.raises(UsageError) as e:
        open_for_resume(folder, {}, 10)
    assert str(e.value) == f"--resume {folder / META}: {field}: missing; not a complete cotmi-checkpoint/1 metadata file"


def test_export_never_deletes_a_partial_folder_it_did_not_create(tmp_path):
    from cotmi_ds.checkpoint.export import export_checkpoint

    folder = _save(_checkpointer(tmp_path / "run"), FakeEngine(), 2)
    theirs = tmp_path / "hf.partial"
    theirs.mkdir()
    (theirs / "model.safetensors").write_text("another export, still running")
    with pytest.raises(UsageError) as e:
        export_checkpoint(str(folder), str(tmp_path / "hf"))
    assert str(e.value) == (f"export: {theirs} already exists (an interrupted or running export?); remove it "
                            "and retry; nothing was written")
    assert (theirs / "model.safetensors").read_text() == "another export, still running"
    assert not (tmp_path / "hf").exists()


def test_the_run_model_folder_appears_only_when_complete(tmp_path, tiny_t5, tiny_tokenizer):
    from cotmi_ds.checkpoint.export import _save_hf  # what both the run's model/ and `cotmi export` write through

    out = tmp_path / "run" / "model"
    out.parent.mkdir()

    class Failing:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _save_hf(tiny_t5, Failing(), out)
    assert list(out.parent.iterdir()) == []  # no half-written model/ (nor model.partial/)
    _save_hf(tiny_t5, tiny_tokenizer, out)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    with pytest.raises(OSError, match="disk full"):  # a failed re-export keeps the complete older one
        _save_hf(tiny_t5, Failing(), out)
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_status_and_results_are_written_atomically_and_durably(tmp_path, monkeypatch):
    import os

    from cotmi_ds.training.loop import Trainer

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    trainer = SimpleNamespace(env=ENV1, run_dir=tmp_path)
    Trainer._write(trainer, "status.json", {"status": "completed"})
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "completed"}
    assert str(tmp_path / "status.json.tmp") in synced and str(tmp_path) in synced  # the file, then its entry
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
