"""δ-mem adapters and states on disk: safetensors files with metadata saying what they belong to.

An adapter file holds the δ-mem weights of every layer (under their names in the model, see
deltamem.adapter_parameters), the DeltaMemConfig, and the identity of the backbone it was trained on. A state file
holds one (B, n, r, r) tensor per layer and records the backbone, the δ-mem config, the adapter's sha256 and when it
was written. Loading checks all of it and fails with one line naming the file. Every write is atomic
(`atomic_path`): an interrupted save leaves the previous file as it was.
"""
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltamem import DeltaMemConfig, adapter_parameters, attach
from model import check_state_dict


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write a file or directory to; on success it is flushed and renamed
    into place, on any failure (Ctrl-C too) it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    remove(tmp)  # left over from a killed process
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path):
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_writable(path) -> Path:
    """Fail early, before any work, if `path` could not be written: its directory must exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory")
    return path


def write_safetensors(path, tensors: dict, metadata: dict):
    with atomic_path(path) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=metadata)


def read_safetensors(path) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # truncated or not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


# ----------------------------------------------------------------------------- identities

def architecture(cfg: DeltaMemConfig) -> dict:
    """The fields that decide what a trained adapter computes (init and scan settings do not)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("init", "beta_bias_init", "chunk_size")}


def base_model_id(model) -> str:
    """What an adapter or state was made for: the backbone's architecture and shapes (ModelConfig as JSON)."""
    return json.dumps(asdict(model.config), sort_keys=True)


def describe(model_id: str | None) -> str:
    """'Qwen3ForCausalLM (d=2560, layers=36, heads=32/8x128)' for a base_model_id."""
    if not model_id:
        return "an unknown model"
    c = json.loads(model_id)
    return (f"{c['architecture']} (d={c['hidden_size']}, layers={c['num_hidden_layers']}, "
            f"heads={c['num_attention_heads']}/{c['num_key_value_heads']}x{c['head_dim']})")


def config_from(meta: dict, path) -> DeltaMemConfig:
    """The DeltaMemConfig stored in a file's metadata; missing or invalid is one error naming the file."""
    if "deltamem_config" not in meta:
        raise ValueError(f"{path}: not a δ-mem file (no deltamem_config in its metadata)")
    try:
        return DeltaMemConfig(**json.loads(meta["deltamem_config"]))
    except (ValueError, TypeError) as e:  # bad JSON, unknown field, unknown write mode, ...
        raise ValueError(f"{path}: deltamem_config: {e}") from None


def adapter_hash(model) -> str:
    """sha256 over the attached adapter's tensors (name, dtype, shape and bytes of each, in name order)."""
    h = hashlib.sha256()
    for name, p in sorted(adapter_parameters(model).items()):
        t = p.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- adapters

def save_adapter(model, path, metadata: dict | None = None):
    """Write the δ-mem weights + their config + the backbone's identity to one safetensors file, atomically."""
    tensors = {k: p.detach() for k, p in adapter_parameters(model).items()}
    meta = {"deltamem_config": json.dumps(asdict(model.delta_mem_config)), "base_model": base_model_id(model),
            **(metadata or {})}
    write_safetensors(path, tensors, meta)


def load_adapter(model, path):
    """Load δ-mem weights into `model`, attaching δ-mem first if needed; any mismatch is one clear error."""
    tensors, meta = read_safetensors(path)
    cfg = config_from(meta, path)
    attached = getattr(model, "delta_mem_config", None)
    if "base_model" in meta and meta["base_model"] != base_model_id(model):
        raise ValueError(f"{path}: adapter made for {describe(meta['base_model'])}, but the model is "
                         f"{describe(base_model_id(model))}")
    if attached is not None and architecture(attached) != architecture(cfg):
        raise ValueError(f"{path}: adapter has {architecture(cfg)}, the attached δ-mem has {architecture(attached)}")
    params = adapter_parameters(attach(model, cfg) if attached is None else model)
    check_state_dict({k: tuple(p.shape) for k, p in params.items()}, tensors, str(path))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    return model


# ----------------------------------------------------------------------------- states

def save_state(path, state: list, model, metadata: dict | None = None):
    """The δ-mem state (one (B, n, r, r) tensor per layer) as safetensors, atomically, with what wrote it: the
    backbone (base_model), the δ-mem config and its write mode, the adapter's sha256, and when (created: now unless
    `metadata` says otherwise; saved: now). `metadata` adds or overrides string fields, e.g. tokens_written."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {"base_model": base_model_id(model), "deltamem_config": json.dumps(asdict(model.delta_mem_config)),
            "write": model.delta_mem_config.write, "adapter_sha256": adapter_hash(model), "created": now,
            **(metadata or {}), "saved": now}
    write_safetensors(path, {f"layers.{i}": s for i, s in enumerate(state)}, meta)


def load_state(path, model) -> tuple[list, dict]:
    """A state saved by save_state, checked against `model` (backbone, δ-mem config, adapter hash, one finite
    (B, n, r, r) tensor per layer); returns (state, metadata). Any mismatch is one error naming the file."""
    tensors, meta = read_safetensors(path)
    if meta.get("base_model") != base_model_id(model):
        raise ValueError(f"{path}: state made with {describe(meta.get('base_model'))}, but the model is "
                         f"{describe(base_model_id(model))}")
    cfg = model.delta_mem_config
    made_with = architecture(config_from(meta, path))
    if made_with != architecture(cfg):
        raise ValueError(f"{path}: state made with δ-mem {made_with}, but the model has {architecture(cfg)}")
    theirs, ours = meta.get("adapter_sha256", "unknown"), adapter_hash(model)
    if theirs != ours:
        made_by = meta.get("adapter", "file not recorded")
        raise ValueError(f"{path}: state written through adapter sha256:{theirs[:12]} ({made_by}), but the loaded "
                         f"adapter is sha256:{ours[:12]}")
    L = len(model.model.layers)
    if set(tensors) != {f"layers.{i}" for i in range(L)}:
        raise ValueError(f"{path}: expected one state per layer, layers.0 … layers.{L - 1}")
    B = tensors["layers.0"].shape[0] if tensors["layers.0"].dim() == 4 else -1
    for key, t in tensors.items():
        if tuple(t.shape) != (B, cfg.num_states, cfg.rank, cfg.rank) or not t.is_floating_point():
            raise ValueError(f"{path}: {key} is {t.dtype} {tuple(t.shape)}, expected a float (B, {cfg.num_states}, "
                             f"{cfg.rank}, {cfg.rank}) with the same B in every layer")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: {key} holds NaN or infinite values")
    device = model.lm_head.weight.device
    return [tensors[f"layers.{i}"].to(device) for i in range(L)], meta
