"""The SFTMix Mixup loss as a pure tensor function (no model, no Trainer).

    from sftmix.mixup.loss import mixup_loss
    loss = mixup_loss(hidden_states, labels, lm_head.weight, pairs, lam)   # scalar L_Mixup, exact gradients

Definitions (paper §3.3, HF label convention: `labels[b, t] != -100` marks a response token and the last hidden state
at t-1 predicts the token at t):
  r_i(l)  position of the l-th response token of row i, l = 1..n_i
  pair p = (c, u) with mixing coefficient lam_p, L_p = min(n_c, n_u)
  z_l     = lam_p * h[c, r_c(l)-1] + (1 - lam_p) * h[u, r_u(l)-1]
  y_l     = lam_p * onehot(labels[c, r_c(l)]) + (1 - lam_p) * onehot(labels[u, r_u(l)])
  pair loss = -(1/L_p) sum_l y_l . log softmax(W z_l)
  L_Mixup = mean over pairs (pairs with L_p = 0, i.e. a row without response tokens, are left out of the mean)

Memory: the [sum_p L_p, V] logits are never held at once. The cross-entropy runs over chunks of tokens in a custom
autograd function that computes the gradients w.r.t. z and W while it has each chunk's logits (the approach of
Liger's fused linear cross-entropy), so extra memory is one chunk of logits plus a gradient buffer for W (only when W
is trainable; with LoRA it is frozen and none is kept). The softmax and cross-entropy run in fp32 (autocast is off
inside); the projection runs in W's dtype, like the NTP head.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Upper bound on chunk_tokens * vocab_size elements of one fp32 logits chunk (32 MiB): small next to the model's
# own activations, large enough to keep the matmuls efficient.
DEFAULT_CHUNK_ELEMENTS = 2**23


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the positions t-1 of the hidden states that predict its response tokens, in order.

    Returns `(order, n)`: `order[b, :n[b]]` are those positions (ascending) in `0..T-2`, `n[b]` the response length.
    Works for any padding side and any prompt length: it only looks at where `labels[:, 1:] != -100`.
    """
    is_response = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: hidden state j predicts token j+1
    n = is_response.sum(dim=1)
    # A stable sort of the "not response" flags puts the response positions first, in their original order.
    order = torch.sort((~is_response).to(torch.int8), dim=1, stable=True).indices
    return order, n


def gather_mixup_tokens(hidden_states, labels, pairs, lam):
    """Select and mix the hidden states and targets of every pair (the differentiable part of the loss).

    Returns `z` [N, H] (fp32), `y_c`, `y_u` [N], `lam_tok` [N] and `weight_tok` [N] = 1 / (L_p * P) for the N mixed
    tokens of all pairs, so that `sum(weight_tok * per_token_loss)` is the mean over pairs of the per-pair mean.
    """
    if pairs.numel() == 0:
        raise ValueError("mixup_loss needs at least one (confident, unconfident) pair.")
    order, n = response_positions(labels)
    c, u = pairs[:, 0], pairs[:, 1]
    length = torch.minimum(n[c], n[u])  # L_p
    max_len = int(length.max())
    steps = torch.arange(max_len, device=labels.device)
    valid = steps[None, :] < length[:, None]  # [P, Lmax]
    pos_c = order[c, :max_len][valid]  # hidden-state positions (predicting), flattened over valid (pair, l)
    pos_u = order[u, :max_len][valid]
    pair_id = torch.arange(pairs.size(0), device=labels.device)[:, None].expand_as(valid)[valid]
    row_c, row_u = c[pair_id], u[pair_id]

    # Mix in (at least) fp32: bf16 hidden states are upcast before interpolation.
    mix_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    lam = lam.to(device=hidden_states.device, dtype=mix_dtype)
    lam_tok = lam[pair_id]
    h_c = hidden_states[row_c, pos_c].to(mix_dtype)
    h_u = hidden_states[row_u, pos_u].to(mix_dtype)
    z = lam_tok[:, None] * h_c + (1.0 - lam_tok[:, None]) * h_u
    y_c = labels[row_c, pos_c + 1]
    y_u = labels[row_u, pos_u + 1]
    num_pairs = (length > 0).sum().clamp(min=1)
    weight_tok = 1.0 / (length[pair_id].to(mix_dtype) * num_pairs.to(mix_dtype))
    return z, y_c, y_u, lam_tok, weight_tok


class _MixedCrossEntropy(torch.autograd.Function):
    """sum_i w_i * -(lam_i * log p_i[y_c,i] + (1 - lam_i) * log p_i[y_u,i]), p_i = softmax(W z_i), chunked."""

    @staticmethod
    def forward(ctx, z, weight, y_c, y_u, lam, w, chunk_tokens):
        need_z = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_z = torch.zeros_like(z) if need_z else None
        # empty, not zeros, when there is a first chunk: its addmm_ runs with beta=0, which overwrites the buffer
        # (NaN-safe), saving a pass over a W-sized buffer
        grad_w = None
        if need_w:
            grad_w = (torch.empty if z.size(0) else torch.zeros)(
                weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        acc_dtype = torch.promote_types(z.dtype, torch.float32)
        total = torch.zeros((), dtype=acc_dtype, device=z.device)
        for start in range(0, z.size(0), chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            z_chunk = z[sl].to(weight.dtype)
            logits = (z_chunk @ weight.t()).to(acc_dtype)  # [n, V] in fp32 (fp64 for fp64 inputs)
            lse = torch.logsumexp(logits, dim=-1)
            lam_c, w_c = lam[sl], w[sl]
            logit_c = logits.gather(1, y_c[sl, None]).squeeze(1)
            logit_u = logits.gather(1, y_u[sl, None]).squeeze(1)
            total += (w_c * (lse - lam_c * logit_c - (1.0 - lam_c) * logit_u)).sum()
            if need_z or need_w:
                # d loss / d logits = w * (softmax - lam*onehot(y_c) - (1-lam)*onehot(y_u)), computed in place
                grad_logits = logits.sub_(lse[:, None]).exp_().mul_(w_c[:, None])
                rows = torch.arange(grad_logits.size(0), device=z.device)
                grad_logits.index_put_((rows, y_c[sl]), -(w_c * lam_c), accumulate=True)
                grad_logits.index_put_((rows, y_u[sl]), -(w_c * (1.0 - lam_c)), accumulate=True)
                if need_z:
                    grad_z[sl] = (grad_logits.to(weight.dtype) @ weight).to(z.dtype)
                if need_w:
                    grad_w.addmm_(grad_logits.t().to(grad_w.dtype), z[sl].to(grad_w.dtype),
                                  beta=0.0 if start == 0 else 1.0)
            del logits
        ctx.save_for_backward(grad_z if need_z else None, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_z, grad_w = ctx.saved_tensors
        if grad_z is not None:
            grad_z = grad_z * grad_output.to(grad_z.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_output.to(grad_w.dtype)
        return grad_z, grad_w, None, None, None, None, None


def mixed_cross_entropy(z, weight, y_c, y_u, lam_tok, weight_tok, chunk_tokens: int | None = None):
    """The weighted soft-target cross-entropy of mixed states `z` under the LM head `weight`, fp32, chunked."""
    if chunk_tokens is None:
        chunk_tokens = max(16, DEFAULT_CHUNK_ELEMENTS // weight.size(0))
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _MixedCrossEntropy.apply(z, weight, y_c, y_u, lam_tok, weight_tok, int(chunk_tokens))


def mixup_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    pairs: torch.Tensor,
    lam: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """L_Mixup of SFTMix (see the module docstring).

    Args:
        hidden_states: [B, T, H] last hidden states (the LM head's input, after the final norm).
        labels: [B, T] token ids with -100 outside the response (prompt and padding).
        lm_head_weight: [V, H] the LM head (output embedding) weight, gathered if sharded.
        pairs: [P, 2] long, rows (confident, unconfident).
        lam: [P] mixing coefficients in [0, 1].
        chunk_tokens: mixed tokens per cross-entropy chunk (default: 2**23 // V).
    Returns:
        Scalar fp32 tensor: mean over pairs of each pair's mean soft-target cross-entropy.
    """
    if hidden_states.dim() != 3 or labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"hidden_states [B,T,H] and labels [B,T] disagree: {tuple(hidden_states.shape)} vs "
                         f"{tuple(labels.shape)}")
    pairs = pairs.to(device=labels.device, dtype=torch.long).reshape(-1, 2)
    lam = lam.reshape(-1)
    if lam.numel() != pairs.size(0):
        raise ValueError(f"lam has {lam.numel()} values for {pairs.size(0)} pairs")
    z, y_c, y_u, lam_tok, weight_tok = gather_mixup_tokens(hidden_states, labels, pairs, lam)
    if z.size(0) == 0:  # no pair has a response token: a differentiable zero keeps backward() working
        return hidden_states.sum() * 0.0
    return mixed_cross_entropy(z, lm_head_weight, y_c, y_u, lam_tok, weight_tok, chunk_tokens)
