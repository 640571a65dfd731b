"""model.py against Hugging Face's reference logits, and its KV cache, padding and sampling against itself."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import KVCache, ModelConfig, Transformer, load_model, sample_next

FIXTURES = Path(__file__).parent / "fixtures"
ARCHS = ["llama", "qwen2", "qwen3", "qwen3_tied", "smollm3"]


def reference(name):
    return load_model(FIXTURES / f"hf_{name}"), load_file(FIXTURES / f"hf_{name}" / "reference.safetensors")


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_transformers(name):
    # tests/make_reference.py saved these logits from transformers' own classes on the same random weights (fp32).
    # Summation order differs (SDPA vs eager attention), so agreement is ~1e-6 on logits of size ~4.
    model, ref = reference(name)
    logits, _ = model(ref["input_ids"])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3", "smollm3"])
def test_cached_decoding_equals_full_forward(name):
    model, ref = reference(name)
    idx = ref["input_ids"]  # (B, T)
    full, _ = model(idx)
    cache = KVCache(model.config, idx.shape[0], idx.shape[1], "cpu", torch.float32)
    parts = [model(idx[:, :4], cache=cache)[0], model(idx[:, 4:7], cache=cache)[0]]  # prefill, then a chunk at pos 4
    parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, idx.shape[1])]  # then token by token
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(side):
    model, ref = reference("qwen3")
    rows = [ref["input_ids"][0, :11], ref["input_ids"][1, :6], ref["input_ids"][2, :2]]
    T = 11
    idx = torch.zeros(3, T, dtype=torch.long)
    real = torch.zeros(3, T, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        idx[i, span], real[i, span] = row, True
    logits, _ = model(idx, pad_mask=real)
    for i, row in enumerate(rows):
        torch.testing.assert_close(logits[i][real[i]], model(row[None])[0][0], rtol=0, atol=1e-5)


def test_padded_generation_equals_each_row_alone():
    model, ref = reference("llama")
    rows = [ref["input_ids"][0, :9], ref["input_ids"][1, :4]]
    idx = torch.zeros(2, 9, dtype=torch.long)
    real = torch.zeros(2, 9, dtype=torch.bool)
    for i, row in enumerate(rows):  # left padding, as for batched generation
        idx[i, 9 - len(row):], real[i, 9 - len(row):] = row, True
    batched = torch.stack([t for t, _ in model.generate(idx, 6, temperature=0, pad_mask=real)], 1)  # (2, 6)
    for i, row in enumerate(rows):
        alone = torch.stack([t for t, _ in model.generate(row[None], 6, temperature=0)], 1)  # (1, 6)
        assert torch.equal(batched[i], alone[0])


def test_greedy_generation_follows_the_argmax_of_full_forwards():
    model, ref = reference("qwen3")
    idx = ref["input_ids"][:1, :5]
    out = torch.stack([t for t, _ in model.generate(idx, 8, temperature=0)], 1)  # (1, 8)
    seq = idx
    for t in range(8):
        nxt = model(seq)[0][:, -1].argmax(-1)
        assert nxt.item() == out[0, t].item()
        seq = torch.cat([seq, nxt[:, None]], 1)


def test_generate_is_deterministic_for_a_seed():
    model, ref = reference("llama")
    idx = ref["input_ids"][:2, :5]

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([t for t, _ in model.generate(idx, 12, temperature=1.0, top_k=50, top_p=0.95, generator=g)], 1)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))  # 24 samples from near-uniform tiny-model logits; equal by chance ~never


def test_generate_stops_when_every_row_hit_a_stop_id():
    model, ref = reference("llama")
    idx = ref["input_ids"][:1, :5]
    first, _ = next(model.generate(idx, 5, temperature=0))
    assert len(list(model.generate(idx, 5, temperature=0, stop_ids=[first.item()]))) == 1


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0, None, None).item() == 1
    assert all(sample_next(logits, 1.0, 1, None, g).item() == 1 for _ in range(20))  # top-k 1 = greedy
    # probs ≈ [.087, .644, .237, .032]: top-p 0.8 keeps {1, 2} (0.644 < 0.8 ≤ 0.881)
    picks = {sample_next(logits, 1.0, None, 0.8, g).item() for _ in range(200)}
    assert picks == {1, 2}


def qwen3_config(**change):
    cfg = json.loads((FIXTURES / "hf_qwen3" / "config.json").read_text())
    cfg.update(change)
    return cfg


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["MixtralForCausalLM"]), "unsupported architecture 'MixtralForCausalLM'"),
    (dict(num_experts=8), "mixture-of-experts"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported RoPE scaling"),
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(hidden_act="gelu"), "SiLU"),
])
def test_unsupported_config_is_one_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(qwen3_config(**change))


def test_missing_config_key_is_named():
    cfg = qwen3_config()
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match="config.json: missing key 'hidden_size'"):
        ModelConfig.from_hf(cfg)


def test_qwen3_4b_config_shapes():
    # Qwen3-4B-Instruct-2507's published config.json (transformers 4.x style); built on the meta device
    cfg = ModelConfig.from_hf(dict(
        architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=5000000, rope_scaling=None, max_position_embeddings=262144, tie_word_embeddings=True,
        attention_bias=False, hidden_act="silu", use_sliding_window=False))
    with torch.device("meta"):
        model = Transformer(cfg)
    per_layer = 2560 * (4096 + 1024 + 1024) + 4096 * 2560 + 2 * 128 + 3 * 2560 * 9728 + 2 * 2560
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 151936 * 2560 + 36 * per_layer + 2560 == 4_022_468_096  # the model card's "4.0B"
    assert round((n_params - 151936 * 2560) / 1e9, 1) == 3.6  # the card's non-embedding count
    assert cfg.qk_norm and cfg.rope_theta == 5000000 and not cfg.qkv_bias


def test_smollm3_default_nope_layers():
    cfg = json.loads((FIXTURES / "hf_smollm3" / "config.json").read_text())
    assert ModelConfig.from_hf(cfg).no_rope_layers == (2,)  # the fixture's [1, 1, 0, 1]
    del cfg["no_rope_layers"]
    cfg["num_hidden_layers"] = 8
    assert ModelConfig.from_hf(cfg).no_rope_layers == (3, 7)  # HF's default: every 4th layer is NoPE
