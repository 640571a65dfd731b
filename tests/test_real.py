"""The bundled SmolLM2-135M-Instruct end to end: converted from its Q4_1 GGUF, it answers like the real model."""
import json
import re

import pytest
import torch

import train
from data import vocabulary
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


def test_key_warmup_teaches_the_queries_to_find_the_asked_fact(smollm2_ckpt, tmp_path):
    """Where SmolLM2 alone reads a fact's value and where it answers a question, its x tells the three facts of a
    chat apart (in a tiny random model they do not): W_mq, W_mk, and nothing else, learn to pick the asked fact."""
    cfg = train.TrainConfig(ckpt=str(smollm2_ckpt), out=str(tmp_path), write="msw", facts=3, acks=True, filler=1,
                            key_shift=True, write_pass_reads=False, frozen_query=True, key_warmup=200, copy_warmup=0,
                            threads=torch.get_num_threads())
    torch.manual_seed(0)  # the adapter's init
    model, tok, device, autocast = train.setup(cfg)
    before = {k: p.clone() for k, p in train.adapter_parameters(model).items()}
    said = []
    train.key_warmup(model, tok, vocabulary(tok), cfg, device, autocast, lambda text, **kw: said.append(text),
                     histories=16)
    found = [float(m.group(1)) for line in said if (m := re.search(r"finds the fact (\S+)", line))]
    assert found[0] < 0.45 and found[-1] > 0.8, said  # chance 1/3; the fit is on the 48 cached questions
    changed = {k for k, p in train.adapter_parameters(model).items() if not torch.equal(p, before[k])}
    assert changed and all(k.endswith(("memory_q_proj.weight", "memory_k_proj.weight")) for k in changed)
