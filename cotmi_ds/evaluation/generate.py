"""Evaluation by greedy generation from the label prompt, sharded over ranks with exact counts.

For each example: the greedy label (``"predict: " + x``, special tokens skipped), whether it is correct
(the dataset's scorer, see scoring.py), its confidence (below), and for the first ``rationales``
examples a rationale generated from ``"explain: " + x``. Per split: accuracy; ECE and average
confidence of the sequence probability and, as the released code meant it, of the first generated
token's top probability (calibration.py); and for the rationales, BLEU and chrF against the
teacher's (rationale.py).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from cotmi_ds.data import task_kind
from cotmi_ds.data.collate import pad
from cotmi_ds.evaluation.calibration import calibration_metrics, first_token_calibration_metrics
from cotmi_ds.distributed import DistEnv, all_gather_objects
from cotmi_ds.evaluation.rationale import rationale_scores
from cotmi_ds.evaluation.scoring import Scorer, exact_match, scorer_for


class _StopWhen(StoppingCriteria):
    """Ends a generation after the current token once ``stop()`` says so (a stop request: the
    evaluation is then abandoned, so what was generated is never scored)."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(t5, tokenizer: PreTrainedTokenizerBase, inputs: list[list[int]], device: torch.device,
             max_new_tokens: int, synced: bool, eos_ids: list[int] | None = None,
             stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, dict[str, list[float]] | None]:
    """Greedy decoding: the generated decoder sequences (starting with the decoder start token, padded
    after EOS) and, if ``eos_ids`` is given, each sequence's two confidences: ``confidence``
    (``sequence_confidence``) and ``first_token_confidence`` (``first_token_confidence``).
    ``stop``: checked after every token; True ends the generation there."""
    ids, mask = pad(inputs, tokenizer.pad_token_id)
    out = t5.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False, num_beams=1,
                      max_new_tokens=max_new_tokens, synced_gpus=synced, return_dict_in_generate=True,
                      output_logits=eos_ids is not None,
                      stopping_criteria=StoppingCriteriaList([_StopWhen(stop)]) if stop is not None else None)
    if eos_ids is None:
        return out.sequences, None
    return out.sequences, {"confidence": sequence_confidence(out.sequences, out.logits, eos_ids),
                           "first_token_confidence": first_token_confidence(out.logits)}


def decode_labels(tokenizer: PreTrainedTokenizerBase, sequences) -> list[str]:
    return [s.strip() for s in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def generate_labels(t5, tokenizer: PreTrainedTokenizerBase, inputs: list[list[int]], device: torch.device,
                    max_new_tokens: int, synced: bool) -> list[str]:
    """Greedy decoding, as text (special tokens skipped, surrounding whitespace stripped)."""
    sequences, _ = generate(t5, tokenizer, inputs, device, max_new_tokens, synced)
    return decode_labels(tokenizer, sequences)


def _eos_ids(t5, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = getattr(t5.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def sequence_confidence(sequences: torch.Tensor, step_logits: tuple[torch.Tensor, ...],
                        eos_ids: list[int]) -> list[float]:
    """Probability the model assigns to its own generated sequence: the product of the per-token
    probabilities p(y_t | y_<t, x) of the generated tokens up to and including the first EOS (all
    generated tokens if it never stopped).

    ``step_logits[t]`` are generate's raw logits (before any logits processor) for the token at
    ``sequences[:, t + 1]``; they equal a teacher-forced forward pass over the output (tested), at no
    extra cost. Under synced ZeRO-3 generation a rank that is done records nothing more, so the
    logits and the sequences stay aligned.
    """
    targets = sequences[:, 1:]
    if len(step_logits) != targets.shape[1]:
        raise RuntimeError(f"{len(step_logits)} steps of logits for {targets.shape[1]} generated tokens")
    eos = torch.tensor(eos_ids, device=sequences.device)
    logp = torch.zeros(len(sequences), dtype=torch.float64, device=sequences.device)
    finished = torch.zeros(len(sequences), dtype=torch.bool, device=sequences.device)
    for t, logits in enumerate(step_logits):
        token = targets[:, t]
        token_logp = logits.float().log_softmax(-1).gather(1, token[:, None]).squeeze(1)
        logp += torch.where(finished, 0.0, token_logp.double())
        finished |= torch.isin(token, eos)
    return logp.exp().cpu().tolist()


def first_token_confidence(step_logits: tuple[torch.Tensor, ...]) -> list[float]:
    """The released code's confidence: the top softmax probability of the first generated token
    (from the same raw logits as ``sequence_confidence``)."""
    return step_logits[0].float().softmax(-1).max(-1).values.double().cpu().tolist()


def shard(lengths: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's example indices, in the order it generates them: all examples sorted by length,
    longest first (a batch too large for memory fails at once, not at the end), dealt round-robin
    over the ranks; consecutive runs of the result are the rank's batches."""
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    return by_length[rank::world_size]


@dataclass
class SplitResult:
    # accuracy, correct, total, ece_equal_mass, ece_equal_width, avg_confidence, first_token_* (the
    # released code's calibration), and with rationales rationale_bleu, rationale_chrf, rationale_examples,
    # label_generation_s and rationale_generation_s
    metrics: dict[str, float]
    records: list[dict]        # one per example, in the split's order (every rank holds all of them)


def evaluate_split(t5, tokenizer: PreTrainedTokenizerBase, split: Dataset, env: DistEnv, *,
                   batch_size: int, max_new_tokens: int, synced: bool, scorer: Scorer = exact_match,
                   rationales: int = 0, rationale_max_new_tokens: int = 256,
                   label_from_text: Callable[[str], str] | None = None,
                   before_batch: Callable[[], None] | None = None,
                   stop: Callable[[], bool] | None = None) -> SplitResult:
    """Accuracy and calibration of generated labels against the (decoded) gold labels.
    ``label_from_text`` reads the label out of the generated text (mode single, whose target is the
    rationale, a separator, then the label); the confidence is then that of the whole generation.
    ``synced``: ranks step generation together (required when parameters are ZeRO-3 partitioned
    over several ranks). ``before_batch`` is called on every rank before each ``generate`` call and
    once after the last (the same number of times on every rank): it may raise to abandon the
    evaluation, e.g. when the ranks agree to stop. ``stop``: this rank's own view of a stop request,
    checked between generated tokens: a long generation ends early and ``before_batch`` abandons
    the evaluation right after it (on a rank that did not see the request, at the end of its batch).

    Examples are batched by length (``shard``): each batch pads to nearly its own length, and the
    ranks, stepping together, get batches of like lengths. Every rank runs the same number of
    ``generate`` calls (a rank whose shard ran out repeats example 0 and keeps nothing), because under
    ZeRO-3 all ranks must take part in every forward, and generation is synced there so that a
    rank that is done keeps stepping until all are. The per-example records are gathered by index
    and returned in the split's order, and every index must arrive exactly once: nothing is
    dropped or doubled.
    """
    n = len(split)
    mine = shard([len(ids) for ids in split["pred_input_ids"]], env.rank, env.world_size)
    eos_ids = _eos_ids(t5, tokenizer)
    was_training = t5.training
    t5.eval()
    records: list[dict] = []
    t0 = time.perf_counter()
    calls = math.ceil(math.ceil(n / env.world_size) / batch_size)
    for call in range(calls):
        if before_batch is not None:
            before_batch()
        idx = mine[call * batch_size:(call + 1) * batch_size]
        rows = split[idx if idx else [0]]
        out, conf = generate(t5, tokenizer, rows["pred_input_ids"], env.device, max_new_tokens, synced, eos_ids,
                             stop)
        if not idx:
            continue
        preds, gold = decode_labels(tokenizer, out), decode_labels(tokenizer, rows["label_ids"])
        if label_from_text is not None:  # mode single: the label follows the rationale
            preds = [label_from_text(p) for p in preds]
        first_tokens = out[:, 1:2].tolist()
        for i, x, p, g, confidence, first, token, gold_ids in zip(idx, rows["input"], preds, gold, conf["confidence"],
                                                               conf["first_token_confidence"], first_tokens,
                                                               rows["label_ids"]):
            records.append({"index": i, "input": x, "gold": g, "prediction": p, "correct": bool(scorer(p, g)),
                            "confidence": confidence, "first_token_confidence": first, "rationale": None,
                            "_ties": (token, list(gold_ids))})  # how the release orders equal confidences

    t1 = time.perf_counter()
    # Rationales for the first `rationales` examples, sharded the same way.
    n_rat = min(rationales, n)
    my_rat = shard([len(ids) for ids in split[:n_rat]["expl_input_ids"]], env.rank, env.world_size) if n_rat else []
    rationale_of: dict[int, str] = {}
    for call in range(math.ceil(math.ceil(n_rat / env.world_size) / batch_size)):
        if before_batch is not None:
            before_batch()
        idx = my_rat[call * batch_size:(call + 1) * batch_size]
        rows = split[idx if idx else [0]]
        out, _ = generate(t5, tokenizer, rows["expl_input_ids"], env.device, rationale_max_new_tokens, synced,
                          stop=stop)
        for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
            rationale_of[i] = text.strip()
    if before_batch is not None:  # nothing generated after a stop request is scored
        before_batch()
    t5.train(was_training)
    seconds = {"label_generation_s": t1 - t0, "rationale_generation_s": time.perf_counter() - t1}

    # Rationales are sharded by their own lengths: a rank's rationales may belong to another's records.
    parts = all_gather_objects((records, rationale_of), env)
    rationale_of = {i: text for _, texts in parts for i, text in texts.items()}
    gathered = [r for part, _ in parts for r in part]
    for r in gathered:
        r["rationale"] = rationale_of.get(r["index"])
    gathered.sort(key=lambda r: r["index"])
    if [r["index"] for r in gathered] != list(range(n)):
        raise RuntimeError(f"evaluation gathered indices that do not cover 0..{n - 1} exactly once")
    correct = sum(r["correct"] for r in gathered)
    metrics = {"accuracy": correct / n if n else float("nan"), "correct": correct, "total": n}
    if n_rat:  # this rank's wall time for each kind of generation: what scoring rationales costs
        metrics.update(seconds)
    correct_flags = [r["correct"] for r in gathered]
    metrics.update(calibration_metrics([r["confidence"] for r in gathered], correct_flags))
    metrics.update(first_token_calibration_metrics([r["first_token_confidence"] for r in gathered], correct_flags,
                                                   [r.pop("_ties") for r in gathered]))
    # The first n_rat examples, scored against the teacher's rationales (the text column) where
    # there is one (your own data's valid and test may have none).
    if n_rat:
        pairs = [(r["rationale"], ref) for r, ref in zip(gathered[:n_rat], split[:n_rat]["rationale"])
                 if ref is not None]
        metrics.update(rationale_scores([h for h, _ in pairs], [ref for _, ref in pairs]))
    return SplitResult(metrics=metrics, records=gathered)


def evaluation_settings(cfg) -> dict:
    """``evaluate_split``'s keyword arguments for a run's config: batch size, the generation cap,
    the dataset's scorer, rationales (modes with a rationale pass), and for mode single the label
    read back from the generated text."""
    from cotmi_ds.modes import generation_length, label_from_generation, mode_of

    mode = mode_of(cfg)
    return {
        "batch_size": cfg.eval_batch_size,
        "max_new_tokens": generation_length(mode, cfg.max_new_tokens, cfg.max_target_length),
        "scorer": scorer_for(task_kind(cfg.dataset, cfg.task)),
        "rationales": cfg.eval_rationales if mode.rationale_pass else 0,
        "rationale_max_new_tokens": cfg.max_target_length,
        "label_from_text": (lambda text: label_from_generation(text, mode)) if mode.single_target else None,
    }


def majority_baseline(train: Dataset, test: Dataset, scorer: Scorer = exact_match) -> float:
    """Accuracy of always answering the most common training label (scored like the model's
    answers): the floor to beat."""
    label, _ = Counter(train["label"]).most_common(1)[0]
    return sum(scorer(label, y) for y in test["label"]) / len(test)
