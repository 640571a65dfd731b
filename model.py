"""A single-file Llama-family decoder: Qwen3, Qwen2/2.5, SmolLM2 (Llama) and SmolLM3.

Mirrors Hugging Face's modeling_llama.py / modeling_qwen3.py / modeling_smollm3.py closely enough that the logits
match to ~1e-6 in fp32 (tests/test_model.py), and the module names equal the checkpoint keys
(`model.layers.0.self_attn.q_proj.weight`), so loading a converted checkpoint is a strict key-for-key copy.
Weights come from load_hf_weights.py. δ-mem (deltamem.py) hooks into Attention.forward: a module attached as
`self_attn.delta_mem` reads its per-layer state and returns corrections to q (before q_norm and RoPE), k, v and the
attention output (after o_proj); `Transformer.forward` carries the states of all layers in and out. The state travels
beside the KV cache, not inside it, because it outlives it: a cache belongs to one visible context and is thrown
away with it, while the state keeps what was written across contexts, processes (saved to a file) and batches.

Dims used in shape comments: B batch, T new tokens, S cached + new tokens, d hidden, nh query heads,
nkv key/value heads, hd head dim, V vocab.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

State = list[torch.Tensor]  # δ-mem: one state (B, n, r, r) per layer, see deltamem.py

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str  # one of ARCHITECTURES
    vocab_size: int  # V: rows of embed_tokens and lm_head
    hidden_size: int  # d
    intermediate_size: int  # width of the SwiGLU MLP
    num_hidden_layers: int  # L: decoder blocks (each gets its own δ-mem state)
    num_attention_heads: int  # nh
    num_key_value_heads: int  # nkv; nh % nkv == 0 (grouped-query attention)
    head_dim: int  # hd; Qwen3 sets it explicitly (not always d // nh)
    rms_norm_eps: float  # epsilon inside every RMSNorm
    rope_theta: float  # RoPE base frequency
    max_position_embeddings: int  # longest context the model was trained for
    tie_word_embeddings: bool  # lm_head shares embed_tokens' weight
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama/Qwen3 `attention_bias`: bias on o_proj as well
    no_rope_layers: tuple[int, ...] = ()  # SmolLM3: indices of layers that skip RoPE

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config.json dict; anything we don't implement is a one-line error."""
        def need(key):
            if key not in cfg:
                raise ValueError(f"{source}: missing key '{key}'")
            return cfg[key]

        arch = (need("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture '{arch}' (supported: {', '.join(ARCHITECTURES)})")
        if cfg.get("num_experts") or cfg.get("num_local_experts"):
            raise ValueError(f"{source}: mixture-of-experts models are not supported")
        # transformers < 5 writes rope_theta + rope_scaling; transformers >= 5 writes both into rope_parameters.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{source}: unsupported RoPE scaling {rope}")
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
            raise ValueError(f"{source}: only a bias-free SiLU-gated MLP is supported")
        n_layers, n_heads = need("num_hidden_layers"), need("num_attention_heads")
        attention_bias = cfg.get("attention_bias", False)
        # SmolLM3: no_rope_layers[i] == 1 means layer i USES RoPE (HF's naming is inverted); 0 = no RoPE.
        # Left out, every `no_rope_layer_interval`-th layer (default 4th) skips RoPE.
        use_rope = [1] * n_layers
        if arch == "SmolLM3ForCausalLM":
            interval = cfg.get("no_rope_layer_interval", 4)
            use_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // n_heads,
            rms_norm_eps=need("rms_norm_eps"),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=need("max_position_embeddings"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            qk_norm=arch == "Qwen3ForCausalLM",
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=arch != "Qwen2ForCausalLM" and attention_bias,
            no_rope_layers=tuple(i for i, r in enumerate(use_rope) if not r),
        )


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight, as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """HF's split-halves RoPE tables for integer positions (B, T) -> cos, sin (B, 1, T, hd), in fp32 then cast."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=positions.device).float() / hd)  # (hd/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head: x*cos + (-x2, x1)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, plus which slots hold real (non-pad) tokens.

    `pos` is the number of slots filled; `length` (B,) counts each row's real tokens, which gives RoPE positions
    when rows are padded differently.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, max_len, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.pos = 0
        self.padded = False  # True once any pad token was written; otherwise the cheap masks suffice
        self.shape = (cfg, batch_size, max_len, device, dtype)
        self.frozen = None  # δ-mem frozen_query: the backbone's own keys and values, for the pass without memory

    def update(self, layer: int, k, v):
        """Store this call's k, v (B, nkv, T, hd) at slots [pos, pos+T); return all filled slots."""
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]  # (B, nkv, S, hd)


@dataclass
class MemoryCall:
    """What one forward call asks of every layer's δ-mem module (deltamem.DeltaMem)."""
    real: torch.Tensor  # (B, T) bool: real tokens read and write; padding does neither
    padded: bool  # False: every token is real, so the scan needs no mask
    write: bool  # False: read only, the state is returned unchanged
    segment_ids: torch.Tensor | None  # (B, T) SSW message id of each token, -1 = not written
    betas: list | None = None  # if a list, each layer that writes appends the mean of its write gates β (training)
    inputs: list | None = None  # if a list, each layer appends the x (B, T, d) its δ-mem projects queries from
    query_x: list | None = None  # frozen_query: per layer, the x (B, T, d) a read projects its queries from


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, use_rope: bool):
        super().__init__()
        self.cfg, self.use_rope = cfg, use_rope
        nh, nkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.delta_mem = None  # deltamem.attach() puts a DeltaMem module here

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, state=None, call: MemoryCall | None = None):
        """x (B, T, d) -> (B, T, d), and this layer's δ-mem state after the call (None without δ-mem)."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        delta = {}
        if self.delta_mem is not None:
            query_x = call.query_x[layer] if call.query_x is not None else None
            if call.inputs is not None:
                call.inputs.append(x if query_x is None else query_x)
            delta, state = self.delta_mem(x, state, call, query_x)  # corrections read from the state, each (B, T, out)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh*hd), (B, T, nkv*hd) x2
        q, k, v = (t + delta[h].to(t.dtype) if h in delta else t for h, t in zip("qkv", (q, k, v)))
        q = q.view(B, T, -1, hd)  # (B, T, nh, hd)
        k = k.view(B, T, -1, hd)  # (B, T, nkv, hd)
        v = v.view(B, T, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd)
        y = self.o_proj(y)  # (B, T, d)
        return (y + delta["o"].to(y.dtype) if "o" in delta else y), state


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, use_rope=layer not in cfg.no_rope_layers)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, state, call):
        h, state = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer, state, call)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), state


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.grad_checkpoint = False  # True: keep only each block's input, recompute the rest in the backward

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, idx, state: State | None = None, write=True, segment_ids=None, cache: KVCache | None = None,
                pad_mask=None, logits=True, betas: list | None = None, inputs: list | None = None
                ) -> tuple[torch.Tensor | None, State | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the δ-mem state after this call (None without δ-mem).

        δ-mem: `state` continues from a carried state (None = fresh zero state); `write=False` only reads it and
        returns it as given (None too); `segment_ids` (B, T) gives SSW its messages. `cache` continues a KV-cached
        sequence (prefill or decode).
        `pad_mask` (B, T), True for real tokens, lets rows of different lengths share a batch (left or right
        padding): pads are never attended to, don't advance positions, and neither read nor write the state.
        `logits=False` skips the final norm and lm_head (a write pass only needs the state) and returns None for them;
        a (B, T) bool tensor computes them only where it is True, as (N, V). `betas`: a list that every writing δ-mem
        layer appends its mean write gate β to (the training loss's sparsity term); nothing is kept between calls.
        `inputs`: a list that every layer appends the x its δ-mem projects queries from: its input, or in a
        frozen_query read the backbone's own.
        """
        B, T = idx.shape
        x = self.model.embed_tokens(idx)  # (B, T, d)
        real = torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        start = cache.pos if cache is not None else 0
        length = cache.length if cache is not None else torch.zeros(B, dtype=torch.long, device=idx.device)
        positions = length[:, None] + (real.cumsum(1) - 1).clamp(min=0)  # (B, T)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)
        mask = None  # None: plain causal (or, decoding one token, nothing to hide)
        if cache is not None:
            cache.valid[:, start:start + T] = real
            cache.length += real.sum(1)
            cache.padded |= pad_mask is not None
        if pad_mask is not None or (cache is not None and (cache.padded or (start > 0 and T > 1))):
            key_real = cache.valid[:, :start + T] if cache is not None else real  # (B, S)
            mask = attention_mask(key_real, start)
        memory = getattr(self, "delta_mem_config", None)
        frozen_query = memory is not None and memory.frozen_query and state is not None and not write
        query_x = self.backbone_inputs(idx, cache, pad_mask) if frozen_query else None
        call = MemoryCall(real, pad_mask is not None, write, segment_ids, betas, inputs, query_x)
        new_state = []
        recompute = self.grad_checkpoint and torch.is_grad_enabled()
        for block, layer_state in zip(self.model.layers, state or [None] * len(self.model.layers)):
            args = (x, cos, sin, mask, cache, layer_state, call)  # a recomputation appends to call.betas again, unused
            x, layer_state = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            new_state.append(layer_state)
        if cache is not None:
            cache.pos += T
        if isinstance(logits, torch.Tensor):
            x = x[logits]  # (N, d): only the positions asked for
        logits = self.lm_head(self.model.norm(x)) if logits is not False else None  # (B, T, V) or (N, V)
        if self.model.layers[0].self_attn.delta_mem is None:
            return logits, None
        return logits, (new_state if write else state)  # read-only: as given (None stays None, the empty state)

    @torch.no_grad()
    def backbone_inputs(self, idx, cache: KVCache | None, pad_mask) -> list[torch.Tensor]:
        """δ-mem frozen_query: every layer's δ-mem input x (B, T, d) as the backbone alone computes it, from a pass
        on an empty state (which reads zero, so nothing is corrected) that keeps its own twin of the KV cache."""
        if cache is not None and cache.frozen is None:
            if cache.pos:
                raise ValueError("frozen_query: this KV cache was first filled by writes; read from its first call")
            cache.frozen = KVCache(*cache.shape)
        inputs = []
        self(idx, None, False, cache=cache.frozen if cache is not None else None, pad_mask=pad_mask, logits=False,
             inputs=inputs)
        return inputs

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None, stop_ids=(),
                 generator=None, pad_mask=None, state: State | None = None, write=True):
        """Yield (next tokens (B,), δ-mem state) one step at a time, with a KV cache; stop once every row hit a stop id.

        temperature 0 means greedy. `pad_mask` marks real tokens in a padded prompt batch. With δ-mem, the prompt and
        every generated token are written to the state (unless write=False); the yielded state includes the token.
        """
        B, T = idx.shape
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.lm_head.weight.dtype)
        logits, state = self(idx, state, write, cache=cache, pad_mask=pad_mask)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
        for _ in range(max_new_tokens):
            tok = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)  # (B,)
            logits, state = self(tok[:, None], state, write, cache=cache)  # writes tok into the cache and state
            yield tok, state
            done |= torch.isin(tok, stop)
            if done.all():
                break


def attention_mask(key_real, start: int):
    """Boolean mask (B, 1, T, S): query t (slot start+t) sees real keys at slots <= its own.

    Each slot also sees itself, so a pad query never has an empty row (softmax over nothing is NaN).
    """
    S = key_real.shape[1]
    q_slot = torch.arange(start, S, device=key_real.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=key_real.device)[None]  # (1, S)
    mask = ((k_slot <= q_slot) & key_real[:, None]) | (k_slot == q_slot)  # (B, T, S)
    return mask[:, None]  # (B, 1, T, S), broadcast over heads


def sample_next(logits, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """Pick one token per row from logits (B, V): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        probs, order = logits.softmax(-1).sort(-1, descending=True)  # (B, V) each
        drop = probs.cumsum(-1) - probs > top_p  # tokens whose predecessors already cover top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def load_model(path, device="cpu", dtype=None) -> Transformer:
    """Load a converted checkpoint directory (config.json + model.safetensors, see load_hf_weights.py)."""
    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not found (convert a checkpoint with load_hf_weights.py)")
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        state = load_file(path / "model.safetensors", device=str(device))
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{path / 'model.safetensors'}: cannot read ({e})") from None
    check_state_dict(checkpoint_shapes(model), state, str(path / "model.safetensors"))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the shared parameter
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)


def checkpoint_shapes(model: Transformer) -> dict:
    """The tensors a checkpoint must hold for this model: key -> shape (a tied lm_head is stored only once)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def check_state_dict(expected: dict, got: dict, source: str):
    """`got` must hold exactly the tensors named in `expected` (key -> shape), each with its shape; one error names
    every tensor that is missing, unexpected or mis-shaped."""
    bad = [f"missing tensor '{k}'" for k in sorted(set(expected) - set(got))]
    bad += [f"unexpected tensor '{k}'" for k in sorted(set(got) - set(expected))]
    bad += [f"tensor '{k}' has shape {tuple(t.shape)}, expected {expected[k]}" for k, t in sorted(got.items())
            if k in expected and tuple(t.shape) != expected[k]]
    if bad:
        raise ValueError(f"{source}: {'; '.join(bad)}")
