"""`cotmi eval --checkpoint DIR` refuses what is not a checkpoint, in one line (the evaluations
themselves: tests/e2e/test_eval_command.py)."""
import pytest

from tests.conftest import run_cotmi


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such directory"),
    (lambda d: d.mkdir(), "the directory is empty"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")),
     "neither a run directory (config.yaml + model/) nor a Hugging Face model folder (config.json + weights)"),
    (lambda d: (d.mkdir(), (d / "config.yaml").write_text("seed: 1\n")),
     "a run directory without an exported model/ (did the run finish?)"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{")), "config.json is not a readable model config"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "gpt2"}')),
     "is a 'gpt2' model; the student must be a T5"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "t5"}')), "config.json but no weights"),
])
def test_bad_checkpoints_exit_2_with_one_line(setup, message, tmp_path):
    target = tmp_path / "ckpt"
    setup(target)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = run_cotmi(["eval", "--checkpoint", str(target)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cotmi: error: --checkpoint {target}: {message}"), proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_results_go_beside_a_model_folder_never_into_it(tmp_path):
    """A model folder stays what save_pretrained wrote: by default its evaluation goes to DIR-eval."""
    from cotmi_ds.errors import UsageError
    from cotmi_ds.evaluation.command import Checkpoint, output_dir_for

    run = tmp_path / "run"
    model = Checkpoint("hf", run / "model", run / "model")
    assert output_dir_for(model, None) == run / "model-eval"
    assert output_dir_for(model, str(tmp_path / "mine")) == tmp_path / "mine"
    assert output_dir_for(Checkpoint("run", run, run / "model", run / "config.yaml"), None) == run
    run.mkdir()
    (run / "model-eval").write_text("not a folder")
    with pytest.raises(UsageError, match=r"model-eval \(where the results of --checkpoint .* go\) exists and is not "
                                         r"a directory; pass --output_dir DIR$"):
        output_dir_for(model, None)
