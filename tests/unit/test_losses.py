"""The reference losses against hand computation and against HF's own T5 loss."""
import math

import pytest
import torch
from torch import nn

from cotmi_ds.config import load_config
from cotmi_ds.losses.reference import mi_paper, token_ce
from cotmi_ds.model.student import DistillModel


def logits_of(*probs):
    """Logits whose softmax is exactly ``probs`` (one row per position)."""
    return torch.tensor([[math.log(p) for p in row] for row in probs], dtype=torch.float64)


def test_mi_matches_hand_computed_example():
    # B = 1, V = 3. Label pass: two positions; rationale pass: two positions.
    z_lab = logits_of([0.5, 0.3, 0.2], [0.1, 0.6, 0.3])[None]   # p̄ = max over t = [0.5, 0.6, 0.3]
    z_rat = logits_of([0.2, 0.2, 0.6], [0.7, 0.1, 0.2])[None]   # q̄ = [0.7, 0.2, 0.6]
    # log_softmax(q̄) = q̄ - lse with lse = ln(e^0.7 + e^0.2 + e^0.6) = 1.6208277
    # L = -Σ p̄ (q̄ - lse) = lse·Σp̄ - Σ p̄·q̄ = 1.6208277 · 1.4 - (0.35 + 0.12 + 0.18) = 1.6191587
    lse = math.log(math.exp(0.7) + math.exp(0.2) + math.exp(0.6))
    by_hand = -(0.5 * (0.7 - lse) + 0.6 * (0.2 - lse) + 0.3 * (0.6 - lse))
    assert by_hand == pytest.approx(1.6191587, abs=1e-6)
    assert mi_paper(z_lab, z_rat).item() == pytest.approx(by_hand, abs=1e-6)


def test_mi_is_the_released_cross_entropy_form_and_averages_over_batch():
    torch.manual_seed(0)
    z_lab, z_rat = torch.randn(3, 4, 11), torch.randn(3, 6, 11)
    p_bar = torch.max(z_lab.softmax(-1), dim=-2)[0]
    q_bar = torch.max(z_rat.softmax(-1), dim=-2)[0]
    released = nn.CrossEntropyLoss()(q_bar, p_bar)  # the released code's line
    assert mi_paper(z_lab, z_rat).item() == pytest.approx(released.item(), rel=1e-6)
    per_example = [mi_paper(z_lab[i:i + 1], z_rat[i:i + 1]).item() for i in range(3)]
    assert mi_paper(z_lab, z_rat).item() == pytest.approx(sum(per_example) / 3, rel=1e-6)


def test_mi_counts_padded_positions_and_feeds_probabilities_as_logits():
    """The paper quirks: a padded position can hold the max, and p̄ is not normalised."""
    z_lab = logits_of([0.5, 0.3, 0.2], [0.1, 0.6, 0.3])[None]
    z_rat = logits_of([0.2, 0.2, 0.6], [0.7, 0.1, 0.2])[None]
    base = mi_paper(z_lab, z_rat)
    # Append a third rationale position (as if padding) that is extreme in token 1.
    z_rat_padded = torch.cat([z_rat, logits_of([0.05, 0.9, 0.05])[None]], dim=1)
    assert mi_paper(z_lab, z_rat_padded).item() != pytest.approx(base.item(), abs=1e-4)
    # Target mass sums to 1.4 here (not 1): scaling it scales the loss.
    p_sum = torch.max(z_lab.softmax(-1), dim=-2)[0].sum().item()
    assert p_sum == pytest.approx(1.4)


def test_mi_gradient_reaches_only_the_rationale_logits_at_argmax_positions():
    torch.manual_seed(1)
    z_lab = torch.randn(2, 3, 7, requires_grad=True)
    z_rat = torch.randn(2, 5, 7, requires_grad=True)
    mi_paper(z_lab, z_rat).backward()
    assert z_lab.grad is None or torch.count_nonzero(z_lab.grad) == 0
    assert torch.count_nonzero(z_rat.grad) > 0


def test_token_ce_ignores_minus_100_and_equals_hf_t5_loss(tiny_t5, tiny_tokenizer):
    torch.manual_seed(0)
    ids = torch.randint(3, len(tiny_tokenizer), (2, 9))
    labels = torch.randint(3, len(tiny_tokenizer), (2, 5))
    labels[1, 3:] = -100
    out = tiny_t5(input_ids=ids, labels=labels)
    assert token_ce(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-6)
    # Masked positions do not matter.
    noisy = out.logits.clone()
    noisy[1, 3:] = 1e3
    assert token_ce(noisy, labels).item() == pytest.approx(out.loss.item(), rel=1e-6)


def _batch(tok):
    from cotmi_ds.data.collate import collate
    from cotmi_ds.data.encode import encode_split
    from cotmi_ds.data.synthetic import synthetic_splits

    ds = encode_split(synthetic_splits(4, 1, 0)["train"], tok, 64, 64)
    return collate(ds[[0, 1, 2, 3]], tok.pad_token_id, with_rationale=True)


@pytest.mark.parametrize("mode", ["dss", "mi"])
def test_distill_model_combines_parts_as_the_mode_says(mode, tiny_t5, tiny_tokenizer):
    cfg = load_config(mode=mode, alpha=0.3, beta=0.7)
    model = DistillModel(tiny_t5, cfg)
    batch = _batch(tiny_tokenizer)
    parts = model(batch)
    expected = 0.3 * parts["label_ce"] + 0.7 * parts["rationale_ce"]
    if mode == "mi":
        expected = expected + 0.7 * parts["mi"]
    else:
        assert "mi" not in parts
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # Each part equals what HF's T5 computes for that task on its own.
    lab = tiny_t5(input_ids=batch["pred_input_ids"], attention_mask=batch["pred_attention_mask"],
                  labels=batch["labels"])
    rat = tiny_t5(input_ids=batch["expl_input_ids"], attention_mask=batch["expl_attention_mask"],
                  labels=batch["rationale_labels"])
    assert parts["label_ce"].item() == pytest.approx(lab.loss.item(), rel=1e-5)
    assert parts["rationale_ce"].item() == pytest.approx(rat.loss.item(), rel=1e-5)
    if mode == "mi":
        assert parts["mi"].item() == pytest.approx(mi_paper(lab.logits, rat.logits).item(), rel=1e-5)
