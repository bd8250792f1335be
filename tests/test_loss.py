"""mixup_loss against a naive per-pair reference (values and gradients), chunking, padding sides, dtypes."""

import pytest
import torch
from helpers import naive_mixup_loss

from sftmix.mixup.loss import mixup_loss, response_positions


def make_batch(spans, T, V, padding_side="right", seed=0, dtype=torch.float64, H=8):
    """spans: (prompt_len, response_len) per row; returns hidden [B,T,H], labels [B,T], W [V,H]."""
    g = torch.Generator().manual_seed(seed)
    B = len(spans)
    labels = torch.full((B, T), -100)
    for b, (p, r) in enumerate(spans):
        assert p + r <= T
        start = p if padding_side == "right" else T - r  # left padding: the sequence ends at T
        labels[b, start:start + r] = torch.randint(0, V, (r,), generator=g)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    return hidden, labels, weight


def explicit_reference(hidden, labels, weight, pairs, lam):
    """The paper's formula written out token by token, independent of both implementations."""
    total = 0.0
    for (c, u), lam_p in zip(pairs.tolist(), lam.tolist()):
        r_c = [t for t in range(labels.size(1)) if labels[c, t] != -100]
        r_u = [t for t in range(labels.size(1)) if labels[u, t] != -100]
        L = min(len(r_c), len(r_u))
        pair = 0.0
        for l in range(L):  # noqa: E741  (the paper's l-th response token)
            z = lam_p * hidden[c, r_c[l] - 1] + (1 - lam_p) * hidden[u, r_u[l] - 1]
            logp = torch.log_softmax(weight @ z, dim=-1)
            pair = pair - (lam_p * logp[labels[c, r_c[l]]] + (1 - lam_p) * logp[labels[u, r_u[l]]])
        total = total + pair / L
    return total / len(pairs)


SPANS = [(3, 5), (1, 9), (4, 1), (5, 15), (2, 4), (10, 7), (6, 2), (1, 1)]
PAIRS = torch.tensor([[0, 1], [3, 2], [5, 4], [6, 7]])  # includes L = 1 pairs (rows 2 and 7)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_naive_and_explicit_values_and_gradients(padding_side):
    hidden, labels, weight = make_batch(SPANS, T=26, V=50, padding_side=padding_side)
    lam = torch.tensor([0.3, 0.9, 0.05, 0.5], dtype=torch.float64)
    got = mixup_loss(hidden, labels, weight, PAIRS, lam, chunk_tokens=3)
    g_got = torch.autograd.grad(got, (hidden, weight))
    ref = naive_mixup_loss(hidden, labels, weight, PAIRS, lam)
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    explicit = explicit_reference(hidden.detach(), labels, weight.detach(), PAIRS, lam)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    assert got.item() == pytest.approx(explicit.item(), rel=1e-12)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # gradients reach exactly the predicting positions of the first L response tokens of each paired row
    assert g_got[0][2].abs().sum() > 0 and g_got[0][7].abs().sum() > 0


def test_gradcheck_fp64():
    hidden, labels, weight = make_batch([(2, 3), (1, 4), (3, 1), (2, 2)], T=8, V=11, H=4)
    lam = torch.tensor([0.25, 0.7], dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [2, 3]])
    assert torch.autograd.gradcheck(lambda h, w: mixup_loss(h, labels, w, pairs, lam, chunk_tokens=2), (hidden, weight))


def test_padding_side_and_prompt_length_do_not_matter():
    right = make_batch(SPANS, T=26, V=50, padding_side="right")
    left = make_batch(SPANS, T=26, V=50, padding_side="left")
    lam = torch.tensor([0.3, 0.9, 0.05, 0.5], dtype=torch.float64)
    # Move each row's hidden states with its tokens: the loss only depends on the response-relative order.
    h_left = torch.zeros_like(left[0])
    for b, (p, r) in enumerate(SPANS):
        shift = (26 - r) - p
        h_left[b, p - 1 + shift:p - 1 + shift + r] = right[0].detach()[b, p - 1:p - 1 + r]
    a = mixup_loss(right[0], right[1], right[2], PAIRS, lam)
    b = mixup_loss(h_left, left[1], right[2], PAIRS, lam)
    assert left[1].ne(-100).sum() == right[1].ne(-100).sum()
    torch.testing.assert_close(left[1][left[1] != -100], right[1][right[1] != -100])
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 7, 10_000])
def test_chunk_size_does_not_change_result(chunk):
    hidden, labels, weight = make_batch(SPANS, T=26, V=97)
    lam = torch.tensor([0.3, 0.9, 0.05, 0.5], dtype=torch.float64)
    a = mixup_loss(hidden, labels, weight, PAIRS, lam, chunk_tokens=chunk)
    b = naive_mixup_loss(hidden, labels, weight, PAIRS, lam)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("chunk", [3, 10000])
def test_uninitialised_weight_gradient_buffer_never_leaks(monkeypatch, chunk):
    # the W-gradient buffer is torch.empty (the first chunk's addmm_ overwrites it with beta=0): poison it with NaN
    hidden, labels, weight = make_batch(SPANS, T=26, V=97)
    lam = torch.tensor([0.3, 0.9, 0.05, 0.5], dtype=torch.float64)
    expected = torch.autograd.grad(naive_mixup_loss(hidden, labels, weight, PAIRS, lam), weight)[0]
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = torch.autograd.grad(mixup_loss(hidden, labels, weight, PAIRS, lam, chunk_tokens=chunk), weight)[0]
    monkeypatch.undo()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_lam_one_is_plain_cross_entropy_of_confident_row():
    hidden, labels, weight = make_batch([(2, 5), (1, 3)], T=10, V=20)
    loss = mixup_loss(hidden, labels, weight, torch.tensor([[0, 1]]), torch.tensor([1.0], dtype=torch.float64))
    pos = (labels[0, 1:] != -100).nonzero().flatten()[:3]  # L = min(5, 3)
    ce = torch.nn.functional.cross_entropy(hidden[0, pos] @ weight.t(), labels[0, pos + 1])
    assert loss.item() == pytest.approx(ce.item(), rel=1e-12)


def test_bf16_autocast_runs_cross_entropy_in_fp32():
    hidden, labels, weight = make_batch(SPANS, T=26, V=50, dtype=torch.float32)
    lam = torch.tensor([0.3, 0.9, 0.05, 0.5])
    ref = mixup_loss(hidden, labels, weight, PAIRS, lam)
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixup_loss(hidden, labels, weight, PAIRS, lam)
    g_got = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)  # bf16 matmuls would be off by ~1e-2
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_weights_close_to_fp32():
    hidden, labels, weight = make_batch(SPANS, T=26, V=50, dtype=torch.float32)
    lam = torch.tensor([0.3, 0.9, 0.05, 0.5])
    ref = mixup_loss(hidden, labels, weight, PAIRS, lam)
    got = mixup_loss(hidden.detach().bfloat16(), labels, weight.detach().bfloat16().requires_grad_(), PAIRS, lam)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=3e-2)


def test_frozen_lm_head_keeps_no_weight_gradient():
    hidden, labels, weight = make_batch(SPANS, T=26, V=50)
    weight = weight.detach()
    loss = mixup_loss(hidden, labels, weight, PAIRS, torch.full((4,), 0.5, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, (hidden,))
    assert g.abs().sum() > 0


def test_response_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, 8, 9]])
    order, n = response_positions(labels)
    assert n.tolist() == [2, 3]
    assert order[0, :2].tolist() == [1, 2] and order[1, :3].tolist() == [0, 2, 3]


def test_rejects_bad_shapes():
    hidden, labels, weight = make_batch(SPANS, T=26, V=50)
    with pytest.raises(ValueError, match="lam has"):
        mixup_loss(hidden, labels, weight, PAIRS, torch.ones(3))
