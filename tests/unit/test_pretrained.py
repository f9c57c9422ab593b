"""The real-run loading path: --model/--tokenizer through from_pretrained, on a local save."""
import json

import pytest
from transformers import GPT2Config, T5ForConditionalGeneration

from cotmi_ds.config import load_config
from cotmi_ds.errors import UsageError
from cotmi_ds.model.student import build_student
from tests.conftest import TINY, reference_batches, run_cotmi
from tests.tb import read_scalars

# The scratch_* flags are refused with --model PATH: keep the data and batch ones.
SMALL = [x for i, x in enumerate(TINY) if not (x.startswith("--scratch_") or TINY[i - 1].startswith("--scratch_"))]


def test_a_pretrained_run_starts_from_the_saved_weights(tiny_t5, tiny_tokenizer, tmp_path, data_cache_dir):
    import torch

    # Weights no fresh initialisation would give (the trainer seeds torch with --seed 0 first).
    with torch.no_grad():
        for p in tiny_t5.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    src = tmp_path / "my-t5"
    tiny_t5.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "run"
    proc = run_cotmi(["train", "--model", str(src), *SMALL, "--max_steps", "6", "--log_every", "1",
                      "--eval_every", "0", "--output_dir", str(out), "--mode", "dss",
                      "--data_cache_dir", str(data_cache_dir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(src) and results["steps"] == 6 and results["mode"] == "dss"
    trained = T5ForConditionalGeneration.from_pretrained(out / "model")
    assert trained.config.d_model == tiny_t5.config.d_model
    # The run started from the saved weights: its first step's loss (computed before any update)
    # is the saved model's own loss on the run's first batch, part by part.
    from cotmi_ds.model.student import DistillModel

    cfg = load_config(str(out / "config.yaml"))
    _, (batches,) = reference_batches(cfg, tiny_t5.config)
    with torch.no_grad():
        expected = DistillModel(tiny_t5, cfg)(batches.next().batch)
    logged = read_scalars(out / "tb")
    assert set(expected) == {"label_ce", "rationale_ce", "total"}
    for part, value in expected.items():
        assert logged[f"loss/{part}"][0] == (1, pytest.approx(value.item(), rel=1e-5)), part
    # Then it trained: the weights moved away from the saved starting point.
    delta = sum((a - b).abs().sum().item() for a, b in zip(trained.parameters(), tiny_t5.parameters()))
    assert delta > 0


def test_a_non_t5_checkpoint_is_refused(tmp_path, tiny_tokenizer):
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="is a 'gpt2' model; the student must be a T5"):
        build_student(load_config(model=str(tmp_path)), tiny_tokenizer)


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path, tiny_tokenizer):
    from tests.conftest import tiny_t5_config

    tiny_t5_config(vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="the tokenizer has .* tokens but --model .* only 16 embeddings"):
        build_student(load_config(model=str(tmp_path)), tiny_tokenizer)


def test_zero3_construction_is_on_only_inside_and_only_for_stage_3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from cotmi_ds.model.student import zero3_construction

    for stage in (0, 2):
        with zero3_construction({"zero_optimization": {"stage": stage}}):
            assert not is_deepspeed_zero3_enabled()
    with zero3_construction(None):
        assert not is_deepspeed_zero3_enabled()
    with zero3_construction({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
        assert is_deepspeed_zero3_enabled()  # from_pretrained/_from_config build under zero.Init here
    assert not is_deepspeed_zero3_enabled()  # later models in the process (export, tests) are plain


def test_an_export_keeps_a_t5_v1_1_head_of_its_own(tmp_path):
    """T5 v1.1 checkpoints hold an LM head distinct from the embeddings; transformers >= 5 builds a T5
    tied. The exported model keeps both weights (a tied rebuild would overwrite one with the other)."""
    import torch
    from transformers import T5ForConditionalGeneration

    from cotmi_ds.checkpoint.export import t5_from_state
    from tests.conftest import tiny_t5_config

    config = tiny_t5_config(50)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in T5ForConditionalGeneration(config).state_dict().items()}
    state["lm_head.weight"] = torch.randn_like(state["shared.weight"])
    for own_head in (True, False):
        if not own_head:
            state["lm_head.weight"] = state["shared.weight"].clone()
        t5 = t5_from_state(config, state, where=tmp_path)
        assert (t5.lm_head.weight is not t5.shared.weight) == own_head
        t5.save_pretrained(tmp_path / f"out{own_head}")
        back = T5ForConditionalGeneration.from_pretrained(tmp_path / f"out{own_head}")
        for key in ("lm_head.weight", "shared.weight", "encoder.embed_tokens.weight"):
            assert torch.equal(back.state_dict()[key], state[key if key != "encoder.embed_tokens.weight" else "shared.weight"]), key


def test_a_student_saved_in_bf16_loads_with_fp32_weights(tiny_t5, tiny_tokenizer, tmp_path):
    """transformers >= 5 loads a checkpoint in the dtype it was saved in (dtype="auto"), and
    DeepSpeed does not cast an fp32 run's weights: a bf16-saved student would train in bf16 with
    no fp32 weights anywhere. The student is built in fp32 whatever the checkpoint stores (its bf16
    values, exactly)."""
    import copy

    import torch

    src = tmp_path / "bf16-t5"
    bf16 = copy.deepcopy(tiny_t5).to(torch.bfloat16)
    bf16.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    cfg = load_config(None, model=str(src), tokenizer=str(src))
    student = build_student(cfg, tiny_tokenizer)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    saved = dict(bf16.named_parameters())
    assert all(torch.equal(p, saved[name].float()) for name, p in student.named_parameters())


def test_a_byt5_tokenizer_folder_holds_no_vocabulary_file_and_loads(tmp_path):
    """ByT5's vocabulary is the bytes: its folder has only tokenizer_config.json (and special tokens),
    which the vocabulary check must let through where it refuses any other such folder."""
    from transformers import ByT5Tokenizer

    from cotmi_ds.data.tokenizer import VOCABULARY_FILES, load_tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path)
    assert not any((tmp_path / name).exists() for name in VOCABULARY_FILES)
    tok = load_tokenizer(str(tmp_path))
    assert tok.decode(tok("( 3 + 4 )")["input_ids"], skip_special_tokens=True) == "( 3 + 4 )"
