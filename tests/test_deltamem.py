"""δ-mem attached to a model: state semantics, SSW/MSW, padding, parameter counts, adapter and state files.

Equivalences run in fp64 on a tiny random Qwen3 (tests/fixtures/hf_qwen3) with random, non-trivial adapter weights;
at fp64 the two sides of each check differ only by summation order, ~1e-15 relative, so 1e-10 is a tight bound.
"""
import json
from pathlib import Path

import pytest
import torch

import deltamem
from bench import QWEN3_4B
from deltamem import DeltaMemConfig, attach, delta_rule_loop
from deltamem_io import load_adapter, load_state, save_adapter, save_state
from model import KVCache, MemoryCall, ModelConfig, Transformer, load_model

FIXTURES = Path(__file__).parent / "fixtures"
TOL = dict(rtol=1e-10, atol=1e-10)


def tiny(write="tsw", seed=0, **kw):
    """The tiny Qwen3 in fp64 with δ-mem attached and every adapter weight random (β around 0.3)."""
    model = load_model(FIXTURES / "hf_qwen3", dtype=torch.float64)
    attach(model, DeltaMemConfig(write=write, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".delta_mem." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 - float(name.endswith("beta_bias")))
    return model


def tokens(B=2, T=13, seed=1):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def backbone():
    return load_model(FIXTURES / "hf_qwen3", dtype=torch.float64)


def test_fresh_adapter_and_zero_state_reproduce_the_backbone_exactly():
    idx = tokens()
    base, _ = backbone()(idx)
    for init in ("base_slice", "zero"):
        model = attach(backbone(), DeltaMemConfig(init=init))
        assert torch.equal(model(idx, write=False)[0], base)  # zero state: every read is 0
    model = tiny()
    assert torch.equal(model(idx, write=False)[0], base)  # also with trained-looking weights
    # with writes on, token 0 still reads the empty state (read before write); token 1 reads token 0's write
    logits, _ = model(idx)
    assert torch.equal(logits[:, 0], base[:, 0])
    assert not torch.allclose(logits[:, 1], base[:, 1])


def test_write_false_leaves_the_state_unchanged():
    model = tiny()
    _, state = model(tokens(seed=2))
    logits, after = model(tokens(), state=state, write=False)
    assert all(a is b or torch.equal(a, b) for a, b in zip(after, state))
    assert not torch.allclose(logits, backbone()(tokens())[0])  # the state was read


@pytest.mark.parametrize("write", ["tsw", "msw"])
def test_one_call_equals_split_calls_equals_decoding_with_a_kv_cache(write):
    model, idx = tiny(write), tokens(T=21)
    logits, state = model(idx)
    # split calls without a KV cache: only the state links them. Layer 0's input doesn't depend on the attention
    # context, so its state must come out the same; deeper layers see a shorter context in the second call.
    _, s = model(idx[:, :8])
    _, s = model(idx[:, 8:], state=s)
    torch.testing.assert_close(s[0], state[0], **TOL)
    # with a KV cache as well (prefill, a chunk, then token-by-token decode): same logits and states as one call
    cache = KVCache(model.config, 2, 21, "cpu", torch.float64)
    out, s = model(idx[:, :5], cache=cache)
    parts = [out]
    out, s = model(idx[:, 5:12], state=s, cache=cache)
    parts.append(out)
    for t in range(12, 21):
        out, s = model(idx[:, t:t + 1], state=s, cache=cache)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), logits, **TOL)
    for a, b in zip(s, state):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("write", ["tsw", "msw"])
def test_decode_step_equals_the_reference_loop(write, monkeypatch):
    """One token per call, nothing padded: DeltaMem takes its single-step path (never the chunked scan), and its
    states and corrections are the reference loop's over the same inputs, to 1e-12 in fp64."""
    model = tiny(write)
    mem, n = model.model.layers[1].self_attn.delta_mem, model.delta_mem_config.num_states
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 9, model.config.hidden_size, generator=g, dtype=torch.float64)   # (B, T, d)
    s0 = torch.randn(2, n, 8, 8, generator=g, dtype=torch.float64) * 0.3              # (B, n, r, r)
    reads, final = delta_rule_loop(*mem.project(x), state=s0)                          # (B, T, n, r), (B, n, r, r)
    read = reads.flatten(-2) * (mem.cfg.alpha / mem.cfg.rank)                          # (B, T, m)

    def fail(*args, **kwargs):
        raise AssertionError("a one-token unpadded call reached the chunked scan")
    monkeypatch.setattr(deltamem, "delta_rule_chunked", fail)
    call = MemoryCall(torch.ones(2, 1, dtype=torch.bool), padded=False, write=True, segment_ids=None)
    S, corrections = s0, []
    for t in range(9):
        delta, S = mem(x[:, t:t + 1], S, call)
        corrections.append(delta)
    torch.testing.assert_close(S, final, rtol=1e-12, atol=1e-12)
    for h in ("q", "o"):
        expected = read @ getattr(mem, f"delta_{h}_proj").weight.T                    # (B, T, out)
        torch.testing.assert_close(torch.cat([c[h] for c in corrections], 1), expected, rtol=1e-12, atol=1e-12)


def test_padded_batch_decoding_equals_each_row_alone():
    """A left-padded prompt, then decoding (unpadded one-token calls: the single-step path), gives each row the
    tokens and states it gets alone; a one-token call with a padded row (the masked scan) leaves that row alone."""
    model = tiny()
    rows = [tokens(1, 9, seed=3)[0], tokens(1, 4, seed=4)[0]]
    idx, real = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.bool)
    for i, row in enumerate(rows):
        idx[i, 9 - len(row):], real[i, 9 - len(row):] = row, True
    steps = list(model.generate(idx, 6, temperature=0, pad_mask=real))
    for i, row in enumerate(rows):
        alone = list(model.generate(row[None], 6, temperature=0))
        assert torch.equal(torch.stack([t[i] for t, _ in steps]), torch.stack([t[0] for t, _ in alone]))
        for a, b in zip(steps[-1][1], alone[-1][1]):
            torch.testing.assert_close(a[i:i + 1], b, **TOL)
    state, tok = steps[-1][1], tokens(2, 1, seed=5)
    logits, after = model(tok, state=state, pad_mask=torch.tensor([[True], [False]]))
    alone_logits, alone_after = model(tok[:1], state=[s[:1] for s in state])
    torch.testing.assert_close(logits[:1], alone_logits, **TOL)
    for a, b, s in zip(after, alone_after, state):
        torch.testing.assert_close(a[:1], b, **TOL)
        assert torch.equal(a[1], s[1])


def test_bf16_backbones_keep_an_fp32_state():
    """bf16 autocast over fp32 weights, and bf16 weights: prefill + decode run (the corrections are cast to the
    dtype of the projection they are added to), the state stays fp32, and both track the fp64 model within bf16
    rounding (measured: 2–4e-2 of the largest logit and state entry; bound 0.1)."""
    model, idx = tiny(), tokens(T=13)
    adapter = {k: p for k, p in model.state_dict().items() if ".delta_mem." in k}

    def run(model, dtype, autocast=False):
        cache = KVCache(model.config, 2, 13, "cpu", dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, s = model(idx[:, :10], cache=cache)
            outs = [out]
            for t in range(10, 13):
                out, s = model(idx[:, t:t + 1], state=s, cache=cache)
                outs.append(out)
        return torch.cat(outs, 1), s

    ref, ref_state = run(model, torch.float64)
    bf16 = attach(load_model(FIXTURES / "hf_qwen3", dtype=torch.bfloat16), DeltaMemConfig())
    bf16.load_state_dict(adapter, strict=False)
    for logits, state in (run(model.float(), torch.float32, autocast=True), run(bf16, torch.bfloat16)):
        assert all(s.dtype == torch.float32 for s in state)
        rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
        assert rel(logits, ref) < 0.1 and max(rel(a, b) for a, b in zip(state, ref_state)) < 0.1


def test_msw_has_four_states_and_concatenates_their_reads():
    model = tiny("msw")
    _, state = model(tokens())
    assert state[0].shape == (2, 4, 8, 8)
    assert model.model.layers[0].self_attn.delta_mem.delta_q_proj.weight.shape == (128, 32)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("write, kw", [("tsw", {}), ("ssw", {}), ("msw", {"key_shift": True})])
def test_padding_neither_reads_nor_writes(side, write, kw):
    model = tiny(write, **kw)
    rows = [tokens(1, 13, seed=3)[0], tokens(1, 7, seed=4)[0]]
    segs = [torch.arange(13) // 5, torch.arange(7) // 3]  # SSW: a few messages per row
    idx, seg = torch.zeros(2, 13, dtype=torch.long), torch.full((2, 13), -1)
    real = torch.zeros(2, 13, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(13 - len(row), 13) if side == "left" else slice(0, len(row))
        idx[i, span], seg[i, span], real[i, span] = row, segs[i], True
    _, s0 = model(tokens(2, 9, seed=5))  # start from a non-zero state, so a wrong read would show
    ids = seg if write == "ssw" else None
    logits, state = model(idx, state=s0, pad_mask=real, segment_ids=ids)
    for i, row in enumerate(rows):
        alone, alone_state = model(row[None], state=[s[i:i + 1] for s in s0],
                                   segment_ids=segs[i][None] if write == "ssw" else None)
        torch.testing.assert_close(logits[i][real[i]], alone[0], **TOL)
        for a, b in zip(state, alone_state):
            torch.testing.assert_close(a[i:i + 1], b, **TOL)


def test_ssw_writes_each_segment_mean_once_and_reads_the_state_from_before_the_call():
    model = tiny("ssw")
    _, s0 = model(tokens(2, 9, seed=5))
    idx = tokens(2, 12, seed=6)
    seg = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [-1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, -1]])
    logits, state = model(idx, state=s0, segment_ids=seg)
    # every token read s0, exactly as a read-only pass does
    torch.testing.assert_close(logits, model(idx, state=s0, write=False)[0], **TOL)
    # the state: the reference loop over the per-segment means of each layer's input x (captured by a hook),
    # computed segment by segment here; row 1 has no segment 1, which must not write
    xs = []
    hooks = [b.self_attn.delta_mem.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
             for b in model.model.layers]
    model(idx, state=s0, segment_ids=seg)
    for h in hooks:
        h.remove()
    for layer, x in enumerate(xs):
        mem = model.model.layers[layer].self_attn.delta_mem
        for b in range(2):
            present = [j for j in range(3) if (seg[b] == j).any()]
            means = torch.stack([x[b][seg[b] == j].mean(0) for j in present])[None]  # (1, J, d)
            _, expected = delta_rule_loop(*mem.project(means), state=s0[layer][b:b + 1])
            torch.testing.assert_close(state[layer][b:b + 1], expected, **TOL)


def test_ssw_segment_ids_of_minus_one_write_nothing():
    model, idx = tiny("ssw"), tokens()
    _, s0 = model(tokens(seed=5))
    _, state = model(idx, state=s0, segment_ids=torch.full(idx.shape, -1))
    assert all(torch.equal(a, b) for a, b in zip(state, s0))
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 5\), expected the tokens' \(2, 13\)"):
        model(idx, segment_ids=torch.zeros(2, 5, dtype=torch.long))


def test_ssw_without_segment_ids_writes_token_by_token():
    # the official fallback, and what decoding does: each generated token is its own one-token segment
    ssw, tsw = tiny("ssw"), tiny("tsw")
    idx = tokens()
    for a, b in zip(ssw(idx)[1], tsw(idx)[1]):
        torch.testing.assert_close(a, b, **TOL)


def test_key_shift_writes_each_token_under_its_predecessors_key():
    model, idx = tiny(key_shift=True), tokens()
    _, s0 = model(tokens(2, 9, seed=5))
    xs = []
    hooks = [b.self_attn.delta_mem.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
             for b in model.model.layers]
    _, state = model(idx, state=s0)
    for h in hooks:
        h.remove()
    for layer, x in enumerate(xs):
        q, k, v, beta_logit = model.model.layers[layer].self_attn.delta_mem.project(x)  # (B, T, n, r) each
        shifted = torch.cat([torch.zeros_like(k[:, :1]), k[:, :-1]], 1)  # token t keyed by token t−1; token 0 by 0
        _, expected = delta_rule_loop(q, shifted, v, beta_logit, state=s0[layer])
        torch.testing.assert_close(state[layer], expected, **TOL)
        assert not torch.allclose(state[layer], delta_rule_loop(q, k, v, beta_logit, state=s0[layer])[1])
    with pytest.raises(ValueError, match="one-token write has no previous token"):
        model(idx[:, :1], state=s0)
    with pytest.raises(ValueError, match="does not apply to ssw"):
        DeltaMemConfig(write="ssw", key_shift=True)


def test_without_write_pass_reads_a_write_runs_the_frozen_backbone():
    model, idx = tiny(write_pass_reads=False), tokens()
    _, s0 = model(tokens(2, 9, seed=5))
    logits, state = model(idx, state=s0)
    assert torch.equal(logits, backbone()(idx)[0])  # no token of the write read s0 or the writes before it
    _, expected = tiny()(idx, state=s0)  # the same weights with reads: x differs only through the corrections
    assert not torch.allclose(state[-1], expected[-1])
    torch.testing.assert_close(state[0], expected[0], **TOL)  # layer 0's x comes before any correction
    assert not torch.allclose(model(idx, state=state, write=False)[0], logits)  # a read-only call still reads


def test_frozen_query_reads_with_queries_projected_from_the_backbones_own_x():
    model, plain, idx = tiny("msw", frozen_query=True), tiny("msw"), tokens()
    _, s0 = model(tokens(2, 9, seed=5))
    own = []  # every layer's δ-mem input x on an empty state: the backbone's own (an empty state reads zero)
    model(idx, write=False, inputs=own)
    seen = []  # what each layer got that was given a query_x: its x and that query_x
    record = lambda m, a: seen.append((a[0], a[3])) if a[3] is not None else None
    hooks = [b.self_attn.delta_mem.register_forward_pre_hook(record) for b in model.model.layers]
    logits, _ = model(idx, state=s0, write=False)
    for h in hooks:
        h.remove()
    assert len(seen) == len(own)  # every layer got one (the pass without memory got none)
    for layer, ((x, query_x), x_own) in enumerate(zip(seen, own)):
        torch.testing.assert_close(query_x, x_own, **TOL)
        assert (layer == 0) == torch.allclose(x, x_own)  # above layer 0 the corrections moved x
    # the same weights reading with queries from their moved x answer differently; given the backbone's x, the same
    substitute = lambda layer: lambda m, a: (*a[:3], own[layer])
    assert not torch.allclose(plain(idx, state=s0, write=False)[0], logits)
    hooks = [b.self_attn.delta_mem.register_forward_pre_hook(substitute(i)) for i, b in enumerate(plain.model.layers)]
    torch.testing.assert_close(plain(idx, state=s0, write=False)[0], logits, **TOL)
    for h in hooks:
        h.remove()
    # writes are untouched, and a KV-cached read decodes as one call does (the pass without memory keeps its own cache)
    for a, b in zip(model(idx, state=s0)[1], plain(idx, state=s0)[1]):
        torch.testing.assert_close(a, b, **TOL)
    cache = KVCache(model.config, 2, 13, "cpu", torch.float64)
    parts = [model(idx[:, :6], state=s0, write=False, cache=cache)[0]]
    parts += [model(idx[:, t:t + 1], state=s0, write=False, cache=cache)[0] for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(parts, 1), logits, **TOL)
    cache = KVCache(model.config, 2, 13, "cpu", torch.float64)
    model(idx[:, :6], state=s0, cache=cache)
    with pytest.raises(ValueError, match="KV cache was first filled by writes"):
        model(idx[:, 6:7], state=s0, write=False, cache=cache)
    # without a state, reading generates what the backbone does (evaluate.py's question-only condition)
    greedy = lambda m, **kw: torch.stack([t for t, _ in m.generate(idx[:, :6], 4, temperature=0, **kw)], 1)
    assert torch.equal(greedy(model, state=None, write=False), greedy(backbone()))
    # the queries' projection still learns: its gradient comes through the reads
    model(idx, state=s0, write=False)[0].sum().backward()
    assert model.model.layers[-1].self_attn.delta_mem.memory_q_proj.weight.grad.abs().sum() > 0


def test_gradients_reach_the_memory_through_the_state():
    model = tiny()
    _, state = model(tokens(seed=7))  # write pass
    logits, _ = model(tokens(seed=8), state=state, write=False)  # read pass: the history only via the state
    logits.sum().backward()
    mem = model.model.layers[0].self_attn.delta_mem
    assert mem.memory_k_proj.weight.grad.abs().sum() > 0 and mem.memory_v_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".delta_mem." not in n)


@pytest.mark.parametrize("write, expected", [("tsw", 4_866_336), ("ssw", 4_866_336), ("msw", 19_465_344)])
def test_trainable_parameters_of_qwen3_4b_match_the_paper(write, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(QWEN3_4B))
        attach(model, DeltaMemConfig(write=write, init="zero"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_unknown_write_mode_is_refused():
    with pytest.raises(ValueError, match="unknown write mode 'xyz'"):
        DeltaMemConfig(write="xyz")


def test_adapter_round_trip(tmp_path):
    model, idx = tiny("msw"), tokens()
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = backbone()
    load_adapter(fresh, tmp_path / "a.safetensors")  # attaches δ-mem with the saved config
    assert fresh.delta_mem_config == model.delta_mem_config
    assert torch.equal(fresh(idx)[0], model(idx)[0])


def test_adapter_for_another_backbone_is_refused(tmp_path):
    save_adapter(tiny(), tmp_path / "a.safetensors")
    other = load_model(FIXTURES / "hf_llama", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"made for Qwen3ForCausalLM \(d=64.*but the model is LlamaForCausalLM \(d=96"):
        load_adapter(other, tmp_path / "a.safetensors")


def test_state_round_trip(tmp_path):
    model, idx = tiny(), tokens()
    _, state = model(tokens(seed=9))
    save_state(tmp_path / "s.safetensors", state, model, {"tokens_written": "13"})
    loaded, meta = load_state(tmp_path / "s.safetensors", model)
    assert meta["tokens_written"] == "13"
    assert torch.equal(model(idx, state=loaded)[0], model(idx, state=state)[0])
    with pytest.raises(ValueError, match="state made with"):
        load_state(tmp_path / "s.safetensors", tiny("msw"))


def official_adapter(tmp_path, model, cfg: dict) -> Path:
    """An adapter in the official release format, built from `model`'s δ-mem weights (+ the zero k/v heads)."""
    src = tmp_path / "official"
    src.mkdir()
    (src / "delta_mem_config.json").write_text(json.dumps(cfg))
    weights = {}
    for i, block in enumerate(model.model.layers):
        mem, attn = block.self_attn.delta_mem, block.self_attn
        for name, p in mem.named_parameters():
            weights[f"model.layers.{i}.self_attn.{name.removesuffix('.weight')}"] = p.detach().clone()
        for h in "kv":  # inactive heads are saved too, as zeros
            weights[f"model.layers.{i}.self_attn.delta_{h}_proj"] = torch.zeros(
                getattr(attn, f"{h}_proj").weight.shape[0], mem.memory_q_proj.weight.shape[0], dtype=torch.float64)
    torch.save(weights, src / "delta_mem_adapter.pt")
    return src


OFFICIAL = dict(rank=8, alpha=16.0, num_state_heads=1, memory_write_granularity="token", delta_heads=["q", "o"],
                beta_bias_init=-1.5, couple_lambda=True, state_update_mode="standard")


@pytest.mark.parametrize("write, change", [("tsw", {}), ("ssw", dict(memory_write_granularity="message_mean")),
                                           ("msw", dict(num_state_heads=4))])
def test_official_adapter_converts_to_the_same_model(tmp_path, write, change):
    from load_hf_weights import convert_adapter
    model, idx = tiny(write), tokens()
    src = official_adapter(tmp_path, model, {**OFFICIAL, **change})
    convert_adapter(src, tmp_path / "a.safetensors")
    other = backbone()
    load_adapter(other, tmp_path / "a.safetensors")
    assert other.delta_mem_config.write == write
    assert torch.equal(other(idx)[0], model(idx)[0])


@pytest.mark.parametrize("change, message", [(dict(couple_lambda=False), "couple_lambda"),
                                             (dict(state_update_mode="lambda_outside"), "state_update_mode"),
                                             (dict(memory_write_granularity="sentence_mean"), "memory_write_granularity")])
def test_official_settings_we_do_not_implement_are_refused(tmp_path, change, message):
    from load_hf_weights import convert_adapter
    src = official_adapter(tmp_path, tiny(), {**OFFICIAL, **change})
    with pytest.raises(ValueError, match=message):
        convert_adapter(src, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_the_beta_term_comes_from_its_own_write_pass_only():
    """β is an output of the writing call that asks for it: nothing carries over from earlier calls."""
    from data import episode_loss
    model = tiny()
    batch = lambda seed: dict(write=tokens(seed=seed), write_real=torch.ones(2, 13, dtype=torch.bool),
                              segments=torch.full((2, 13), -1), write_of=torch.arange(2), read=tokens(T=7, seed=seed + 1),
                              read_real=torch.ones(2, 7, dtype=torch.bool),
                              labels=torch.cat([torch.full((2, 4), -100), tokens(T=3, seed=seed + 2)], 1))
    alone = episode_loss(model, batch(20), 0.01, 0.05)
    episode_loss(model, batch(30), 0.01, 0.05)  # another training forward first
    model(tokens(seed=40))  # and an unrelated writing call
    after = episode_loss(model, batch(20), 0.01, 0.05)
    assert after["beta_term"] == alone["beta_term"] and after["beta_mean"] == alone["beta_mean"]
    betas = []
    model(tokens(seed=41), write=False, betas=betas)
    assert betas == []  # a read-only call writes nothing and reports no gates
    model(tokens(seed=41), betas=betas)
    assert len(betas) == len(model.model.layers) and all(0 < b < 1 for b in betas)


@pytest.mark.parametrize("write", ["tsw", "ssw"])
def test_grad_checkpoint_gives_the_same_gradients(write):
    """Recomputing each block in the backward (train.py --grad-checkpoint) changes memory, not results: the loss and
    every adapter gradient equal the plain backward's (fp64, 1e-10)."""
    def grads(recompute):
        model = tiny(write)
        model.grad_checkpoint = recompute
        betas = []
        _, state = model(tokens(seed=7), segment_ids=torch.arange(13).expand(2, 13) // 4, betas=betas)
        logits, _ = model(tokens(T=6, seed=8), state=state, write=False)
        loss = logits.square().mean() + torch.stack(betas).sum()
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    plain, checkpointed = grads(False), grads(True)
    torch.testing.assert_close(checkpointed[0], plain[0], **TOL)
    assert plain[1].keys() == checkpointed[1].keys()
    for name, g in plain[1].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[1][name], g, **TOL)
