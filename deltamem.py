"""δ-mem: a small online associative memory attached to a frozen LLM (Lei et al., 2026, arXiv 2605.12357; the
official implementation is github.com/declare-lab/delta-Mem, module deltamem/core/delta.py).

Every attention layer keeps n tiny r×r states per sequence. Each token first reads its state (the read becomes a
low-rank correction of the attention query and output), then writes to it with a per-row gated delta rule. This
file holds the delta-rule scan in two equivalent forms: a per-token loop (the reference; its single step is also the
decode path) and a chunked form (parallel inside chunks of C tokens, a short loop across chunks) for training and
prefill.

Dims used throughout: B batch, T tokens, H independent states per sequence (n: 1, or 4 for MSW), r state rank
(rows = columns = r), C chunk size, N = ceil(T / C) chunks, G = B·H independent (sequence, state) pairs.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# The recurrence, per token t and per state (one state head), with per-ROW gates β_t ∈ (0,1)^r:
#     read_t = S_{t−1} q_t                                                   (read BEFORE the write)
#     S_t    = diag(λ_t) S_{t−1} − diag(β_t) (S_{t−1} k_t) k_tᵀ + diag(β_t) v_t k_tᵀ,     λ_t = 1 − β_t
# i.e. row i evolves on its own: s_i ← λ_i s_i + β_i (v_i − s_i·k) kᵀ. q, k are tanh + L2-normalised by the caller.
# β = sigmoid(beta_logit) and λ = sigmoid(−beta_logit), which is 1 − β computed without cancellation.


def delta_rule_step(q, k, v, beta_logit, S) -> tuple[Tensor, Tensor]:
    """The recurrence for one token: read_t = S_{t−1} q_t, then the write. The body of delta_rule_loop, and the
    whole scan when decoding a generated token (T = 1, nothing to mask).

    q, k, v, beta_logit: (..., H, r); S: (..., H, r, r), with the same leading dims ((B,) in the loop), all in the
    compute dtype (fp32 or fp64). Element-wise products and sums rather than matmuls, so bf16 autocast leaves them
    alone. Returns the read (..., H, r) and the new state (..., H, r, r).
    """
    read = (S * q.unsqueeze(-2)).sum(-1)                                   # (..., H, r)  S_{t-1} q_t
    err = v - (S * k.unsqueeze(-2)).sum(-1)                                # (..., H, r)  v_t − S_{t-1} k_t
    keep, beta = torch.sigmoid(-beta_logit), torch.sigmoid(beta_logit)     # (..., H, r) each: λ_t, β_t
    return read, keep.unsqueeze(-1) * S + (beta * err).unsqueeze(-1) * k.unsqueeze(-2)


def delta_rule_loop(q, k, v, beta_logit, state=None, mask=None) -> tuple[Tensor, Tensor]:
    """Reference scan: delta_rule_step one token at a time.

    q, k, v, beta_logit: (B, T, H, r); state: (B, H, r, r) or None (zeros); mask: (B, T) bool, True = real token
    (a masked token reads 0 and leaves the state unchanged). Computes in fp32, or fp64 if q is fp64.
    Returns reads (B, T, H, r) and the final state (B, H, r, r), both in the compute dtype.
    """
    B, T, H, r = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, beta_logit = (x.to(dtype) for x in (q, k, v, beta_logit))
    S = q.new_zeros(B, H, r, r) if state is None else state.to(dtype)      # (B, H, r, r)
    # unbind, not q[:, t]: indexing inside a loop makes each backward step allocate a full-size zero gradient
    steps = zip(*(x.unbind(1) for x in (q, k, v, beta_logit)))              # T × four (B, H, r)
    masks = mask.unbind(1) if mask is not None else [None] * T              # T × (B,)
    reads = []
    for (q_t, k_t, v_t, beta_t), m_t in zip(steps, masks):
        read, S_new = delta_rule_step(q_t, k_t, v_t, beta_t, S)             # (B, H, r), (B, H, r, r)
        if m_t is not None:
            m_t = m_t[:, None, None]                                        # (B, 1, 1)
            read, S_new = torch.where(m_t, read, 0.0), torch.where(m_t.unsqueeze(-1), S_new, S)
        reads.append(read)
        S = S_new
    return torch.stack(reads, 1), S                                         # (B, T, H, r), (B, H, r, r)


def delta_rule_chunked(q, k, v, beta_logit, state=None, mask=None, chunk_size=16) -> tuple[Tensor, Tensor]:
    """Same inputs, outputs and semantics as delta_rule_loop, computed C = chunk_size tokens at a time.

    Row i of a state evolves on its own, s ← λ_i s + u kᵀ with the scalar pseudo-value u = β_i (v_i − s·k): a
    gated delta rule with key dim r and value dim 1. Inside a chunk, all u come from one unit-triangular solve
    (the UT transform of Yang et al. 2024, rederived for read-before-write and per-row gates), so the chunk acts on
    each row as an affine map s ↦ s A_c + b_c; a short loop over the N chunks chains these maps.
    """
    with torch.autocast(q.device.type, enabled=False):  # stay fp32 (or fp64) inside bf16 autocast regions
        B, T, H, r = q.shape
        C, N, G = chunk_size, -(-T // chunk_size), B * H
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v, beta_logit = (x.to(dtype) for x in (q, k, v, beta_logit))
        beta = torch.sigmoid(beta_logit)                                       # (B, T, H, r)
        # log λ = logsigmoid(−logit) is exact where 1 − β would cancel; clamped at log(tiny) (λ = 0 → −inf, and
        # −inf · 0 = NaN in the masked sums below). A clamped λ ≤ 1e-38 (fp32) contributes nothing visible anyway.
        log_keep = F.logsigmoid(-beta_logit).clamp(min=math.log(torch.finfo(dtype).tiny))   # (B, T, H, r)
        if mask is not None:                               # a masked token is an identity transition: λ = 1, β = 0
            m = mask[:, :, None, None]                                         # (B, T, 1, 1)
            beta, log_keep = torch.where(m, beta, 0.0), torch.where(m, log_keep, 0.0)

        # Pad T to N·C with zeros: identity tokens too (log λ = 0, β = 0, q = k = 0), so the final state is exact.
        def rows(x):   # one scalar per state row: (B, T, H, r) -> (G, r, N, C)
            return F.pad(x, (0, 0, 0, 0, 0, N * C - T)).permute(0, 2, 3, 1).reshape(G, r, N, C)

        def heads(x):  # vectors shared by the r rows of a state: (B, T, H, r) -> (G, 1, N, C, r)
            return F.pad(x, (0, 0, 0, 0, 0, N * C - T)).transpose(1, 2).reshape(G, 1, N, C, r)

        beta, log_keep, v, q, k = rows(beta), rows(log_keep), rows(v), heads(q), heads(k)

        # Exclusive decay products inside a chunk, from sums of log λ ≤ 0. With y = [0, log λ_0, …, log λ_{C−1}]:
        #   γ_t = ∏_{m<t} λ_m,  Γ = ∏_m λ_m,  δ_j = ∏_{m>j} λ_m   (cumsums of y), and
        #   D_tj = ∏_{j<m<t} λ_m = exp(L_tj),  L_tj = Σ_i [i ≤ t][i > j+1] y_i   (a "segment sum", as in Mamba-2).
        # Each L_tj adds only its own segment's terms, all ≤ 0: nothing cancels, unlike the difference of two prefix
        # sums, which loses eps·|Σ log λ| and is inaccurate for sharp gates. Computing it as a matmul with 0/1 masks
        # measured faster than a masked cumsum or fp64 prefix differences. L = 0 where t ≤ j: no overflow; masked later.
        y = F.pad(log_keep, (1, 0))                                            # (G, r, N, C+1)
        from_start = y.cumsum(-1).exp()                                        # (G, r, N, C+1): γ_0 … γ_{C−1}, Γ
        gamma, Gamma = from_start[..., :C], from_start[..., C]                 # (G, r, N, C), (G, r, N)
        delta = F.pad(y[..., 2:], (0, 1)).flip(-1).cumsum(-1).flip(-1).exp()   # (G, r, N, C)
        ones = torch.ones(C, C, dtype=dtype, device=q.device)                 # (C, C)
        D = (ones.tril() @ (y[..., :C, None] * ones.tril(-2))).exp()            # (G, r, N, C, C)
        strict = ones.tril(-1)                                                 # (C, C): 1 where t > j

        # UT transform. With h = [1, s⁰] (s⁰ = the row's state at the chunk start), unrolling the row inside the chunk,
        # s_{t−1} = γ_t s⁰ + Σ_{j<t} D_tj u_j k_jᵀ, turns u_t = β_t (v_t − s_{t−1}·k_t) into the lower-triangular system
        #   (I + A) u = β⊙v − (β⊙γ)⊙(K s⁰ᵀ),   A_tj = β_t D_tj (k_t·k_j) for t > j,   so u = P hᵀ with P = [U, −W].
        A = beta.unsqueeze(-1) * ((k @ k.mT) * strict) * D                     # (G, r, N, C, C)
        rhs = torch.cat([(beta * v).unsqueeze(-1), -(beta * gamma).unsqueeze(-1) * k], -1)  # (G, r, N, C, 1+r)
        P = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # (G, r, N, C, 1+r)
        # The chunk's end state Γ s⁰ + Σ_j δ_j u_j k_jᵀ = h @ [b_c; A_c], where [b_c; A_c] = Pᵀ diag(δ) K + [0; Γ I].
        F_c = P.mT @ (delta.unsqueeze(-1) * k)                                 # (G, r, N, 1+r, r)
        A_c = F_c[..., 1:, :] + Gamma[..., None, None] * torch.eye(r, dtype=dtype, device=q.device)  # (G, r, N, r, r)
        # Across chunks, s ← s A_c + b_c per row. Chunk-major contiguous tensors + unbind keep the backward O(N):
        # indexing A_c[:, :, n] in the loop would make every backward step add a full-size zero gradient (O(N²)).
        A_c = A_c.permute(2, 0, 1, 3, 4).reshape(N, G * r, r, r)                # (N, G·r, r, r)
        b_c = F_c[..., :1, :].permute(2, 0, 1, 3, 4).reshape(N, G * r, 1, r)    # (N, G·r, 1, r)
        s = q.new_zeros(G * r, 1, r) if state is None else state.to(dtype).reshape(G * r, 1, r)  # (G·r, 1, r)
        starts = []
        for A_n, b_n in zip(A_c.unbind(0), b_c.unbind(0)):
            starts.append(s)
            s = torch.baddbmm(b_n, s, A_n)                                     # (G·r, 1, r)
        s0 = torch.stack(starts).reshape(N, G, r, r).permute(1, 2, 0, 3)       # (G, r, N, r) states at chunk starts
        u = (P * F.pad(s0, (1, 0), value=1.0).unsqueeze(-2)).sum(-1)           # (G, r, N, C) u = P hᵀ
        # Reads o_t = γ_t q_t·s⁰ + Σ_{j<t} D_tj (q_t·k_j) u_j: strictly lower, as a token reads before it writes.
        # (Products + sums rather than matrix-vector @: the backward of a batched matvec is a batch of outer
        # products, which CPU bmm does slowly.)
        o = ((q @ k.mT) * strict * D * u.unsqueeze(-2)).sum(-1) + gamma * (q * s0.unsqueeze(-2)).sum(-1)  # (G, r, N, C)
        o = o.reshape(B, H, r, N * C)[..., :T].permute(0, 3, 1, 2)             # (B, T, H, r)
        if mask is not None:
            o = torch.where(mask[:, :, None, None], o, 0.0)
        return o, s.reshape(B, H, r, r)                                        # (B, T, H, r), (B, H, r, r)


# ----------------------------------------------------------------------------- the per-layer module

WRITE_MODES = ("tsw", "ssw", "msw")
HEADS = ("q", "k", "v", "o")


@dataclass
class DeltaMemConfig:
    write: str = "tsw"  # tsw: every token writes; ssw: one write per segment (message mean); msw: n states, token writes
    rank: int = 8  # r: each state is r × r
    alpha: float = 16.0  # corrections are scaled by s = alpha / rank (2 for MSW too)
    num_states: int = 0  # n parallel states per layer; 0 = the mode's default (4 for msw, else 1)
    heads: tuple[str, ...] = ("q", "o")  # which projections get a correction: subset of q, k, v, o (paper: q, o)
    beta_bias_init: float = -1.5  # b_β at init: β = sigmoid(-1.5) ≈ 0.18 per token
    init: str = "base_slice"  # Δ-projections: "base_slice" (official default, see init_delta) or "zero"
    chunk_size: int = 16  # tokens per chunk of the parallel scan; 0 = the per-token loop (the reference, slower)
    key_shift: bool = False  # token writes: token t writes under the key of token t−1 (ours; paper: its own key)
    write_pass_reads: bool = True  # a call that writes also reads (paper); False: it only writes, from the frozen x (ours)
    frozen_query: bool = False  # a call that only reads takes its queries from the backbone's own x (ours; see forward)

    def __post_init__(self):
        if self.write not in WRITE_MODES:
            raise ValueError(f"unknown write mode '{self.write}' (choose from {', '.join(WRITE_MODES)})")
        if not set(self.heads) <= set(HEADS) or not self.heads:
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {self.heads}")
        if self.init not in ("base_slice", "zero"):
            raise ValueError(f"unknown init '{self.init}' (choose base_slice or zero)")
        if self.key_shift and self.write == "ssw":
            raise ValueError("key_shift shifts token keys: it does not apply to ssw's message writes")
        self.heads = tuple(h for h in HEADS if h in self.heads)
        self.num_states = self.num_states or (4 if self.write == "msw" else 1)


class DeltaMem(nn.Module):
    """δ-mem for one attention layer: projections of x into the memory, gates, and reads -> corrections."""

    def __init__(self, cfg: DeltaMemConfig, attn: nn.Module):
        super().__init__()
        self.cfg = cfg
        d, m = attn.q_proj.in_features, cfg.num_states * cfg.rank
        dtype = torch.promote_types(attn.q_proj.weight.dtype, torch.float32)  # train in fp32 even on a bf16 backbone
        kw = dict(bias=False, device=attn.q_proj.weight.device, dtype=dtype)
        self.memory_q_proj = nn.Linear(d, m, **kw)  # W_mq, kaiming-uniform like the official init
        self.memory_k_proj = nn.Linear(d, m, **kw)  # W_mk
        self.memory_v_proj = nn.Linear(d, m, **kw)  # W_mv
        self.beta_proj = nn.Linear(d, m, **kw)  # W_β: one gate per state row
        nn.init.zeros_(self.beta_proj.weight)
        self.beta_bias = nn.Parameter(torch.full((m,), cfg.beta_bias_init, device=kw["device"], dtype=dtype))
        for h in cfg.heads:  # delta_q_proj, delta_k_proj, delta_v_proj, delta_o_proj: (out, m)
            base = getattr(attn, f"{h}_proj").weight  # (out, in) of the frozen projection it corrects
            delta = nn.Linear(m, base.shape[0], **kw)
            init_delta(delta.weight, base, cfg)
            setattr(self, f"delta_{h}_proj", delta)

    def project(self, x):
        """x (B, T, d) -> q, k, v, beta_logit, each (B, T, n, r)."""
        n, r = self.cfg.num_states, self.cfg.rank
        # one matmul for all four (at T = 1, concatenating the small weights is cheaper than three more calls)
        W = torch.cat([self.memory_q_proj.weight, self.memory_k_proj.weight, self.memory_v_proj.weight,
                       self.beta_proj.weight])                                   # (4m, d)
        z = F.linear(x, W).to(x.dtype).unflatten(-1, (4, n, r))  # (B, T, 4, n, r); fp32 again after bf16 autocast
        qk = torch.tanh(z[..., :2, :, :])                                       # (B, T, 2, n, r)
        # F.normalize(qk, dim=-1, eps=1e-6), minus the Python layers around it (they cost more than the math at T = 1)
        q, k = (qk / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min(1e-6)).unbind(-3)
        return q, k, z[..., 2, :, :], z[..., 3, :, :] + self.beta_bias.view(n, r)

    def forward(self, x, state, call, query_x=None):
        """x (B, T, d) -> ({head: correction (B, T, out)}, new state (B, n, r, r)). `call` (model.MemoryCall) says
        which tokens are real, whether to write, the SSW segment ids, and whether to report the mean write gate β.
        `query_x` (B, T, d), frozen_query: the layer's input as the backbone alone computes it, which the reads of
        a read-only call project their queries from. The corrections of the layers below move x alike for every
        question about one state, so a query made from the moved x may not tell which of the state's facts was asked.
        The corrections come in the adapter's dtype (fp32): the caller casts them to that of the outputs they
        are added to."""
        B, T, _ = x.shape
        n, r = self.cfg.num_states, self.cfg.rank
        xm = x.to(self.beta_bias.dtype)
        if state is None:
            state = xm.new_zeros(B, n, r, r)
        ssw = self.cfg.write == "ssw" and call.segment_ids is not None  # without ids SSW writes per token, as officially
        if ssw and call.segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids has shape {tuple(call.segment_ids.shape)}, expected the tokens' {(B, T)}")
        # frozen_query: the call only reads, so of the four only q is used, projected from the backbone's own x
        q, k, v, beta_logit = self.project(xm if query_x is None else query_x.to(xm.dtype))  # (B, T, n, r) each
        written = None  # (beta_logit, mask) of what this call wrote, for the β statistic
        if call.write and not ssw:
            mask = call.real if call.padded else None
            if self.cfg.key_shift:
                k = previous_keys(k, call.real)
            reads, state = self.scan(q, k, v, beta_logit, state, mask)
            written = (beta_logit, mask)
        else:  # every token reads the state from before the call
            reads = torch.einsum("bnij,btnj->btni", state.to(q.dtype), q) * call.real[..., None, None]
            if call.write:
                state, written = self.write_segments(xm, state, call)
        if call.betas is not None and written is not None:
            call.betas.append(masked_mean(torch.sigmoid(written[0]), written[1]))
        if call.write and not self.cfg.write_pass_reads:  # the backbone runs uncorrected: what it writes is its own x
            return {}, state
        read = reads.flatten(-2) * (self.cfg.alpha / r)  # (B, T, m): heads concatenated, scaled
        return {h: F.linear(read, getattr(self, f"delta_{h}_proj").weight) for h in self.cfg.heads}, state

    def scan(self, q, k, v, beta_logit, state, mask):
        """Token writes: the chunked scan, the reference loop (chunk_size 0), or, decoding one unpadded token, a
        single step."""
        if q.shape[1] == 1 and mask is None:
            read, state = delta_rule_step(q, k, v, beta_logit, state.unsqueeze(1))  # (B, 1, n, r), (B, 1, n, r, r)
            return read, state.squeeze(1)
        if self.cfg.chunk_size == 0:
            return delta_rule_loop(q, k, v, beta_logit, state=state, mask=mask)
        return delta_rule_chunked(q, k, v, beta_logit, state=state, mask=mask, chunk_size=self.cfg.chunk_size)

    def write_segments(self, x, state, call):
        """SSW: one write per segment, from the mean of its tokens' x, in segment-id order. Returns the new state and
        the (beta_logit, mask) of the writes (None if nothing was written)."""
        ids = torch.where(call.real, call.segment_ids, -1)  # (B, T); padding never writes
        if int(ids.max()) < 0:  # nothing to write
            return state, None
        means, count = segment_means(x, ids)  # (B, J, d), (B, J)
        q, k, v, beta_logit = self.project(means)  # (B, J, n, r) each
        written = count > 0  # (B, J): segments absent from a row are identity steps
        return self.scan(q, k, v, beta_logit, state, written)[1], (beta_logit, written)


def segment_means(x, ids):
    """SSW: the mean x (B, J, d) of each segment j < J = max(ids) + 1, from x (B, T, d) and segment ids (B, T) (−1: in
    none), and each segment's token count (B, J); a segment absent from a row has count 0 and mean 0."""
    onehot = (ids[..., None] == torch.arange(int(ids.max()) + 1, device=x.device)).to(x.dtype)  # (B, T, J)
    count = onehot.sum(1)  # (B, J)
    return onehot.transpose(1, 2) @ x / count.clamp(min=1)[..., None], count


def previous_keys(k, real):
    """key_shift: the key each token writes under is the one its predecessor projects, k_{t−1} (B, T, n, r). The
    token after "My favourite colour is" then stores its own value under a key made from "...colour is", the same
    kind of context as the question's answer position, whose query has to find it. A call's first real token has no
    predecessor in the call: its key is 0, so it only decays the state (write whole messages, not single tokens)."""
    if k.shape[1] == 1:
        raise ValueError("key_shift: a one-token write has no previous token to key on; write whole messages")
    previous = F.pad(k[:, :-1], (0, 0, 0, 0, 1, 0))                       # (B, T, n, r): k_{t−1}, 0 at t = 0
    return previous * F.pad(real[:, :-1], (1, 0))[..., None, None]        # 0 where token t−1 is padding


def masked_mean(x, mask):
    """Mean of x (B, T, ...) over the positions where mask (B, T) is True (None: all)."""
    if mask is None:
        return x.mean()
    w = mask.to(x.dtype).view(*mask.shape, *[1] * (x.dim() - 2)).expand_as(x)
    return (x * w).sum() / w.sum().clamp(min=1)


def init_delta(weight, base, cfg: DeltaMemConfig):
    """Δ-projection init. "base_slice" (the official base_slice_fixed): zero, except the first w = min(8, r) columns,
    which are the first w columns of the frozen projection, each L2-normalised, times 0.05. "zero": all zero."""
    with torch.no_grad():
        weight.zero_()
        if cfg.init == "base_slice":
            w = min(8, cfg.rank, base.shape[1])
            weight[:, :w] = F.normalize(base[:, :w].float(), dim=0, eps=1e-6) * 0.05


def beta_term(betas: list[Tensor], target: float) -> Tensor:
    """The paper's write-sparsity regulariser: mean over layers of (mean β of the layer's writes − target)²."""
    return ((torch.stack(betas) - target) ** 2).mean() if betas else torch.zeros(())


# ----------------------------------------------------------------------------- attaching

def attach(model, cfg: DeltaMemConfig):
    """Add one DeltaMem module per layer (as self_attn.delta_mem) and freeze everything else."""
    model.requires_grad_(False)
    for block in model.model.layers:
        block.self_attn.delta_mem = DeltaMem(cfg, block.self_attn)
    model.delta_mem_config = cfg
    return model


def adapter_parameters(model) -> dict[str, Tensor]:
    """The trainable δ-mem weights of every layer, by their names in the model (and in adapter files)."""
    return {k: p for k, p in model.named_parameters() if ".delta_mem." in k}


def zero_state(model, batch_size: int = 1) -> list:
    """An empty state, one (B, n, r, r) zero tensor per layer: what a forward with state=None starts from."""
    cfg, mem = model.delta_mem_config, model.model.layers[0].self_attn.delta_mem
    return [mem.beta_bias.new_zeros(batch_size, cfg.num_states, cfg.rank, cfg.rank) for _ in model.model.layers]
