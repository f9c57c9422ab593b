"""A scratch student built at ZeRO-3 (zero.Init, each rank initialising only its own slices) has
T5's initialisation: per weight, the distribution a plain build gives. On one rank the slice is the
whole weight, so the statistics can be compared directly; the 2-rank launch in
tests/distributed/test_fused_zero3.py checks that the ranks' slices do not repeat each other."""
import pytest
import torch
from transformers import T5Config

from cotmi_ds.model.student import construct, zero3_construction

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)


def test_zero3_scratch_build_has_t5_initialisation_in_every_weight(one_rank):
    import deepspeed

    config = T5Config(**CONFIG, tie_word_embeddings=False)  # as the trainer asks for a scratch student
    torch.manual_seed(0)
    plain_t5 = construct(config)
    plain = plain_t5.state_dict()
    torch.manual_seed(0)
    rng_before = torch.random.get_rng_state()
    with zero3_construction({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
        t5 = construct(config)
    # The build draws from a stream of its own: the caller's random state is left as it was.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(p.numel() == 0 for p in t5.parameters())  # partitioned as created
    # Tied as a plain build ties it (transformers 5.x ties every T5 built from a config).
    assert (t5.lm_head.weight is t5.shared.weight) is (plain_t5.lm_head.weight is plain_t5.shared.weight)
    with deepspeed.zero.GatheredParameters(list(t5.parameters())):
        built = {k: v.detach().clone() for k, v in t5.state_dict().items()}
    assert built.keys() == plain.keys()
    for name, w in plain.items():
        b = built[name]
        assert b.shape == w.shape and torch.isfinite(b).all(), name
        if w.std() == 0:  # layer norms: a constant
            assert torch.equal(b, w), name
            continue
        # Each normal weight: the plain build's scale (to sampling error: >= 2,048 elements each) ...
        assert b.std().item() == pytest.approx(w.std().item(), rel=0.1), name
        assert abs(b.mean().item()) < 4 * w.std().item() / b.numel() ** 0.5, name
        # ... and drawn anew, not the plain build's values.
        assert not torch.equal(b, w), name
