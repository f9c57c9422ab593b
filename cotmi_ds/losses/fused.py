"""The label CE, the rationale CE and the MI term from decoder hidden states and the LM-head weight,
chunk by chunk over positions, never holding [B, T, V] logits, softmax or their gradient (docs/method.md).

Forward, per chunk of positions (all B rows of a pass at once): logits = h·Wᵀ (a GEMM in the input
dtype: with bf16 inputs the logits come out rounded to bf16, as from HF's bf16 LM head; everything
after the GEMM runs in fp32), log-sum-exp, the CE terms, and for the MI term a running max over
positions of each (b, v)'s probability (``paper``) or log-probability (``masked``) with its arg-max
position t*(b, v). Then L_MI and its gradient from the [B, V] maxima. Backward recomputes each chunk's
logits and forms its gradient in place:

    dz_t = s_t · (w_ce·[t not ignored]/N − c_t) − (w_ce/N)·onehot(y_t) + a[b, v]·[t = t*(b, v)]

where s_t = softmax(z_t), a[b, v] is dL_MI/dz at the arg-max position only (``paper``:
s_t*[v]·dL/dq̄[b, v] = q̄[b, v]·dL/dq̄[b, v]; ``masked``: dL/dlog q̄[b, v]) and c_t = Σ_{v: t*(b, v) = t} a[b, v].
That is the softmax (resp. log-softmax) backward of a gradient that reaches only t*, as ``torch.max``
routes it in the reference. Then dh = dz·W and dW += dzᵀ·h; both GEMMs run in the input dtype, so
with bf16 inputs dz is rounded to bf16 for them and each chunk's dzᵀ·h comes out in bf16 before it is
added to the fp32 dW (HF's bf16 head rounds its whole dW to bf16 once). The MI gradient flows only through the
rationale pass; the label pass contributes its CE gradient and the detached target p̄.

Memory: one buffer of fp32 logits (``chunk_mib``; positions per chunk = chunk_mib MiB / (B·V·4 bytes),
at least one), vocabulary-major, shared by both passes, forward and backward, and kept from forward
to backward: it still holds the last chunk's softmax, which the backward uses instead of recomputing
it (one GEMM of the chunk saved). ``masked`` needs a second buffer during its forward. Besides: the
[B, V] maxima and arg-max positions, the [B, T] log-sum-exps and the outputs (dh, and dW accumulated
in fp32).
"""
from __future__ import annotations

import torch

from cotmi_ds.losses import MI_VARIANTS

IGNORE_INDEX = -100
# MiB of fp32 logits per chunk when none is given (docs/fused-loss.md): on CPUs GEMMs of fewer than
# ~256 rows run far below peak, larger chunks cost memory; GPUs want larger GEMMs.
DEFAULT_CHUNK_MIB = {"cpu": 32.0, "cuda": 256.0}


def default_chunk_mib(device: torch.device) -> float:
    return DEFAULT_CHUNK_MIB["cuda" if device.type == "cuda" else "cpu"]


def positions_per_chunk(batch: int, vocab: int, chunk_mib: float) -> int:
    return max(1, int(chunk_mib * 2**20) // (batch * vocab * 4))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 stays fp64 (the tests check the algorithm in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _logits(h: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """[B, c, d] -> fp32 logits [B·c, V], written into ``buffer`` (one flat buffer reused by every
    chunk: no allocator churn, a flat memory profile). The buffer holds them vocabulary-major
    ([V, B·c] contiguous; the result is its transpose): on CPUs W·hᵀ is up to 2x faster than h·Wᵀ for
    chunks of ~100 rows, and the backward's GEMMs read that layout as fast. The matmul runs in the
    input dtype (bf16 GEMMs accumulate in fp32)."""
    h_t = h.reshape(-1, h.shape[-1]).t().contiguous()  # [d, B·c]: small
    out = _chunk_view(buffer, h_t.shape[1], weight.shape[0])
    if h.dtype == out.dtype:
        torch.mm(weight, h_t, out=out)
    else:
        out.copy_(weight @ h_t)
    return out.t()


def _chunk_view(buffer: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """The first rows·V elements of the flat buffer as a contiguous [V, rows] matrix."""
    return buffer[: rows * vocab].view(vocab, rows)


def _per_position(z: torch.Tensor, batch: int) -> torch.Tensor:
    """Logits [B·c, V] (vocabulary-major, as ``_logits`` returns them) as a [V, B, c] view."""
    return z.t().view(z.shape[1], batch, -1)


def _chunks(T: int, chunk: int) -> list[tuple[int, int]]:
    return [(t0, min(T, t0 + chunk)) for t0 in range(0, T, chunk)]


@torch.no_grad()
def _scan(h, weight, labels, chunk, track: str | None, mask_padding: bool, buffer):
    """One pass forward. Returns (sum of token CEs, number of target tokens, log-sum-exp [B, T],
    and with ``track`` the per-(b, v) max over positions of the probability ("prob") or log-probability
    ("logprob") and its arg-max position). Afterwards ``buffer`` holds the last chunk's probabilities
    (log-probabilities for "logprob"), which the backward uses instead of recomputing them."""
    B, T, _ = h.shape
    V = weight.shape[0]
    acc = _acc_dtype(h.dtype)
    lse = torch.empty(B, T, dtype=acc, device=h.device)
    ce_sum = torch.zeros((), dtype=acc, device=h.device)
    scratch = torch.empty(V * B * min(chunk, T), dtype=acc, device=h.device) if track == "logprob" else None
    best = where = val = arg = better = None
    for t0, t1 in _chunks(T, chunk):
        z = _logits(h[:, t0:t1], weight, buffer)
        y = labels[:, t0:t1].reshape(-1)
        valid = y.ne(IGNORE_INDEX)
        z_y = z.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
        m = z.amax(dim=1, keepdim=True)
        z.sub_(m)
        if track == "logprob":
            exp = _chunk_view(scratch, z.shape[0], V)
            log_sum = torch.exp(z.t(), out=exp).sum(dim=0).log_()[:, None]
            z.sub_(log_sum)  # log-probabilities
        else:
            z.exp_()
            total = z.sum(dim=1, keepdim=True)
            z.div_(total)  # probabilities, computed as torch.softmax computes them
            log_sum = total.log_()
        lse_c = (m + log_sum).squeeze(1)
        lse[:, t0:t1] = lse_c.view(B, -1)
        # CE as (max - target) + log-sum: no rounding of lse to the logits' scale before the
        # subtraction (a confident position's CE keeps its digits, as log_softmax's does)
        ce_sum += torch.where(valid, (m.squeeze(1) - z_y) + log_sum.squeeze(1), 0.0).sum()
        if track is None:
            continue
        z = _per_position(z, B)  # [V, B, c]
        if mask_padding:  # padded positions never win the max (unless a row has no target at all)
            z.masked_fill_(~valid.view(1, B, -1), float("-inf") if track == "logprob" else -1.0)
        # [V, B]: the first arg-max within the chunk, as torch.max over all positions. In place, into
        # buffers allocated once: per-chunk [V, B] temporaries add up for large batches.
        if best is None:
            best, where = z.max(dim=2)
            where += t0
            val, arg, better = torch.empty_like(best), torch.empty_like(where), torch.empty_like(best, dtype=torch.bool)
        else:
            torch.max(z, dim=2, out=(val, arg))
            arg += t0
            torch.gt(val, best, out=better)  # strict: an earlier chunk keeps ties, again as torch.max
            torch.where(better, val, best, out=best)
            torch.where(better, arg, where, out=where)
    if best is not None:
        best, where = best.t(), where.t()  # [B, V]
    return ce_sum, labels.ne(IGNORE_INDEX).sum(), lse, best, where


def _mi_and_grad(p_best, q_best, variant, lab_labels, rat_labels):
    """L_MI and a[b, v] = dL_MI/dz at (b, t*(b, v), v) (see the module docstring)."""
    B = p_best.shape[0]
    if variant == "paper":
        # CrossEntropyLoss()(q̄, p̄): q̄ (probabilities) as logits, unnormalised target p̄.
        log_sm = q_best.log_softmax(dim=-1)
        loss = -(p_best * log_sm).sum(dim=-1).mean()
        grad_q = (log_sm.exp() * p_best.sum(dim=-1, keepdim=True) - p_best) / B
        return loss, grad_q * q_best  # softmax backward at t*: s_t*[v] = q̄[b, v]
    # masked: normalised target, log-probabilities, examples with targets in both tasks only.
    ok = lab_labels.ne(IGNORE_INDEX).any(dim=1) & rat_labels.ne(IGNORE_INDEX).any(dim=1)
    n_ok = ok.sum().clamp(min=1)
    p_hat = p_best / p_best.sum(dim=-1, keepdim=True)
    per_row = torch.where(ok, -(p_hat * q_best).sum(dim=-1), 0.0)
    return per_row.sum() / n_ok, torch.where(ok[:, None], -p_hat / n_ok, 0.0)


@torch.no_grad()
def _backward_pass(h, weight, labels, lse, n_tokens, chunk, w_ce, mi, dW, dW_empty, buffer, kept: str | None):
    """One pass backward, last chunk first: returns dh and whether ``dW`` (fp32, or None) is still
    unwritten; adds into it (writes it if ``dW_empty``). ``mi`` is (t*, w_mi·a, c, w_mi) or None.
    ``kept``: what ``buffer`` still holds of this pass's last chunk ("prob", "logprob") or None."""
    B, T, d = h.shape
    V = weight.shape[0]
    dh = torch.empty_like(h)
    ce_scale = w_ce / n_tokens
    for t0, t1 in reversed(_chunks(T, chunk)):
        h_c = h[:, t0:t1].reshape(-1, d)
        y = labels[:, t0:t1].reshape(-1)
        valid = y.ne(IGNORE_INDEX)
        if kept == "prob":  # the forward's softmax of this chunk, as it is
            dz = _chunk_view(buffer, h_c.shape[0], V).t()
        elif kept == "logprob":  # masked padding: -inf -> 0 (its gradient is 0 anyway)
            dz = _chunk_view(buffer, h_c.shape[0], V).exp_().t()
        else:
            dz = _logits(h_c, weight, buffer)
            dz.sub_(lse[:, t0:t1].reshape(-1, 1)).exp_()  # softmax
        kept = None
        coef = valid * ce_scale
        if mi is not None:
            where, wa, c, w_mi = mi  # wa: w_mi · a
            coef = coef - w_mi * c[:, t0:t1].reshape(-1)
        dz.mul_(coef[:, None])
        dz.scatter_add_(1, y.clamp(min=0)[:, None], (-ce_scale * valid)[:, None].to(dz.dtype))
        if mi is not None:  # the MI gradient's sparse part, at each (b, v)'s arg-max position
            where_t = where.t()  # [V, B]
            in_chunk = (where_t >= t0) & (where_t < t1)
            _per_position(dz, B).scatter_add_(
                2, (where_t - t0).clamp_(0, t1 - t0 - 1)[:, :, None], torch.where(in_chunk, wa.t(), 0.0)[:, :, None])
        dz_t = dz.t().to(h.dtype)  # [V, B·c] contiguous
        dh[:, t0:t1] = (dz_t.t() @ weight).view(B, t1 - t0, d)
        if dW is not None:  # dW += dzᵀ·h_c
            if dW.dtype == dz_t.dtype:
                dW.addmm_(dz_t, h_c, beta=0.0 if dW_empty else 1.0)
            elif dW_empty:
                dW.copy_(dz_t @ h_c)
            else:
                dW.add_(dz_t @ h_c)
            dW_empty = False
    return dh, dW_empty


class FusedDistillLoss(torch.autograd.Function):
    """(W, h_lab, labels, h_rat | None, rationale_labels | None, mi_variant | None, chunk_mib)
    -> (label CE, rationale CE, L_MI); absent parts are 0."""

    @staticmethod
    def forward(ctx, weight, h_lab, labels, h_rat, rat_labels, mi_variant, chunk_mib):
        V = weight.shape[0]
        mi = mi_variant is not None and h_rat is not None
        chunk_lab = positions_per_chunk(h_lab.shape[0], V, chunk_mib)
        chunk_rat = 0 if h_rat is None else positions_per_chunk(h_rat.shape[0], V, chunk_mib)
        # One logits buffer for both passes, forward and backward; it keeps the last chunk's softmax.
        rows = max(h_lab.shape[0] * min(chunk_lab, h_lab.shape[1]),
                   0 if h_rat is None else h_rat.shape[0] * min(chunk_rat, h_rat.shape[1]))
        buffer = torch.empty(rows * V, dtype=_acc_dtype(h_lab.dtype), device=h_lab.device)
        track_lab = "prob" if mi else None
        ce_lab, n_lab, lse_lab, p_best, _ = _scan(
            h_lab, weight, labels, chunk_lab, track_lab, mask_padding=mi_variant == "masked", buffer=buffer)
        ctx.kept = "prob"  # without a rationale pass there is no MI: the label pass's softmax
        zero = torch.zeros((), dtype=_acc_dtype(h_lab.dtype), device=h_lab.device)
        ce_rat, n_rat, lse_rat, loss_mi = zero, None, None, zero
        saved_mi = (None, None, None)
        if h_rat is not None:
            track_rat = ("logprob" if mi_variant == "masked" else "prob") if mi else None
            ce_rat, n_rat, lse_rat, q_best, where = _scan(
                h_rat, weight, rat_labels, chunk_rat, track_rat, mask_padding=mi_variant == "masked", buffer=buffer)
            ce_rat = ce_rat / n_rat
            ctx.kept = track_rat or "prob"
            if mi:
                loss_mi, a = _mi_and_grad(p_best, q_best, mi_variant, labels, rat_labels)
                c = torch.zeros(h_rat.shape[:2], dtype=a.dtype, device=h_rat.device)
                c.scatter_add_(1, where, a)  # c_t = Σ_{v: t*(b, v) = t} a[b, v]
                saved_mi = (where, a, c)
        ctx.save_for_backward(weight, h_lab, labels, lse_lab, n_lab, h_rat, rat_labels, lse_rat, n_rat,
                              buffer, *saved_mi)
        ctx.chunks = chunk_lab, chunk_rat
        return ce_lab / n_lab, ce_rat, loss_mi

    @staticmethod
    def backward(ctx, g_lab, g_rat, g_mi):
        (weight, h_lab, labels, lse_lab, n_lab, h_rat, rat_labels, lse_rat, n_rat, buffer,
         where, a, c) = ctx.saved_tensors
        chunk_lab, chunk_rat = ctx.chunks
        acc = _acc_dtype(h_lab.dtype)
        dW = torch.empty(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[0] else None
        dW_empty = True  # the first chunk writes dW (beta = 0), the others add to it
        dh_rat, kept = None, ctx.kept
        if h_rat is not None:  # first: the buffer still holds its last chunk
            mi = None if where is None else (where, g_mi.to(acc) * a, c, g_mi.to(acc))
            dh_rat, dW_empty = _backward_pass(h_rat, weight, rat_labels, lse_rat, n_rat, chunk_rat, g_rat.to(acc),
                                              mi, dW, dW_empty, buffer, kept)
            kept = None
        dh_lab, _ = _backward_pass(h_lab, weight, labels, lse_lab, n_lab, chunk_lab, g_lab.to(acc), None, dW,
                                   dW_empty, buffer, kept)
        if dW is not None:
            dW = dW.to(weight.dtype)
        return (dW, dh_lab if ctx.needs_input_grad[1] else None, None,
                dh_rat if ctx.needs_input_grad[3] else None, None, None, None)


def fused_losses(weight: torch.Tensor, label_hidden: torch.Tensor, labels: torch.Tensor,
                 rationale_hidden: torch.Tensor | None = None, rationale_labels: torch.Tensor | None = None,
                 *, mi_variant: str | None = "paper", chunk_mib: float | None = None) -> dict[str, torch.Tensor]:
    """The loss parts of docs/method.md from final decoder states ([B, T, d], already scaled for tied
    T5 v1.0 heads) and the LM-head weight [V, d]. Returns ``label_ce``, and with a rationale pass
    ``rationale_ce`` and (unless ``mi_variant`` is None) ``mi``. ``chunk_mib``: MiB of fp32 logits per
    chunk of positions (None or 0: ``default_chunk_mib`` of the device)."""
    if mi_variant is not None and mi_variant not in MI_VARIANTS:
        raise ValueError(f"mi_variant {mi_variant!r} is not one of {MI_VARIANTS}")
    if weight.dim() != 2 or weight.shape[1] != label_hidden.shape[-1]:
        raise ValueError(f"LM-head weight of shape {tuple(weight.shape)} does not match hidden size "
                         f"{label_hidden.shape[-1]}: under ZeRO-3 a partitioned weight must be registered as "
                         "an external parameter of the module that runs this loss")
    chunk_mib = chunk_mib or default_chunk_mib(label_hidden.device)
    lab, rat, mi = FusedDistillLoss.apply(weight, label_hidden, labels, rationale_hidden, rationale_labels,
                                          mi_variant, chunk_mib)
    parts = {"label_ce": lab}
    if rationale_hidden is not None:
        parts["rationale_ce"] = rat
        if mi_variant is not None:
            parts["mi"] = mi
    return parts
