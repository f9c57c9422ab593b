"""The model card of every export (checkpoint/card.py) and `cotmi export --push_to_hub`, on a
checkpoint written here with a stand-in engine: the card's metadata and results table, the command
that reproduces the run, and the upload through huggingface_hub up to its call (offline: one line,
the export complete; no token written anywhere)."""
import json
import shlex
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard

from cotmi_ds.checkpoint.card import model_card, reproduce_command
from cotmi_ds.checkpoint.checkpointer import Checkpointer
from cotmi_ds.checkpoint.layout import model_identity
from cotmi_ds.data.sampler import BatchOrder
from cotmi_ds.training.state import TrainState
from cotmi_ds.cli import main
from cotmi_ds.config import load_config
from cotmi_ds.distributed import DistEnv

ENV1 = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
CFG = load_config(dataset="svamp", model="google/t5-v1_1-small", mode="mi", alpha=0.3, beta=0.2, max_steps=4,
                  lr=5e-5, global_batch_size=64, output_dir="runs/x", seed=3)


def evaluation(step, valid, test, rationales=True):
    def split(acc):
        m = {"accuracy": acc, "correct": int(acc * 20), "total": 20, "ece_equal_mass": 0.125,
             "ece_equal_width": 0.25, "avg_confidence": 0.5, "first_token_ece_equal_mass": 0.1}
        return m | ({"rationale_bleu": 12.5, "rationale_chrf": 33.25, "rationale_examples": 4} if rationales else {})
    return {"step": step, "valid": split(valid), "test": split(test)}


EVALS = [evaluation(2, 0.5, 0.45), evaluation(4, 0.4, 0.6)]


@pytest.fixture
def run(tmp_path, tiny_t5, tiny_tokenizer):
    """run/checkpoints/step-4 of a ZeRO-0 fp32 run (stand-in engine), its trainer state holding two
    evaluations."""
    engine = SimpleNamespace(module=torch.nn.ModuleDict({"t5": tiny_t5}), global_steps=4, global_samples=256,
                             skipped_steps=0)

    def save_checkpoint(root, tag, save_latest):
        (tmp_path / "run" / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": engine.module.state_dict()},
                   tmp_path / "run" / "checkpoints" / tag / "mp_rank_00_model_states.pt")

    engine.save_checkpoint = save_checkpoint
    describe = {"world_size": 1, "zero_stage": 0, "precision": "fp32",
                "model": {"name": CFG.model, **model_identity(tiny_t5, tiny_tokenizer)},
                "config": CFG.to_dict()}
    Checkpointer(tmp_path / "run", ENV1, 0, describe).save(engine, 4, tiny_t5, tiny_tokenizer,
                                                              {**TrainState(BatchOrder(10, 2, 0, 1, 0)).state_dict(),
                                                               "evaluations": EVALS})
    return tmp_path / "run"


def test_card_metadata_and_results_table():
    results = {"steps": 4, "evaluations": EVALS, "accuracy_last": 0.6, "step_last": 4, "accuracy_best_test": 0.6,
               "step_best_test": 4, "accuracy_at_best_valid": 0.45, "step_at_best_valid": 2,
               "rationale_bleu_last": 12.5, "rationale_chrf_last": 33.25, "rationale_bleu_at_best_valid": 12.5,
               "rationale_chrf_at_best_valid": 33.25, "majority_label_test_accuracy": 0.05}
    meta = {"config": CFG.to_dict(), "step": 4, "world_size": 2, "zero_stage": 2, "precision": "bf16"}
    card = ModelCard(str(model_card("svamp-mi-run", meta, results)))  # what a reader of README.md parses
    data = card.data
    assert data.base_model == "google/t5-v1_1-small" and data.datasets == ["svamp"]
    assert data.library_name == "transformers" and "PaLM 540B" in data.teacher
    assert data.training == {"mode": "mi", "alpha": 0.3, "beta": 0.2, "mi_variant": "paper", "label_type": "gt",
                             "steps": 4}
    metrics = {m["name"]: m["value"] for m in data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert metrics["test accuracy at the best valid accuracy"] == 0.45
    assert metrics["expected calibration error (equal-mass bins)"] == 0.125
    assert metrics["test rationales' chrf against the teacher's"] == 33.25
    text = card.text
    assert "| at the best valid accuracy | 45.00% (step 2) |" in text
    assert "| best of any evaluation | 60.00% (step 4) |" in text
    assert "At the last evaluation (step 4):" in text and "| accuracy | 40.00% (8/20) | 60.00% (12/20) |" in text
    assert "| calibration error (ECE, equal-width bins) | 0.2500 | 0.2500 |" in text
    assert "| rationales against the teacher's: BLEU / chrF (first 4) | 12.5 / 33.2 | 12.5 / 33.2 |" in text
    assert "| always answering the most common training label | 5.00% |" in text
    assert "| precision, ZeRO stage, ranks | bf16, 2, 2 |" in text and '"predict: " + question' in text


def test_the_reproduce_command_gives_the_runs_config():
    argv = shlex.split(reproduce_command(CFG.to_dict()))
    assert argv[:2] == ["cotmi", "train"]
    flags = dict(zip([a[2:] for a in argv[2::2]], argv[3::2]))
    assert flags["max_steps"] == "4" and "mode" not in flags and "output_dir" not in flags  # mi: the default
    rebuilt = load_config(**flags, output_dir=CFG.output_dir)
    assert rebuilt.to_dict() == CFG.to_dict()


def test_scratch_and_local_students_name_no_base_model(tmp_path):
    for model in ("scratch", str(tmp_path)):
        meta = {"config": {**CFG.to_dict(), "model": model, "mode": "standard"}, "step": 1}
        card = model_card("x", meta, None)
        assert card.data.base_model is None and card.data.training["mode"] == "standard"
        assert "None yet: the checkpoint was exported before its run's first evaluation." in card.text


def test_export_writes_the_card_from_the_checkpoint_or_the_finished_runs_results(run, tmp_path):
    main(["export", str(run), str(tmp_path / "early")])
    card = ModelCard.load(tmp_path / "early" / "README.md")
    assert "its run had not finished (no results.json)" in card.text
    assert "| at the best valid accuracy | 45.00% (step 2) |" in card.text  # from the checkpoint
    (run / "results.json").write_text(json.dumps({"steps": 4, "evaluations": EVALS, "accuracy_last": 0.6,
                                                  "step_last": 4, "accuracy_best_test": 0.6, "step_best_test": 4,
                                                  "accuracy_at_best_valid": 0.45, "step_at_best_valid": 2,
                                                  "majority_label_test_accuracy": 0.0625}))
    main(["export", str(run), str(tmp_path / "final")])
    card = ModelCard.load(tmp_path / "final" / "README.md")
    assert "had not finished" not in card.text and "| always answering the most common training label | 6.25% |" in card.text
    assert card.data.model_name == "run"


def test_push_to_hub_offline_is_one_line_after_a_complete_export(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as stop:
        main(["export", str(run), str(tmp_path / "hf"), "--push_to_hub", "someone/svamp-student"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cotmi: error: --push_to_hub someone/svamp-student: the upload "
                                               "failed (OfflineModeIsEnabled"), err
    assert f"the export in {tmp_path / 'hf'} is complete" in err[0]
    assert {"README.md", "model.safetensors", "config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}


def test_push_to_hub_hands_the_folder_to_huggingface_hub_and_writes_no_token(run, tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi

    token = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", token)
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **kw: calls.append(("create", a, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", (), kw))
                        or SimpleNamespace(commit_url="https://huggingface.co/someone/s/commit/1"))
    main(["export", str(run), str(tmp_path / "hf"), "--push_to_hub", "someone/s"])
    assert [c[0] for c in calls] == ["create", "upload"]
    assert calls[0][1] == ("someone/s",) and calls[0][2]["private"] is True and "token" not in calls[0][2]
    upload = calls[1][2]
    assert upload["repo_id"] == "someone/s" and upload["folder_path"] == str(tmp_path / "hf") and "token" not in upload
    assert "uploaded" in capsys.readouterr().out
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_a_bad_repo_name_is_refused_before_anything_is_written(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(run), str(tmp_path / "hf"), "--push_to_hub", "no spaces/allowed here"])
    assert stop.value.code == 2 and "not a Hub repository name" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
