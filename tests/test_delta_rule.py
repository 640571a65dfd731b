"""The δ-mem delta rule: the chunked form against the per-token loop, and both against the definition.

Equivalence tests run in fp64 with a 1e-12 tolerance. Both forms are exact rearrangements of the same recurrence,
and every per-row transition λI − β k kᵀ is a contraction (|k| = 1), so rounding does not grow with T: measured
differences are ~1e-15 on values and gradients of order 1–10. 1e-12 leaves a 1000× margin, while a real bug
(an off-by-one read, a wrong decay product) shows up at 1e-3 or more.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from deltamem import delta_rule_chunked, delta_rule_loop, delta_rule_step

TOL = dict(rtol=1e-12, atol=1e-12)


def make_inputs(B=2, T=37, H=4, r=8, seed=0, dtype=torch.float64, gate_scale=2.0):
    """q, k (tanh + L2-normalised, as the caller provides them), v, beta_logit: (B, T, H, r); state (B, H, r, r)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(torch.tanh(rand(B, T, H, r)), dim=-1)
    k = F.normalize(torch.tanh(rand(B, T, H, r)), dim=-1)
    return q, k, rand(B, T, H, r), gate_scale * rand(B, T, H, r) - 1.0, rand(B, H, r, r)


def run_with_grads(fn, q, k, v, beta_logit, state, mask=None, **kw):
    """Reads, final state and the gradients of a fixed random scalar w.r.t. (q, k, v, beta_logit, state)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, beta_logit, state)]
    reads, final = fn(*leaves[:4], state=leaves[4], mask=mask, **kw)
    g = torch.Generator().manual_seed(123)
    w_reads = torch.randn(reads.shape, generator=g, dtype=reads.dtype)
    w_final = torch.randn(final.shape, generator=g, dtype=final.dtype)
    grads = torch.autograd.grad((reads * w_reads).sum() + (final * w_final).sum(), leaves)
    return reads, final, grads


def assert_same(a, b):
    """Reads, final state and all five gradients agree (a, b from run_with_grads)."""
    names = ["reads", "final state", "dq", "dk", "dv", "dbeta_logit", "dstate"]
    for name, x, y in zip(names, [a[0], a[1], *a[2]], [b[0], b[1], *b[2]]):
        torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("T, chunk_size", [(1, 16), (5, 16), (16, 16), (37, 16), (37, 5), (12, 1), (64, 8)])
def test_chunked_equals_loop(T, chunk_size):
    x = make_inputs(T=T)
    assert_same(run_with_grads(delta_rule_chunked, *x, chunk_size=chunk_size), run_with_grads(delta_rule_loop, *x))


def test_zero_initial_state_and_one_state_head():
    q, k, v, beta_logit, _ = make_inputs(B=3, T=29, H=1)
    for fn in (delta_rule_loop, delta_rule_chunked):
        reads, final = fn(q, k, v, beta_logit)
        reads0, final0 = fn(q, k, v, beta_logit, state=torch.zeros(3, 1, 8, 8, dtype=torch.float64))
        torch.testing.assert_close(reads, reads0, **TOL)
        torch.testing.assert_close(final, final0, **TOL)
    assert reads.shape == (3, 29, 1, 8) and final.shape == (3, 1, 8, 8)
    for got, want in zip(delta_rule_chunked(q, k, v, beta_logit), delta_rule_loop(q, k, v, beta_logit)):
        torch.testing.assert_close(got, want, **TOL)


def test_hand_computed_case():
    """r = 2, written out by hand from the paper's update, independent of both implementations."""
    S0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    q0, k0, v0 = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
    beta0 = [0.5, 0.25]                     # per-row gates; λ = [0.5, 0.75]
    q1, k1, v1, beta1 = [0.6, 0.8], [1.0, 0.0], [2.0, -1.0], [0.5, 0.5]
    # read_0 = S0 q0 = [1, 3]
    # S0 k0 = [2, 4]; S1 = diag(λ) S0 − diag(β)(S0 k0)k0ᵀ + diag(β) v0 k0ᵀ
    #    = [[0.5, 1], [2.25, 3]] − [[0, 1], [0, 1]] + [[0, 0.5], [0, 0.25]] = [[0.5, 0.5], [2.25, 2.25]]
    # read_1 = S1 q1 = [0.7, 3.15]
    # S1 k1 = [0.5, 2.25]; S2 = 0.5 S1 − 0.5 (S1 k1) k1ᵀ + 0.5 v1 k1ᵀ = [[1, 0.25], [-0.5, 1.125]]
    expected_reads = torch.tensor([[1.0, 3.0], [0.7, 3.15]], dtype=torch.float64)
    expected_state = torch.tensor([[1.0, 0.25], [-0.5, 1.125]], dtype=torch.float64)
    as_input = lambda a, b: torch.tensor([a, b], dtype=torch.float64).view(1, 2, 1, 2)  # noqa: E731  (B, T, H, r)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    beta_logit = as_input([logit(b) for b in beta0], [logit(b) for b in beta1])
    for fn in (delta_rule_loop, delta_rule_chunked):
        reads, final = fn(as_input(q0, q1), as_input(k0, k1), as_input(v0, v1), beta_logit, state=S0.view(1, 1, 2, 2))
        torch.testing.assert_close(reads.view(2, 2), expected_reads, **TOL)
        torch.testing.assert_close(final.view(2, 2), expected_state, **TOL)


def test_matches_matrix_form_of_the_update():
    """Both forms against the update written as full-matrix products (diag(λ), diag(β)), a different code path."""
    q, k, v, beta_logit, S = make_inputs(B=1, T=20, H=1, r=3)
    beta = torch.sigmoid(beta_logit[0, :, 0])                                # (T, r)
    reads = []
    S_t = S[0, 0]
    for t in range(20):
        kt = k[0, t, 0].view(3, 1)
        reads.append(S_t @ q[0, t, 0])
        S_t = (torch.diag(1 - beta[t]) @ S_t - torch.diag(beta[t]) @ S_t @ kt @ kt.T
               + torch.diag(beta[t]) @ v[0, t, 0].view(3, 1) @ kt.T)
    for fn in (delta_rule_loop, delta_rule_chunked):
        got_reads, got_state = fn(q, k, v, beta_logit, state=S)
        torch.testing.assert_close(got_reads[0, :, 0], torch.stack(reads), **TOL)
        torch.testing.assert_close(got_state[0, 0], S_t, **TOL)


def make_masks(T, seed=1):
    """(4, T) bool masks, True = real token."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(T)
    pads = torch.tensor([0, 3, 11, T])                                       # the last sequence is all padding
    random = torch.rand(4, T, generator=g) < 0.6
    random[3] = False
    return {
        "random": random,
        "left_padding": pos[None, :] >= pads[:, None],
        "right_padding": pos[None, :] < (T - pads)[:, None],
    }


@pytest.mark.parametrize("kind", ["random", "left_padding", "right_padding"])
def test_masks(kind):
    B, T = 4, 37
    x = make_inputs(B=B, T=T)
    mask = make_masks(T)[kind]
    chunked = run_with_grads(delta_rule_chunked, *x, mask=mask)
    assert_same(chunked, run_with_grads(delta_rule_loop, *x, mask=mask))
    q, k, v, beta_logit, state = x
    for fn in (delta_rule_loop, delta_rule_chunked):
        reads, final = fn(q, k, v, beta_logit, state=state, mask=mask)
        assert (reads[~mask] == 0).all()                                     # masked tokens read exactly 0
        for b in range(B - 1):                                               # = running the real tokens only
            keep = mask[b]
            ref_reads, ref_final = delta_rule_loop(q[b:b + 1, keep], k[b:b + 1, keep], v[b:b + 1, keep],
                                                   beta_logit[b:b + 1, keep], state=state[b:b + 1])
            torch.testing.assert_close(reads[b:b + 1, keep], ref_reads, **TOL)
            torch.testing.assert_close(final[b:b + 1], ref_final, **TOL)
    torch.testing.assert_close(final[3], state[3], rtol=0, atol=0)           # all-masked row: state untouched


def test_extreme_gates():
    """Saturated gates: β → 0 (logit −50, −30), β → 1 (30, 50), and λ exactly 0 (logit 1000, +inf) in fp64."""
    q, k, v, beta_logit, state = make_inputs(B=2, T=45, H=4)
    g = torch.Generator().manual_seed(5)
    extremes = torch.tensor([-50.0, -30.0, 30.0, 50.0, 1000.0, math.inf], dtype=torch.float64)
    pick = torch.randint(0, len(extremes), beta_logit.shape, generator=g)
    beta_logit = torch.where(torch.rand(beta_logit.shape, generator=g) < 0.5, extremes[pick], beta_logit)
    chunked = run_with_grads(delta_rule_chunked, q, k, v, beta_logit, state)
    loop = run_with_grads(delta_rule_loop, q, k, v, beta_logit, state)
    for t in [chunked[0], chunked[1], *chunked[2]]:
        assert torch.isfinite(t).all()
    assert_same(chunked, loop)
    # every gate saturated at once, chunked in fp32 too (where sigmoid and 1 − β round to 0 and 1 much earlier)
    for dtype in (torch.float64, torch.float32):
        logits = extremes[torch.randint(0, len(extremes), beta_logit.shape, generator=g)]
        args = [x.to(dtype) for x in (q, k, v, logits)]
        reads, final = delta_rule_chunked(*args, state=state.to(dtype))
        ref_reads, ref_final = delta_rule_loop(*args, state=state.to(dtype))
        assert torch.isfinite(reads).all() and torch.isfinite(final).all()
        tol = TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reads, ref_reads, **tol)
        torch.testing.assert_close(final, ref_final, **tol)


@pytest.mark.parametrize("fn", [delta_rule_loop, delta_rule_chunked])
def test_read_before_write(fn):
    q, k, v, beta_logit, state = make_inputs(B=2, T=23, H=4)
    reads, _ = fn(q, k, v, beta_logit, state=state)
    torch.testing.assert_close(reads[:, 0], (state @ q[:, 0].unsqueeze(-1)).squeeze(-1), **TOL)  # S₀ q₀
    t = 9                                                                    # change token t's write only
    v2, k2, b2 = v.clone(), k.clone(), beta_logit.clone()
    v2[:, t] += 1.0
    k2[:, t] = F.normalize(k2[:, t] + 0.5, dim=-1)
    b2[:, t] += 2.0
    reads2, _ = fn(q, k2, v2, b2, state=state)
    torch.testing.assert_close(reads2[:, :t + 1], reads[:, :t + 1], **TOL)  # read_t does not see write t
    assert (reads2[:, t + 1] - reads[:, t + 1]).abs().max() > 1e-3         # read_{t+1} does


@pytest.mark.parametrize("fn", [delta_rule_loop, delta_rule_chunked])
def test_state_carried_across_calls(fn):
    q, k, v, beta_logit, state = make_inputs(B=2, T=41, H=4)
    reads, final = fn(q, k, v, beta_logit, state=state)
    cut = 19                                                                 # not a chunk boundary
    reads_a, mid = fn(q[:, :cut], k[:, :cut], v[:, :cut], beta_logit[:, :cut], state=state)
    reads_b, final_b = fn(q[:, cut:], k[:, cut:], v[:, cut:], beta_logit[:, cut:], state=mid)
    torch.testing.assert_close(torch.cat([reads_a, reads_b], 1), reads, **TOL)
    torch.testing.assert_close(final_b, final, **TOL)


def test_token_by_token_decode_equals_loop_and_chunked():
    """The decode path: delta_rule_step on one-token slices with (B, 1) leading dims, as DeltaMem.forward calls it."""
    q, k, v, beta_logit, state = make_inputs(B=2, T=21, H=4)
    S, steps = state.unsqueeze(1), []                                       # (B, 1, H, r, r)
    for t in range(21):
        read, S = delta_rule_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], beta_logit[:, t:t + 1], S)
        steps.append(read)                                                  # (B, 1, H, r)
    for reads, final in (delta_rule_loop(q, k, v, beta_logit, state=state),
                         delta_rule_chunked(q, k, v, beta_logit, state=state)):
        torch.testing.assert_close(torch.cat(steps, 1), reads, **TOL)
        torch.testing.assert_close(S.squeeze(1), final, **TOL)


def test_low_precision_inputs_are_upcast():
    """bf16 inputs (autocast callers) are computed and returned in fp32; fp64 stays fp64; an enclosing bf16
    autocast region changes nothing (without the guard, its bf16 matmuls give ~4e-3 relative error at T = 2048)."""
    x = make_inputs(B=2, T=40, H=4, dtype=torch.float32)
    for fn in (delta_rule_loop, delta_rule_chunked):
        reads, final = fn(*[t.bfloat16() for t in x[:4]], state=x[4].bfloat16())
        assert reads.dtype == final.dtype == torch.float32
        ref_reads, ref_final = fn(*[t.bfloat16().float() for t in x[:4]], state=x[4].bfloat16().float())
        torch.testing.assert_close(reads, ref_reads, rtol=0, atol=0)
        torch.testing.assert_close(final, ref_final, rtol=0, atol=0)
        assert fn(*[t.double() for t in x[:4]])[0].dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):                  # matmuls inside must not drop to bf16
            reads, final = fn(*x[:4], state=x[4])
        ref_reads, ref_final = fn(*x[:4], state=x[4])
        assert reads.dtype == final.dtype == torch.float32
        torch.testing.assert_close(reads, ref_reads, rtol=0, atol=0)
        torch.testing.assert_close(final, ref_final, rtol=0, atol=0)


def test_fp32_chunked_accuracy_long_sequence():
    """fp32 chunked vs the fp64 loop over T = 2048 (B = 1, H = 2, default chunk size), gates around the init.

    Measured (max error / max magnitude, 4 seeds, T = 2048 and 8192): 1.5–4e-7 on reads, 1–1.5e-7 on the final
    state; the fp32 loop itself is at 1.3–1.6e-7. Errors do not grow with T (the transitions are contractions).
    Bound: 1e-6, 2.5× the worst measurement; a wrong step would be orders of magnitude larger. The same holds for
    bf16 inputs (computed in fp32) against the fp64 loop on the same rounded inputs (measured 1.8–2.9e-7).
    """
    q, k, v, beta_logit, state = make_inputs(B=1, T=2048, H=2, seed=7, gate_scale=1.5)
    rel = lambda a, ref: ((a.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    ref_reads, ref_final = delta_rule_loop(q, k, v, beta_logit, state=state)
    reads, final = delta_rule_chunked(*[t.float() for t in (q, k, v, beta_logit)], state=state.float())
    assert rel(reads, ref_reads) < 1e-6 and rel(final, ref_final) < 1e-6
    low = [t.bfloat16() for t in (q, k, v, beta_logit)]
    ref_reads, ref_final = delta_rule_loop(*[t.double() for t in low], state=state)
    reads, final = delta_rule_chunked(*low, state=state.float())
    assert rel(reads, ref_reads) < 1e-6 and rel(final, ref_final) < 1e-6
