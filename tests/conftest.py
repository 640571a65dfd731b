"""Shared fixtures: a tiny random checkpoint with a tokenizer, and (for the `real` tests) the bundled SmolLM2-135M."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from load_hf_weights import convert, fetch_smollm2_gguf
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A converted-checkpoint directory: random 2-layer Llama over the tiny tokenizer fixture's vocabulary."""
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tok_smollm" / name, out)
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=load_tokenizer(out).vocab_size, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
    (out / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(cfg))
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, out / "model.safetensors")
    return out


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct Q4_1 GGUF (pip-downloaded once into the cache by load_hf_weights)."""
    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_gguf, tmp_path_factory):
    """A fresh conversion of it, so every run exercises the converter on the real file."""
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    convert("gguf", smollm2_gguf, out)
    return out
