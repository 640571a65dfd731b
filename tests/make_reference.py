"""Make the Hugging Face reference fixtures for the logit-parity tests.

For each tiny architecture below this builds a RANDOM Hugging Face model (fixed
seeds, fp32), perturbs every parameter so that nothing sits at a trivial init
(norm weights at 1, biases at 0), and writes

    tests/fixtures/hf_<name>/config.json            HF config
    tests/fixtures/hf_<name>/generation_config.json  written by save_pretrained
    tests/fixtures/hf_<name>/model.safetensors       fp32 weights, HF key names
    tests/fixtures/hf_<name>/reference.safetensors   input_ids (int64, B x T) and
                                                     logits (fp32, B x T x V)

The logits come from the HF model in eval mode with eager attention, on plain
batches (no padding, no attention mask). The script reloads each checkpoint
from disk and checks that both eager and SDPA attention reproduce them.

This is the only file in the repo that needs `transformers`; keep it out of the
main environment and run it from a separate venv that reuses the installed torch:

    python3 -m venv --system-site-packages /work/venv-ref
    /work/venv-ref/bin/pip install transformers
    /work/venv-ref/bin/python tests/make_reference.py

The fixtures are committed, so the tests themselves never import transformers.
"""

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

FIXTURES = Path(__file__).parent / "fixtures"
BATCH, SEQ_LEN = 3, 11
VOCAB = 128
TOLERANCE = 1e-5  # eager vs SDPA, and in-memory vs reloaded, in fp32

# Shared by every config: tiny, fp32, no special tokens that could fall outside
# the tiny vocab (SmolLM3's defaults point at ids around 128000).
COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
    dtype="float32",
)

# name -> (model class, config). Sizes are picked so that all fixtures together
# stay under ~1.5 MB.
MODELS = {
    # GQA 4:2, explicit head_dim 32 != hidden/heads = 16, untied lm_head.
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=False,
            **COMMON,
        ),
    ),
    # Tied lm_head; head_dim 16 != hidden/heads = 8 (smaller, to fit the budget).
    "qwen3_tied": (
        Qwen3ForCausalLM,
        Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=True,
            **COMMON,
        ),
    ),
    # Shaped like SmolLM2: GQA 3:1 (here 6 q heads, 2 kv heads), head_dim =
    # hidden/heads, tied embeddings, rope_theta 1e5, eps 1e-5.
    "llama": (
        LlamaForCausalLM,
        LlamaConfig(
            hidden_size=96,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e5},
            tie_word_embeddings=True,
            **COMMON,
        ),
    ),
    # In transformers' SmolLM3, no_rope_layers[i] == 1 means layer i USES RoPE
    # and 0 means it is a NoPE layer (SmolLM3Attention: use_rope =
    # config.no_rope_layers[layer_idx]). Here layer 2 has no RoPE.
    "smollm3": (
        SmolLM3ForCausalLM,
        SmolLM3Config(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            no_rope_layers=[1, 1, 0, 1],
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 2e6},
            tie_word_embeddings=True,
            **COMMON,
        ),
    ),
    # Bias on q/k/v (not on o_proj), tied like the small Qwen2/2.5 models.
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            tie_word_embeddings=True,
            **COMMON,
        ),
    ),
}


@torch.no_grad()
def perturb(model, generator):
    """Give every parameter random, non-trivial values.

    Matrices get N(0, 1/fan_in) so activations and logits stay O(1); norm
    weights get U(0.5, 1.5); biases get N(0, 0.2^2). A tied lm_head shares its
    Parameter with embed_tokens, so named_parameters() visits it once.
    """
    for name, p in model.named_parameters():
        if p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=generator) * p.shape[1] ** -0.5)
        elif "norm" in name:
            p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def build(model_cls, config, seed):
    model = model_cls(config).eval()
    model.set_attn_implementation("eager")
    perturb(model, torch.Generator().manual_seed(seed))
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@torch.no_grad()
def logits_of(model, input_ids):
    return model(input_ids=input_ids).logits.float()


def check_reload(model_cls, out_dir, input_ids, logits):
    """Reload from disk with eager and SDPA attention; both must match."""
    for attn in ("eager", "sdpa"):
        reloaded = model_cls.from_pretrained(out_dir, attn_implementation=attn, dtype=torch.float32).eval()
        diff = (logits_of(reloaded, input_ids) - logits).abs().max().item()
        print(f"  reloaded {attn:5s}: max |diff| = {diff:.2e}")
        assert diff < TOLERANCE, f"{out_dir.name}: {attn} logits differ by {diff}"


def make_fixture(name, model_cls, config, seed):
    out_dir = FIXTURES / f"hf_{name}"
    model = build(model_cls, config, seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(seed + 1))
    logits = logits_of(model, input_ids)
    model.save_pretrained(out_dir)
    save_file(
        {"input_ids": input_ids.contiguous(), "logits": logits.contiguous()},
        out_dir / "reference.safetensors",
        # One key only: safetensors writes metadata in hash order, so several keys
        # would make the file bytes differ from run to run.
        metadata={"made_with": f"transformers {transformers.__version__}, torch {torch.__version__}"},
    )
    print(f"{name}: logits {tuple(logits.shape)}, std {logits.std().item():.3f}")
    check_reload(model_cls, out_dir, input_ids, logits)


def main():
    transformers.utils.logging.disable_progress_bar()
    for seed, (name, (model_cls, config)) in enumerate(MODELS.items()):
        make_fixture(name, model_cls, config, seed=1000 + 10 * seed)


if __name__ == "__main__":
    main()
