"""Fit a δ-mem adapter on a frozen backbone, then evaluate whether its state remembers.

    python train.py --write tsw                       # the embedded SmolLM2-135M on CPU
    python train.py --write ssw --ckpt checkpoints/qwen3-4b --episodes 2240 --batch-size 32   # one GPU

An episode (the paper's training section; the official trainer): reset the state; write pass over the chat history
(its messages in ChatML, without the system prompt; writes on, no KV cache); read pass over system prompt + question
+ answer with writes off and WITHOUT the history in context; loss = cross-entropy on the answer tokens + beta_weight ·
mean over layers of (mean β − beta_target)², with gradients through the state into the whole write pass
(data.episode_loss). The task is data.py's facts-in-a-chat. The final evaluation is evaluate.py's: on held-out episodes, the frozen backbone (question only;
history in context), the δ-mem state alone, a shuffled state (another episode's, the informative control) and state
+ history, with Wilson 95% intervals.
"""
import argparse
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from data import TaskConfig, episode_loss, episodes, make_batch
from deltamem import WRITE_MODES, DeltaMemConfig, adapter_parameters, attach
from deltamem_io import atomic_path, base_model_id, save_adapter
from evaluate import CONDITIONS, evaluate, final_evaluation, pyplot
from load_hf_weights import checkpoint_dir
from model import load_model
from runtime import DTYPES, HelpFormatter, configure, precision
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    # δ-mem
    write: str = "tsw"  # tsw: every token writes; ssw: one write per message; msw: 4 states, every token
    rank: int = 8  # r: each state is r x r
    beta_bias_init: float = -4.0  # initial write-gate bias: β = sigmoid(-4) = 0.018, a fact keeps ~0.98 per later token (paper: -1.5)
    # task (data.py)
    attributes: int = 3  # attributes in the task (colour, animal, food, ... up to 8)
    values: int = 8  # training values per attribute
    facts: int = 3  # facts per history, one per attribute; one of them is asked
    filler: int = 0  # small-talk turns placed between and after the facts
    answer: str = "short"  # short: "It's teal." | sentence: "Your favourite colour is teal."
    # optimisation
    episodes: int = 2400  # training episodes in total
    batch_size: int = 8  # episodes per optimizer step
    micro_batch: int = 8  # episodes per forward/backward (accumulated up to batch_size)
    lr: float = 3e-3  # peak learning rate (paper: 2e-4 at 32 episodes/step on a 4B model)
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    beta_weight: float = 0.01  # weight of the β sparsity term
    beta_target: float = 0.05  # the mean write gate β the sparsity term pulls towards
    # evaluation and bookkeeping
    eval_every: int = 50  # steps between quick validations
    eval_episodes: int = 64  # episodes per split in the final evaluation
    out: str = "runs/tsw"  # run directory: ckpt.pt, adapter.safetensors, eval.json, PNGs
    ckpt: str | None = None  # converted backbone directory; leave out for the embedded SmolLM2-135M-Instruct
    device: str | None = None  # cpu, cuda, cuda:1, ...; leave out for cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 where this device runs it fast (measured on CPU), else fp32; bf16 = bf16 backbone + autocast, δ-mem and its state fp32
    threads: int = os.cpu_count()  # CPU threads; two jobs on the same cores run 2-6x slower: give each a share
    seed: int = 0  # seeds the adapter init and the episode stream
    resume: bool = False  # continue from out/ckpt.pt

    def task(self) -> TaskConfig:
        return TaskConfig(attributes=self.attributes, values=self.values, facts=self.facts, filler=self.filler,
                          answer=self.answer)

    def memory(self) -> DeltaMemConfig:
        return DeltaMemConfig(write=self.write, rank=self.rank, beta_bias_init=self.beta_bias_init)


# ----------------------------------------------------------------------------- training

def get_lr(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_step(model, opt, tok, cfg: TrainConfig, step: int, total: int, device, autocast) -> dict:
    """One optimizer step over batch_size episodes; the loss is normalised by the answer tokens of the whole step."""
    eps = episodes(cfg.task(), "train", cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
    micro = [make_batch(tok, eps[i:i + cfg.micro_batch], device) for i in range(0, len(eps), cfg.micro_batch)]
    n_tokens = sum((b["labels"] != -100).sum() for b in micro)
    lr = get_lr(step, total, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    ce_sum, beta_mean, norm = 0.0, 0.0, 0.0
    for b in micro:
        with autocast():
            out = episode_loss(model, b, cfg.beta_weight, cfg.beta_target)
        ((out["ce"] / n_tokens) + out["beta_term"] * len(b["value_pos"]) / len(eps)).backward()
        ce_sum += out["ce"].item()
        beta_mean += out["beta_mean"].item() / len(micro)
        norm += torch.stack([s.float().norm(dim=-1).mean() for s in out["state"]]).mean().item() / len(micro)
    grad_norm = torch.nn.utils.clip_grad_norm_(adapter_parameters(model).values(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(step=step, loss=ce_sum / n_tokens.item(), lr=lr, beta=beta_mean, state_norm=norm,
                grad_norm=grad_norm.item())


def plot_curve(log: list[dict], path: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=0.8, label="train answer CE")
    val = [r for r in log if "val_state" in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["val_state"] for r in val], "o-", c="C3", label="val state-only acc")
        ax2.plot([r["step"] for r in val], [r["val_shuffled"] for r in val], "o-", c="C7", label="val shuffled acc")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, model, opt, cfg: TrainConfig, step: int, log: list):
    """Adapter + optimizer + configs + step + backbone identity, written atomically (an interrupted save leaves the
    previous checkpoint and no half-written file)."""
    with atomic_path(path) as tmp:
        torch.save(dict(adapter={k: p.detach() for k, p in adapter_parameters(model).items()},
                        optimizer=opt.state_dict(), train_config=asdict(cfg), step=step, log=log,
                        base_model=base_model_id(model)), tmp)


def load_checkpoint(path: Path, model, opt) -> tuple[int, list]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, or not a checkpoint at all
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupt); delete it to start afresh") from None
    if ck["base_model"] != base_model_id(model):
        raise ValueError(f"{path}: checkpoint is for another backbone")
    with torch.no_grad():
        for k, p in adapter_parameters(model).items():
            p.copy_(ck["adapter"][k])
    opt.load_state_dict(ck["optimizer"])
    return ck["step"], ck["log"]


# ----------------------------------------------------------------------------- main

def field_help() -> dict[str, str]:
    """TrainConfig's field comments, which double as the --help texts (one source of truth)."""
    return dict(re.findall(r"^    (\w+): .*?  # (.+)$", inspect.getsource(TrainConfig), re.M))


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    helps, choices = field_help(), {"write": WRITE_MODES, "dtype": ["auto", *DTYPES], "answer": ["short", "sentence"]}
    for f in fields(TrainConfig):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=helps.get(f.name, " "))
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=f.type if f.type in (int, float) else str, choices=choices.get(f.name), **kw)
    return TrainConfig(**vars(p.parse_args(argv)))


def setup(cfg: TrainConfig):
    """Frozen backbone (in the compute dtype: bf16 weights + autocast, or fp32) + tokenizer, with a fresh δ-mem
    attached; device and autocast."""
    device, dtype = configure(cfg.device, cfg.dtype, cfg.threads)
    ckpt = checkpoint_dir(cfg.ckpt)
    model = attach(load_model(ckpt, device=device, dtype=dtype), cfg.memory())
    return model, load_tokenizer(ckpt), device, lambda: precision(device, dtype)


def main(argv=None):
    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model, tok, device, autocast = setup(cfg)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.episodes // cfg.batch_size)
    try:
        step, log = load_checkpoint(out / "ckpt.pt", model, opt) if cfg.resume else (0, [])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"δ-mem {cfg.write}: {sum(p.numel() for p in params):,} trainable parameters; {total} steps of "
          f"{cfg.batch_size} episodes on {device}")
    val = episodes(cfg.task(), "valid", 64, seed=cfg.seed)
    t0, done = time.time(), step
    try:
        while step < total:
            row = train_step(model, opt, tok, cfg, step, total, device, autocast)
            if not math.isfinite(row["loss"]):
                sys.exit(f"error: loss became {row['loss']} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            step += 1
            rate = (step - done) * cfg.batch_size / (time.time() - t0)
            if step % cfg.eval_every == 0 or step == total:
                res = evaluate(model, tok, val, device, autocast, greedy=False,
                               conditions={k: CONDITIONS[k] for k in ("c_state_only", "d_shuffled_state")})
                row.update(val_state=res["c_state_only"]["value"] / len(val),
                           val_shuffled=res["d_shuffled_state"]["value"] / len(val))
                save_checkpoint(out / "ckpt.pt", model, opt, cfg, step, log + [row])
            log.append(row)
            extra = f" | val state {row['val_state']:.0%} shuffled {row['val_shuffled']:.0%}" if "val_state" in row else ""
            print(f"step {step:4d}/{total} loss {row['loss']:.3f} lr {row['lr']:.1e} β {row['beta']:.3f} "
                  f"|S| {row['state_norm']:.2f} {rate:.1f} ep/s ETA {(total - step) * cfg.batch_size / rate / 60:.1f} min"
                  + extra, flush=True)
    except KeyboardInterrupt:
        save_checkpoint(out / "ckpt.pt", model, opt, cfg, step, log)
        sys.exit(f"interrupted at step {step}; saved {out / 'ckpt.pt'} (continue with --resume)")
    save_adapter(model, out / "adapter.safetensors", {"train_config": json.dumps(asdict(cfg))})
    plot_curve(log, out / "loss.png")
    final_evaluation(model, tok, cfg.task(), cfg.eval_episodes, cfg.seed, device, autocast, out)
    print(f"wrote {out}/adapter.safetensors, eval.json, eval.png, loss.png ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
