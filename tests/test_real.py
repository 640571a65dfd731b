"""The bundled SmolLM2-135M-Instruct end to end: converted from its Q4_1 GGUF, it answers like the real model."""
import json

import pytest
import torch

from model import load_model
from tokenizer import load_tokenizer

pytestmark = pytest.mark.real


def test_converted_checkpoint_is_smollm2(smollm2_ckpt):
    cfg = json.loads((smollm2_ckpt / "config.json").read_text())
    assert (cfg["architectures"], cfg["num_hidden_layers"], cfg["hidden_size"]) == (["LlamaForCausalLM"], 30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (9, 3, True)


def test_greedy_answer_names_paris(smollm2_ckpt):
    model, tok = load_model(smollm2_ckpt), load_tokenizer(smollm2_ckpt)
    idx = torch.tensor([tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])])
    ids = [t.item() for t, _ in model.generate(idx, 24, temperature=0, stop_ids=tok.stop_ids)]
    assert "Paris" in tok.decode(ids)

