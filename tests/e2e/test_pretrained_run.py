"""`cotmi train --model FOLDER`: a saved T5 trained from its own weights, with its dropout."""
import json

from transformers import T5ForConditionalGeneration

from tests.conftest import run_cotmi
from tests.tb import read_scalars
from tests.unit.test_pretrained import SMALL


def test_train_from_a_saved_pretrained_model_with_its_dropout_active(tiny_t5, tiny_tokenizer, tmp_path):
    """from_pretrained returns the model in eval mode: training must switch dropout on (as the
    release's Trainer does), or a T5 v1.1 student trains without its dropout of 0.1."""
    src = tmp_path / "my-t5"
    tiny_t5.config.dropout_rate = 0.3
    tiny_t5.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "run"
    # One global batch of 8 rows and a learning rate too small to change the loss: in eval mode
    # every step's loss would be the same; dropout makes each step's differ.
    flags = dict(zip(SMALL[::2], SMALL[1::2]), **{"--synthetic_train_size": "8", "--lr": "1e-7"})
    proc = run_cotmi(["train", "--model", str(src), *[x for kv in flags.items() for x in kv], "--max_steps", "6",
                      "--log_every", "1", "--eval_every", "0", "--output_dir", str(out), "--mode", "dss"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # The start-up says which rate and why, and that this one is far below a pretrained T5's.
    assert "lr 1e-7: as given (the default for a pretrained student is 5e-5)" in proc.stdout
    assert "warning: --lr 1e-7 is outside the rates used to fine-tune a pretrained T5 (1e-5 to 1e-3)" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(src) and results["steps"] == 6 and results["mode"] == "dss"
    losses = [v for _, v in read_scalars(out / "tb")["loss/total"]]
    assert len(losses) == 6 and max(losses) - min(losses) > 1e-2 * max(losses)
    trained = T5ForConditionalGeneration.from_pretrained(out / "model")
    assert trained.config.d_model == tiny_t5.config.d_model and trained.config.dropout_rate == 0.3
    # It trained: the weights moved away from the saved starting point.
    delta = sum((a - b).abs().sum().item() for a, b in zip(trained.parameters(), tiny_t5.parameters()))
    assert delta > 0
