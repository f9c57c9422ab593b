"""`cotmi eval --checkpoint DIR`: evaluate a saved student without training.

What DIR can be (``resolve_checkpoint`` decides, before any heavy import):
- ``run``: a training run directory (its ``config.yaml`` and the exported ``model/``): the data, seed and
  evaluation settings come from the run's config; a few evaluation flags may override them.
- ``hf``: a Hugging Face model folder (``config.json`` + weights, a T5 or mT5): the dataset and everything
  else come from flags (or ``--config``), as for ``cotmi train``.
A DeepSpeed checkpoint directory would be one more kind here: resolve it to a config and a way to
load the weights, then evaluate the same way.

Results go to ``eval_results.json`` (never a run's ``results.json``) and the predictions to
``predictions/eval-{split}.jsonl``, in ``--output_dir`` or else in DIR itself (a run directory) or in
``DIR-eval`` beside a model folder (which stays what ``save_pretrained`` wrote).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotmi_ds.config import TrainConfig, load_config
from cotmi_ds.data.datasets import check_data_files
from cotmi_ds.errors import UsageError
from cotmi_ds.files import read_json
from cotmi_ds.model.family import check_model_type
from cotmi_ds.model.weights import WEIGHT_FILES, check_weight_files

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")
# Flags that may change how a run directory is evaluated; its data and model come from its config.
RUN_EVAL_FLAGS = ("eval_batch_size", "max_new_tokens", "eval_rationales", "max_target_length", "dist_timeout_s")


@dataclass(frozen=True)
class Checkpoint:
    kind: str              # "run" or "hf"
    path: Path             # what the user named
    model_dir: Path        # a from_pretrained folder
    config_file: Path | None = None  # the run's config.yaml (kind "run")


def _check_hf_folder(folder: Path, flag: str) -> None:
    config = folder / "config.json"
    try:
        data = read_json(config)
    except (OSError, UsageError) as e:
        raise UsageError(f"{flag} {folder}: {config.name} is not a readable model config ({e})") from None
    check_model_type(data.get("model_type") if isinstance(data, dict) else None, f"{flag} {folder}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"{flag} {folder}: config.json but no weights ({', '.join(WEIGHT_FILES)})")
    check_weight_files(folder, flag)


def resolve_checkpoint(spec: Any) -> Checkpoint:
    """Decide what DIR is, or raise one UsageError line saying why it cannot be evaluated."""
    if spec is None or spec is True or str(spec).strip() == "":
        raise UsageError("cotmi eval needs --checkpoint DIR (a run directory or a Hugging Face model folder)")
    path = Path(str(spec)).expanduser()
    flag = "--checkpoint"
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: not a directory")
    if not any(path.iterdir()):
        raise UsageError(f"{flag} {path}: the directory is empty")
    if (path / "config.yaml").is_file():
        model_dir = path / "model"
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"{flag} {path}: a run directory without an exported model/ "
                             "(did the run finish?)")
        _check_hf_folder(model_dir, flag)
        return Checkpoint("run", path, model_dir, path / "config.yaml")
    if (path / "config.json").is_file():
        _check_hf_folder(path, flag)
        return Checkpoint("hf", path, path)
    raise UsageError(f"{flag} {path}: neither a run directory (config.yaml + model/) nor a Hugging Face "
                     "model folder (config.json + weights)")


def eval_config(ckpt: Checkpoint, config: str | None, flags: dict[str, Any]) -> tuple[TrainConfig, TrainConfig]:
    """(the config describing the run, the config to evaluate with). They differ for a run directory:
    the model and tokenizer are then read from its exported model/ folder."""
    if ckpt.kind == "run":
        if config is not None:
            raise UsageError(f"--config: a run directory brings its own ({ckpt.config_file})")
        extra = sorted(set(flags) - set(RUN_EVAL_FLAGS))
        if extra:
            raise UsageError(f"--{extra[0]}: a run directory's data and model come from its config.yaml; "
                             f"only {', '.join('--' + f for f in RUN_EVAL_FLAGS)} apply (to evaluate its "
                             f"model on other data, pass --checkpoint {ckpt.model_dir})")
        try:  # the run's own file first, so that its errors name it
            load_config(str(ckpt.config_file))
        except UsageError as e:
            raise UsageError(str(e) if str(e).startswith(str(ckpt.config_file))
                             else f"{ckpt.config_file}: {e}") from None
        run_cfg = check_data_files(load_config(str(ckpt.config_file), **flags))
        cfg = dataclasses.replace(run_cfg, model=str(ckpt.model_dir), tokenizer=str(ckpt.model_dir))
        return run_cfg, cfg
    if "model" in flags:
        raise UsageError(f"--model: the model is the checkpoint ({ckpt.path})")
    if "tokenizer" not in flags and not any((ckpt.path / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"--checkpoint {ckpt.path}: the folder holds no tokenizer; pass --tokenizer NAME_OR_PATH")
    cfg = check_data_files(load_config(config, model=str(ckpt.path), **flags))
    return cfg, cfg


def output_dir_for(ckpt: Checkpoint, output_dir: Any) -> Path:
    if output_dir is not None:
        out = Path(str(output_dir)).expanduser()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output_dir {out}: exists and is not a directory")
        return out
    if ckpt.kind == "run":
        return ckpt.path
    beside = ckpt.path.resolve().with_name(ckpt.path.resolve().name + "-eval")
    if beside.exists() and not beside.is_dir():
        raise UsageError(f"{beside} (where the results of --checkpoint {ckpt.path} go) exists and is not a "
                         "directory; pass --output_dir DIR")
    return beside


def run_eval(ckpt: Checkpoint, run_cfg: TrainConfig, cfg: TrainConfig, out_dir: Path) -> dict:
    """Generate, score and write, on one or more ranks (torchrun/deepspeed work as for training)."""
    import torch

    from cotmi_ds.data.pipeline import prepare_data
    from cotmi_ds.console import quiet_libraries
    from cotmi_ds.distributed import init_distributed, shutdown
    from cotmi_ds.evaluation.generate import evaluate_split, evaluation_settings
    from cotmi_ds.model.student import build_student
    from cotmi_ds.evaluation.results import run_metadata
    from cotmi_ds.files import write_json_atomic, write_jsonl_atomic

    env = init_distributed(cfg.dist_timeout_s, cfg.flush_subnormals)
    quiet_libraries(env)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, env)
    t5 = build_student(cfg, data.tokenizer).to(env.device).eval()
    t0 = time.perf_counter()
    results: dict[str, Any] = {"checkpoint": str(ckpt.path), "checkpoint_kind": ckpt.kind, **run_metadata(run_cfg)}
    with torch.no_grad():
        for split in ("valid", "test"):
            result = evaluate_split(t5, data.tokenizer, data.splits[split], env, synced=False,
                                    **evaluation_settings(cfg))
            if env.is_main:
                write_jsonl_atomic(out_dir / "predictions" / f"eval-{split}.jsonl", result.records)
            results[split] = result.metrics
            if env.is_main:
                m = result.metrics
                rationales = (f", rationale_bleu {m['rationale_bleu']:.2f}, rationale_chrf {m['rationale_chrf']:.2f} "
                              f"({m['rationale_examples']} rationales)" if "rationale_bleu" in m else "")
                print(f"{split}: accuracy {m['accuracy']:.4f} ({m['correct']}/{m['total']}), "
                      f"ece_equal_mass {m['ece_equal_mass']:.4f}, ece_equal_width {m['ece_equal_width']:.4f}, "
                      f"avg_confidence {m['avg_confidence']:.4f}, first_token_ece_equal_mass "
                      f"{m['first_token_ece_equal_mass']:.4f}{rationales}", flush=True)
    results["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if env.is_main:
        write_json_atomic(out_dir / "eval_results.json", results)
        print(f"wrote {out_dir / 'eval_results.json'} and {out_dir / 'predictions'}/eval-{{valid,test}}.jsonl",
              flush=True)
    shutdown()
    return results
