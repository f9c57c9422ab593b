"""Generation-based evaluation in one process: confidences, records, sharding arithmetic."""
import pytest
import torch

import cotmi_ds.evaluation.generate as evaluate
from cotmi_ds.data.collate import pad
from cotmi_ds.data.encode import encode_split
from cotmi_ds.data.synthetic import synthetic_splits
from cotmi_ds.distributed import DistEnv
from cotmi_ds.evaluation.rationale import rationale_scores


pytestmark = pytest.mark.usefixtures("one_thread")


def _env(rank=0, world_size=1):
    return DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                   device=torch.device("cpu"))


@pytest.fixture
def split(tiny_tokenizer):
    rows = synthetic_splits(32, 9, seed=0)["test"]
    return encode_split(rows, tiny_tokenizer, max_input_length=64, max_target_length=24)


def _greedy_texts(t5, tokenizer, inputs, max_new_tokens) -> list[str]:
    """Greedy generation one example at a time (no padding), as text: the reference for rationales."""
    with torch.no_grad():
        return [tokenizer.decode(t5.generate(input_ids=torch.tensor([x]), do_sample=False, num_beams=1,
                                             max_new_tokens=max_new_tokens)[0], skip_special_tokens=True).strip()
                for x in inputs]


def test_confidence_equals_a_teacher_forced_pass_over_the_output(tiny_t5, tiny_tokenizer, split):
    """generate's per-step logits give the same sequence probability as an independent forward pass."""
    eos = tiny_tokenizer.eos_token_id
    seqs, conf = evaluate.generate(tiny_t5, tiny_tokenizer, split["pred_input_ids"][:4], torch.device("cpu"),
                                   max_new_tokens=6, synced=False, eos_ids=[eos])
    got = conf["confidence"]
    ids, mask = pad(split["pred_input_ids"][:4], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_t5(input_ids=ids, attention_mask=mask, decoder_input_ids=seqs[:, :-1]).logits
    token_p = logits.double().softmax(-1).gather(-1, seqs[:, 1:, None]).squeeze(-1)
    expected = []
    for row, p in zip(seqs[:, 1:].tolist(), token_p):
        n = row.index(eos) + 1 if eos in row else len(row)
        expected.append(p[:n].prod().item())
    assert got == pytest.approx(expected, rel=1e-4)
    assert all(0 < c < 1 for c in got)
    # the released code's confidence: the first generated token's top probability
    assert conf["first_token_confidence"] == pytest.approx(logits[:, 0].softmax(-1).max(-1).values.tolist(),
                                                           rel=1e-5)


def test_confidence_stops_at_the_first_eos():
    eos, vocab = 1, 5
    torch.manual_seed(0)
    step_logits = tuple(torch.randn(2, vocab) for _ in range(4))
    # Row 0 stops (EOS) after 2 tokens and is padded; row 1 never stops.
    seqs = torch.tensor([[0, 3, eos, 0, 0], [0, 3, 4, 2, 3]])
    p = [lg.double().softmax(-1) for lg in step_logits]
    expected = [p[0][0, 3] * p[1][0, eos],
                p[0][1, 3] * p[1][1, 4] * p[2][1, 2] * p[3][1, 3]]
    got = evaluate.sequence_confidence(seqs, step_logits, [eos])
    assert got == pytest.approx([e.item() for e in expected], rel=1e-6)
    with pytest.raises(RuntimeError, match="3 steps of logits for 4 generated tokens"):
        evaluate.sequence_confidence(seqs, step_logits[:3], [eos])


def test_records_metrics_and_rationales(varied_t5, tiny_tokenizer, split):
    tiny_t5 = varied_t5  # outputs differ between the two prompts
    always_right = evaluate.evaluate_split(tiny_t5, tiny_tokenizer, split, _env(), batch_size=4, max_new_tokens=6,
                                           synced=False, scorer=lambda p, g: True, rationales=2,
                                           rationale_max_new_tokens=5)
    recs, m = always_right.records, always_right.metrics
    assert [r["index"] for r in recs] == list(range(9))
    assert [r["input"] for r in recs] == split["input"]
    assert [r["gold"] for r in recs] == [g.strip() for g in split["label"]]
    assert [r["rationale"] for r in recs] == _greedy_texts(tiny_t5, tiny_tokenizer, split["expl_input_ids"][:2], 5) + [None] * 7
    assert m["accuracy"] == 1.0 and m["correct"] == 9 and m["total"] == 9
    # the two generated rationales scored against the first two teacher rationales
    assert {k: m[k] for k in ("rationale_bleu", "rationale_chrf", "rationale_examples")} == rationale_scores(
        [r["rationale"] for r in recs[:2]], split["rationale"][:2])
    assert m["rationale_generation_s"] > 0
    # Everything right: every bin's gap is 1 - its confidence, so both ECEs are 1 - average confidence.
    assert m["ece_equal_width"] == pytest.approx(1 - m["avg_confidence"])
    assert m["ece_equal_mass"] == pytest.approx(1 - m["avg_confidence"])
    # Greedy generation one example at a time gives the same predictions as the padded batches.
    for r, x in zip(recs, split["pred_input_ids"]):
        out = tiny_t5.generate(input_ids=torch.tensor([x]), do_sample=False, num_beams=1, max_new_tokens=6)
        assert r["prediction"] == tiny_tokenizer.decode(out[0], skip_special_tokens=True).strip()

    exact = evaluate.evaluate_split(tiny_t5, tiny_tokenizer, split, _env(), batch_size=4, max_new_tokens=6,
                                    synced=False)
    assert not any(k.startswith("rationale") for k in exact.metrics)  # no rationales, no scores
    assert exact.metrics["correct"] == sum(r["prediction"] == r["gold"] for r in exact.records)


@pytest.mark.parametrize("batch_size, rationales", [(2, 3), (1, 3), (4, 0)])
def test_two_ranks_split_the_work_evenly_in_calls_and_exactly_in_examples(
        monkeypatch, varied_t5, tiny_tokenizer, split, batch_size, rationales):
    """Rank 1 runs first and its records are handed to rank 0's gather, as all_gather would. Both ranks
    must make the same number of generate calls (ZeRO-3 needs every rank in every forward) although
    9 examples split 5/4."""
    tiny_t5 = varied_t5  # outputs differ between the two prompts
    calls = {}
    real_generate = evaluate.generate
    stash = {}

    class Gathered(Exception):
        pass

    def run(rank):
        calls[rank] = []
        monkeypatch.setattr(evaluate, "generate",
                            lambda *a, **k: calls[rank].append(len(a[2])) or real_generate(*a, **k))
        return evaluate.evaluate_split(tiny_t5, tiny_tokenizer, split, _env(rank, 2), batch_size=batch_size,
                                       max_new_tokens=5, synced=False, rationales=rationales,
                                       rationale_max_new_tokens=4)

    def gather_rank1(obj, env):
        stash[1] = obj
        raise Gathered

    monkeypatch.setattr(evaluate, "all_gather_objects", gather_rank1)
    with pytest.raises(Gathered):
        run(1)
    monkeypatch.setattr(evaluate, "all_gather_objects", lambda obj, env: [obj, stash[1]])
    result = run(0)
    assert len(calls[0]) == len(calls[1]) > 0
    assert len(stash[1][0]) == 4  # 9 examples dealt 5/4
    assert [r["index"] for r in result.records] == list(range(9))  # the split's order
    assert result.metrics["total"] == 9
    assert [r["rationale"] for r in result.records] == (
        _greedy_texts(tiny_t5, tiny_tokenizer, split["expl_input_ids"][:rationales], 4) + [None] * (9 - rationales))


def test_a_doubled_example_is_an_error_not_a_miscount(monkeypatch, tiny_t5, tiny_tokenizer, split):
    monkeypatch.setattr(evaluate, "all_gather_objects", lambda obj, env: [obj, (obj[0][:1], {})])
    with pytest.raises(RuntimeError, match="exactly once"):
        evaluate.evaluate_split(tiny_t5, tiny_tokenizer, split, _env(), batch_size=4, max_new_tokens=4, synced=False)


def test_shards_are_length_sorted_and_cover_every_example_once():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    shards = [evaluate.shard(lengths, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))
    assert shards == [[1, 6, 0, 2], [3, 4, 5]]  # 9, 9, 7, 5, 3, 2, 1 dealt in turn; ties in split order
    for mine in shards:
        assert [lengths[i] for i in mine] == sorted((lengths[i] for i in mine), reverse=True)


def test_mode_single_reads_the_label_back_from_the_generated_text(varied_t5, tiny_tokenizer, split):
    """What a run in mode single evaluates with (its evaluation settings): the prediction is the
    text after the last separator of the greedy output, '' when there is none."""
    from cotmi_ds.config import load_config
    from cotmi_ds.modes import MODES, label_from_generation

    settings = evaluate.evaluation_settings(load_config(mode="single", max_new_tokens=6, max_target_length=6,
                                                        eval_batch_size=4))
    result = evaluate.evaluate_split(varied_t5, tiny_tokenizer, split, _env(), synced=False, **settings)
    raw = _greedy_texts(varied_t5, tiny_tokenizer, split["pred_input_ids"], settings["max_new_tokens"])
    assert all(raw)  # there is text to read the label from
    assert [r["prediction"] for r in result.records] == [label_from_generation(t, MODES["single"]) for t in raw]
    assert label_from_generation("x So the answer is ( 1 + 2 )", MODES["single"]) == "( 1 + 2 )"


def test_a_stop_request_ends_a_long_generation_and_nothing_generated_after_it_is_scored(tiny_t5, tiny_tokenizer,
                                                                                         split):
    """The untrained model never writes EOS: a 10,000-token cap would take minutes. Once ``stop`` says
    so, generation ends after the current token, and the check after the last batch abandons the
    evaluation before anything is scored."""
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 3

    sequences, _ = evaluate.generate(tiny_t5, tiny_tokenizer, split["pred_input_ids"][:2], torch.device("cpu"),
                                     max_new_tokens=10_000, synced=False, stop=stop)
    assert sequences.shape[1] == 1 + 4  # the decoder start, then four tokens: stopped after the fourth

    class Abandoned(Exception):
        pass

    checks = []

    def before_batch():
        checks.append(len(asked))
        if len(asked) > 3:
            raise Abandoned
    asked.clear()
    with pytest.raises(Abandoned):
        evaluate.evaluate_split(tiny_t5, tiny_tokenizer, split, _env(), batch_size=64, max_new_tokens=10_000,
                                synced=False, before_batch=before_batch, stop=stop)
    assert checks == [0, 4]  # before the one batch, and after it: the stop is seen before scoring
