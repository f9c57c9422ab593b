"""The T5 family as students: Flan-T5 (T5 v1.1 with its own LM head), mT5 (its own classes and the
real 250,112-token vocabulary, through the fused loss) and ByT5 (bytes as tokens), each built here with
random weights and saved as the hub's checkpoints are. Each trains in every mode (the five runs in one
process, at ZeRO-0 to 3: the ZeRO-3 run loads the saved weights slice by slice), evaluates, exports
a model card, and reloads with AutoModelForSeq2SeqLM into its own class, predicting what the run
predicted."""
import json
import sys

import pytest
import torch

from tests.conftest import child_env, greedy_outputs, run_in_own_session

MODES = {"standard": "zero0", "distill": "zero1", "single": "zero2", "dss": "zero3", "mi": "zero0"}
ARGS = ["--synthetic_train_size", "32", "--synthetic_eval_size", "4", "--batch_size", "8", "--eval_batch_size", "4",
        "--max_new_tokens", "8", "--max_target_length", "24", "--max_steps", "2", "--eval_every", "0",
        "--eval_rationales", "2", "--log_every", "1", "--lr", "1e-3"]
SHAPES = dict(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2, dropout_rate=0.0,
              feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# One process, the five runs in turn (imports, tokenizer and data once).
DRIVER = """
import sys
from cotmi_ds.cli import main
out, common = sys.argv[1], sys.argv[2:]
for mode, stage in {modes}.items():
    main(["train", "--mode", mode, "--ds_config", stage, "--output_dir", f"{{out}}/{{mode}}", *common])
""".format(modes=MODES)


def save_student(family: str, folder, tiny_tokenizer):
    """A tiny student of the family with random weights, saved with its tokenizer: (model, tokenizer)."""
    from transformers import ByT5Tokenizer, MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if family == "mt5":
        model, tokenizer = MT5ForConditionalGeneration(MT5Config(vocab_size=250112, **SHAPES)), tiny_tokenizer
    elif family == "byt5":
        tokenizer = ByT5Tokenizer()
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), tie_word_embeddings=False, **SHAPES))
    else:  # flan-t5: the T5 v1.1 architecture
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer), tie_word_embeddings=False, **SHAPES))
        tokenizer = tiny_tokenizer
    # A head of its own, as the published checkpoints have (transformers builds these tied).
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.mark.parametrize("family", ["flan-t5", "mt5", "byt5"])
def test_family_trains_in_every_mode_evaluates_exports_and_reloads(family, tmp_path, tiny_tokenizer, data_cache_dir):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    from cotmi_ds.data.encode import LABEL_PREFIX
    from cotmi_ds.modes import MODES as MODE_TABLE, generation_length, label_from_generation

    saved, tokenizer = save_student(family, tmp_path / "student", tiny_tokenizer)
    proc = run_in_own_session([sys.executable, "-c", DRIVER, str(tmp_path), "--model", str(tmp_path / "student"),
                               "--data_cache_dir", str(data_cache_dir), *ARGS],
                              cwd=tmp_path, env=child_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    start = {k: v for k, v in saved.state_dict().items()}
    for mode, stage in MODES.items():
        run = tmp_path / mode
        results = json.loads((run / "results.json").read_text())
        assert (results["mode"], results["steps"], results["zero_stage"]) == (mode, 2, int(stage[-1]))
        model = AutoModelForSeq2SeqLM.from_pretrained(run / "model")
        assert type(model) is type(saved) and model.config.model_type == saved.config.model_type
        assert model.config.vocab_size == saved.config.vocab_size
        assert model.lm_head.weight is not model.shared.weight  # the head stayed its own
        trained = load_file(run / "model" / "model.safetensors")
        assert any(not torch.equal(trained[k], start[k]) for k in trained), mode  # it trained
        card = ModelCard.load(run / "model" / "README.md")
        assert card.data.training["mode"] == mode and card.data.base_model is None  # a local folder
        assert f"{100 * results['accuracy_at_best_valid']:.2f}%" in card.text
        # The reloaded student generates what the run's final evaluation recorded.
        records = [json.loads(line) for line in (run / "predictions" / "step000002-test.jsonl").read_text().splitlines()]
        prefix = LABEL_PREFIX if MODE_TABLE[mode].prefixed else ""
        cap = generation_length(MODE_TABLE[mode], 8, 24)
        outputs = greedy_outputs(model, tokenizer, [prefix + r["input"] for r in records], cap, batch_size=4)
        assert [r["prediction"] for r in records] == [label_from_generation(t, MODE_TABLE[mode]) for t, _ in outputs]
