"""The model card written into every export (``README.md`` beside the weights): the Hugging Face Hub's
format, YAML metadata then Markdown, made with huggingface_hub's ``ModelCard`` and ``ModelCardData``.

Metadata: the base model (a hub name; none for a student built from scratch or a local folder), the
dataset, the teacher whose chains of thought were distilled, the mode and loss weights, and the
results as the Hub's ``model-index`` (test accuracy, calibration, rationale scores). The text: what the
student is, how to prompt it, the training settings, the results table and the command that
reproduces the run.
"""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cotmi_ds.config import TrainConfig
from cotmi_ds.modes import MODES, SINGLE_SEPARATOR, label_type_of

CARD = "README.md"
# Whose chains of thought the built-in datasets hold (docs/datasets.md).
TEACHERS = {
    "synthetic": "none: the embedded synthetic task writes its own rationales",
    "esnli": "PaLM 540B (few-shot chain of thought, from Distilling Step-by-Step's data release)",
    "anli1": "PaLM 540B (few-shot chain of thought, from Distilling Step-by-Step's data release)",
    "cqa": "PaLM 540B (few-shot chain of thought, from Distilling Step-by-Step's data release)",
    "svamp": "PaLM 540B (few-shot chain of thought, from Distilling Step-by-Step's data release)",
}
# Flags that say where a run lives, not what it trains: left out of the command that reproduces it.
WHERE_FLAGS = ("output_dir", "overwrite", "resume", "data_root", "data_cache", "data_cache_dir")
PAPER = "Chen et al., *Improve Chain-of-Thought Distillation via Mutual Information Maximization*, ACL 2024 Findings"
MODE_TEXT = {
    "standard": "fine-tuned on the gold labels alone",
    "distill": "fine-tuned on the teacher's labels alone",
    "single": "trained on one target per example: the teacher's rationale, then the label",
    "dss": "trained on two tasks, the label and the teacher's rationale (Distilling Step-by-Step)",
    "mi": f"trained on two tasks, the label and the teacher's rationale, tied by a mutual-information term ({PAPER})",
}


def reproduce_command(config: dict[str, Any]) -> str:
    """`cotmi train` with every setting that differs from the defaults (where the run lived aside)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    flags = [f"--{k} {shlex.quote(str(v))}" for k, v in config.items()
             if k in defaults and k not in WHERE_FLAGS and v != defaults[k]]
    return "cotmi train " + " ".join(flags) if flags else "cotmi train"


def _hub_name(model: str) -> str | None:
    """A hub model id (namespace/name, nothing on disk by that name), else None."""
    if model == "scratch" or Path(model).expanduser().exists() or model.startswith(("/", ".", "~")):
        return None
    return model


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _results_lines(results: dict[str, Any]) -> list[str]:
    """The last evaluation per split (accuracy, calibration, rationale scores), then the accuracies
    chosen across evaluations and the majority-label baseline."""
    last = results["evaluations"][-1]
    valid, test = last["valid"], last["test"]
    lines = [f"At the last evaluation (step {last['step']}):", "",
             "| | valid | test |", "|---|---|---|",
             f"| accuracy | {_pct(valid['accuracy'])} ({valid['correct']}/{valid['total']}) | "
             f"{_pct(test['accuracy'])} ({test['correct']}/{test['total']}) |"]
    for key, label in (("ece_equal_mass", "calibration error (ECE, equal-mass bins)"),
                       ("ece_equal_width", "calibration error (ECE, equal-width bins)"),
                       ("avg_confidence", "mean confidence")):
        lines.append(f"| {label} | {valid[key]:.4f} | {test[key]:.4f} |")
    if "rationale_bleu" in test:
        lines.append(f"| rationales against the teacher's: BLEU / chrF (first {test['rationale_examples']}) | "
                     f"{valid['rationale_bleu']:.1f} / {valid['rationale_chrf']:.1f} | "
                     f"{test['rationale_bleu']:.1f} / {test['rationale_chrf']:.1f} |")
    lines += ["", "| test accuracy | value |", "|---|---|",
              f"| at the best valid accuracy | {_pct(results['accuracy_at_best_valid'])} "
              f"(step {results['step_at_best_valid']}) |",
              f"| at the last evaluation | {_pct(results['accuracy_last'])} (step {results['step_last']}) |",
              f"| best of any evaluation | {_pct(results['accuracy_best_test'])} (step {results['step_best_test']}) |"]
    if "majority_label_test_accuracy" in results:
        lines.append(f"| always answering the most common training label | "
                     f"{_pct(results['majority_label_test_accuracy'])} |")
    return lines


def _eval_results(results: dict[str, Any], dataset: str):
    from huggingface_hub import EvalResult

    last = results["evaluations"][-1]["test"]
    metrics = [("accuracy", "test accuracy at the best valid accuracy", results["accuracy_at_best_valid"]),
               ("accuracy", "test accuracy at the last evaluation", results["accuracy_last"]),
               ("ece", "expected calibration error (equal-mass bins)", last["ece_equal_mass"])]
    metrics += [(name, f"test rationales' {name.removeprefix('rationale_')} against the teacher's", last[name])
                for name in ("rationale_bleu", "rationale_chrf") if name in last]
    return [EvalResult(task_type="text2text-generation", dataset_type=dataset, dataset_name=dataset,
                       dataset_split="test", metric_type=kind, metric_name=name, metric_value=round(float(value), 6))
            for kind, name, value in metrics]


def model_card(name: str, meta: dict[str, Any], results: dict[str, Any] | None):
    """The card of an export. ``meta``: the checkpoint's metadata (its config, world size, ZeRO stage,
    precision, step); ``results``: the run's results.json, or None (a checkpoint before the end of
    its run: the evaluations it had made so far, if any, are shown instead)."""
    from huggingface_hub import ModelCard, ModelCardData

    from cotmi_ds.evaluation.results import select_metrics

    config = {**TrainConfig().to_dict(), **meta.get("config", {})}  # (a setting added since: its default)
    dataset, mode = str(config["dataset"]), MODES[config["mode"]]
    evaluations = (results or {}).get("evaluations") or meta.get("trainer", {}).get("evaluations") or []
    shown = results if results is not None else ({**select_metrics(evaluations), "evaluations": evaluations}
                                                 if evaluations else None)
    label_type = label_type_of(SimpleNamespace(mode=mode.name, label_type=config.get("label_type")))
    weights = {"alpha": config["alpha"]} if mode.rationale_pass else {}
    if mode.mi:
        weights.update(beta=config["beta"], mi_variant=config["mi_variant"])
    teacher = TEACHERS.get(dataset, "as the dataset's own description names it")
    data = ModelCardData(
        base_model=_hub_name(str(config["model"])), datasets=[Path(dataset).name], library_name="transformers",
        pipeline_tag="text2text-generation", model_name=name,
        tags=["t5", "chain-of-thought", "distillation", "cotmi_ds", f"mode-{mode.name}"],
        eval_results=_eval_results(shown, Path(dataset).name) if shown else None,
        teacher=teacher, training={"mode": mode.name, **weights, "label_type": label_type, "steps": meta["step"]})

    student = "a small T5 built from scratch" if config["model"] == "scratch" else f"`{config['model']}`"
    label_input = '"predict: " + question' if mode.prefixed else "the question"
    use = f"The label is generated from {label_input}"
    if mode.rationale_pass:
        use += ', a rationale from "explain: " + question'
    if mode.single_target:
        use += f": the model writes a rationale, then `{SINGLE_SEPARATOR.strip()}` and the label"
    code_input = '"predict: " + question' if mode.prefixed else "question"
    lines = [f"# {name}", "",
             f"A student model starting from {student}, {MODE_TEXT[mode.name]}, on `{dataset}`, for "
             f"{meta['step']} steps with cotmi_ds (chain-of-thought distillation under DeepSpeed).", "",
             "## Use", "", use + ".", "",
             "```python",
             "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
             "",
             'tokenizer = AutoTokenizer.from_pretrained("MODEL_FOLDER_OR_REPO")',
             'model = AutoModelForSeq2SeqLM.from_pretrained("MODEL_FOLDER_OR_REPO")',
             f'inputs = tokenizer({code_input}, return_tensors="pt")',
             "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
             "```", "",
             "## Training", "",
             "| setting | value |", "|---|---|",
             f"| mode | `{mode.name}` |",
             *[f"| {k} | {v} |" for k, v in weights.items()],
             f"| training labels | {'the teacher' if label_type == 'llm' else 'gold'} (`--label_type {label_type}`) |",
             f"| teacher | {teacher} |",
             f"| steps | {meta['step']} |",
             f"| precision, ZeRO stage, ranks | {meta.get('precision', 'fp32')}, {meta.get('zero_stage')}, "
             f"{meta.get('world_size')} |",
             "", "## Results", ""]
    if shown is None:
        lines.append("None yet: the checkpoint was exported before its run's first evaluation.")
    else:
        if results is None:
            lines += [f"From the evaluations made up to this checkpoint (step {meta['step']}); its run had not "
                      "finished (no results.json).", ""]
        lines += _results_lines(shown)
    lines += ["", "## Reproduce", "", "```bash", reproduce_command(config), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
