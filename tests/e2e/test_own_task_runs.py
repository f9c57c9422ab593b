"""A task of your own, end to end as a user runs it: a folder of JSONL files with a manifest (the
layout `cotmi teach` writes), `cotmi train` in modes dss and mi on it, and one `cotmi report` over
both runs. Two training processes; the report runs in the test's own process."""
import json

from cotmi_ds.cli import main
from cotmi_ds.data.synthetic import synthetic_splits
from tests.conftest import TINY, run_cotmi


def write_task(root):
    """300 labelled questions with rationales and the teacher's labels (wrong for every tenth), and
    40 test questions, two of them without a rationale; no valid file (it is drawn from train)."""
    rows = synthetic_splits(300, 40, seed=3)
    root.mkdir()
    train = [dict(r, id=i, llm_label="( 0 + 0 )" if i % 10 == 0 else r["label"]) for i, r in enumerate(rows["train"])]
    test = [dict(r) for r in rows["test"]]
    for r in test[1:3]:
        del r["rationale"]
    for name, split in (("train", train), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))
    (root / "manifest.json").write_text(json.dumps({"task": "numeric", "name": "arith"}))


def test_dss_and_mi_on_a_folder_of_jsonl_files_then_one_report(tmp_path, data_cache_dir, capsys):
    data = tmp_path / "arith"
    write_task(data)
    runs = {}
    for mode in ("dss", "mi"):
        runs[mode] = tmp_path / "runs" / mode
        proc = run_cotmi(["train", "--dataset", str(data), "--mode", mode, "--output_dir", str(runs[mode]),
                          "--data_cache_dir", str(data_cache_dir), *TINY, "--max_steps", "8", "--eval_every", "4",
                          "--eval_rationales", "4", "--max_target_length", "24"], cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        assert f"data: arith from {data}: train 270, valid 30, test 40 rows; task numeric" in out
        assert "valid: 10% of the training rows (seed 0)" in out and "fields ignored: id" in out
        # mi encodes like dss: its run finds the entry dss wrote
        assert f"tokenized-data cache: {'written' if mode == 'dss' else 'hit'}" in out

        results = json.loads((runs[mode] / "results.json").read_text())
        assert (results["dataset"], results["dataset_name"], results["task"]) == (str(data), "arith", "numeric")
        split = results["data"]["splits"]
        assert (split["train"]["teacher_labelled"], split["test"]["teacher_labelled"]) == (270, 0)
        assert split["train"]["teacher_agree"] + split["valid"]["teacher_agree"] == 270  # 30 of 300 wrong
        assert (f"teacher label = gold: train {split['train']['teacher_accuracy']:.2%}, valid "
                f"{split['valid']['teacher_accuracy']:.2%}, test none\n") in out
        final = results["evaluations"][-1]
        assert (final["valid"]["total"], final["test"]["total"]) == (30, 40)
        # The first 4 test rationales were generated; the 2 without a teacher's rationale are not scored.
        assert final["test"]["rationale_examples"] == 2 and final["valid"]["rationale_examples"] == 4
        predictions = (runs[mode] / "predictions" / "step000008-test.jsonl").read_text().splitlines()
        assert len(predictions) == 40

    capsys.readouterr()
    main(["report", str(runs["dss"]), str(runs["mi"]), "--output_dir", str(tmp_path / "report")])
    table = capsys.readouterr().out
    assert "| mode | arith |" in table
    assert sum(line.startswith(("| dss | ", "| mi | ")) and line.endswith("(n=1) |") for line in table.splitlines()) == 2
