"""load_hf_weights.py: Hugging Face and GGUF sources convert to the same model; bad sources fail cleanly."""
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from load_hf_weights import GGUF_NAMES, convert
from model import load_model

FIXTURES = Path(__file__).parent / "fixtures"


def reference(name):
    return load_file(FIXTURES / f"hf_{name}" / "reference.safetensors")


def assert_converted_cleanly(out: Path):
    """Nothing half-written: neither the output directory nor a temporary sibling is left behind."""
    assert not out.exists()
    assert list(out.parent.glob(f".{out.name}.*")) == []


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_hf_conversion_is_a_checked_copy(tmp_path, name):
    with pytest.warns(UserWarning, match="no tokenizer files"):
        convert("hf", FIXTURES / f"hf_{name}", tmp_path / "out")
    ref = reference(name)
    logits, _ = load_model(tmp_path / "out")(ref["input_ids"])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def test_sharded_hf_checkpoint(tmp_path):
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(FIXTURES / "hf_qwen3" / "config.json", src)
    tensors = load_file(FIXTURES / "hf_qwen3" / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[:7], "model-00002-of-00002.safetensors": keys[7:]}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, src / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.warns(UserWarning):
        convert("hf", src, tmp_path / "out")
    ref = reference("qwen3")
    torch.testing.assert_close(load_model(tmp_path / "out")(ref["input_ids"])[0], ref["logits"], rtol=0, atol=1e-5)


def break_tensors(edit):
    def apply(src: Path):
        tensors = load_file(src / "model.safetensors")
        edit(tensors)
        save_file(tensors, src / "model.safetensors")
    return apply


def break_config(edit):
    def apply(src: Path):
        cfg = json.loads((src / "config.json").read_text())
        edit(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
    return apply


def truncate(src: Path):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


QK = "model.layers.1.self_attn.k_norm.weight"
BROKEN = {
    "missing tensor": (break_tensors(lambda t: t.pop(QK)), f"missing tensor '{QK}'"),
    "extra tensor": (break_tensors(lambda t: t.update(extra=torch.zeros(3))), "unexpected tensor 'extra'"),
    "wrong shape": (break_tensors(lambda t: t.update({QK: torch.zeros(7)})), f"'{QK}' has shape \\(7,\\), expected \\(32,\\)"),
    "missing config key": (break_config(lambda c: c.pop("num_hidden_layers")), "missing key 'num_hidden_layers'"),
    "truncated file": (truncate, "model.safetensors: cannot read"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_hf_checkpoint_is_one_clear_error(tmp_path, case):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "hf_qwen3", src)
    damage, message = BROKEN[case]
    damage(src)
    with pytest.raises(ValueError, match=message):
        convert("hf", src, tmp_path / "out")
    assert_converted_cleanly(tmp_path / "out")


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert("hf", FIXTURES / "hf_qwen3", tmp_path / "out")


# ----------------------------------------------------------------------------- GGUF

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion of q/k rows from HF's split-halves RoPE layout to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_key: str) -> str:
    stem, _, kind = hf_key.rpartition(".")
    for pattern, hf in GGUF_NAMES.items():
        parts = stem.split(".")
        layer = parts[2] if parts[:2] == ["model", "layers"] else None
        if hf.format(i=layer) == stem:
            return pattern.format(i=layer) + "." + kind
    raise KeyError(hf_key)


def write_gguf(path: Path, name: str, arch: str, qtype=gguf.GGMLQuantizationType.F32) -> dict:
    """Write a fixture as llama.cpp would (names, metadata, q/k permutation for llama); return its HF tensors."""
    cfg = json.loads((FIXTURES / f"hf_{name}" / "config.json").read_text())
    tensors = load_file(FIXTURES / f"hf_{name}" / "model.safetensors")
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_parameters", cfg).get("rope_theta"))
    for key, t in tensors.items():
        a = t.numpy()
        if arch == "llama" and key.endswith("q_proj.weight"):
            a = permute_qk(a, cfg["num_attention_heads"])
        if arch == "llama" and key.endswith("k_proj.weight"):
            a = permute_qk(a, cfg["num_key_value_heads"])
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(key), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(key), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.mark.parametrize("name, arch", [("llama", "llama"), ("qwen3", "qwen3")])
def test_gguf_f32_gives_the_reference_logits(tmp_path, name, arch):
    # llama: exercises un-permuting attn_q/attn_k; qwen3: not permuted, and q_norm/k_norm names
    write_gguf(tmp_path / "m.gguf", name, arch)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        convert("gguf", tmp_path / "m.gguf", tmp_path / "out")
    ref = reference(name)
    torch.testing.assert_close(load_model(tmp_path / "out")(ref["input_ids"])[0], ref["logits"], rtol=0, atol=1e-5)


# Relative error of a tensor after quantisation (measured on these random fixtures: F16 ~2e-4, Q8_0 ~4e-3,
# Q4_1 ~6e-2); a wrong block layout or a missed un-permutation gives ~1.4 (two unrelated matrices).
QUANT_BOUND = {"F16": 1e-3, "Q8_0": 1e-2, "Q4_1": 0.12}


@pytest.mark.parametrize("qtype", QUANT_BOUND)
def test_gguf_quantized_weights_dequantize_in_place(tmp_path, qtype):
    original = write_gguf(tmp_path / "m.gguf", "llama", "llama", gguf.GGMLQuantizationType[qtype])
    with pytest.warns(UserWarning):
        convert("gguf", tmp_path / "m.gguf", tmp_path / "out")
    converted = load_file(tmp_path / "out" / "model.safetensors")
    assert converted.keys() == original.keys()
    for key, w in original.items():
        err = (converted[key] - w).norm() / w.norm()
        assert err < QUANT_BOUND[qtype], f"{key}: relative error {err:.3g}"


def test_broken_gguf_is_one_clear_error(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama", "llama")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="cut.gguf: not a readable GGUF file"):
        convert("gguf", tmp_path / "cut.gguf", tmp_path / "out")
    assert_converted_cleanly(tmp_path / "out")


def test_gguf_of_another_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'"):
        convert("gguf", tmp_path / "m.gguf", tmp_path / "out")
