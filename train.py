"""Fit a δ-mem adapter on a frozen backbone, then evaluate whether its state remembers.

    python train.py --write tsw                       # the embedded SmolLM2-135M on CPU
    python train.py --write ssw --ckpt checkpoints/qwen3-4b --episodes 2240 --batch-size 32   # one GPU

An episode (DELTAMEM_SPEC.md, "Training"): reset the state; write pass over the chat history (writes on, no KV
cache); read pass over system prompt + question + answer with writes off and WITHOUT the history in context; loss =
cross-entropy on the answer tokens + beta_weight · mean over layers of (mean β − beta_target)², with gradients
through the state into the whole write pass. The task is data.py's facts-in-a-chat. Evaluation compares, on held-out
episodes, the frozen backbone (question only; history in context), the δ-mem state alone, a shuffled state (another
episode's, the informative control) and state + history, with Wilson 95% intervals.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from data import TaskConfig, episodes
from deltamem import DeltaMemConfig, adapter_parameters, attach, base_model_id, load_adapter, save_adapter
from load_hf_weights import default_checkpoint
from model import load_model
from tokenizer import chat_with_segments, load_tokenizer


@dataclass
class TrainConfig:
    # δ-mem
    write: str = "tsw"  # tsw | ssw | msw
    rank: int = 8
    beta_bias_init: float = -4.0  # paper: -1.5; -4 keeps a fact ~0.98 per later token (see README)
    # task (data.py)
    attributes: int = 3
    values: int = 8
    facts: int = 3
    filler: int = 0
    answer: str = "short"
    # optimisation
    episodes: int = 2400  # training episodes in total
    batch_size: int = 8  # episodes per optimizer step
    micro_batch: int = 8  # episodes per forward/backward (accumulated up to batch_size)
    lr: float = 3e-3  # paper: 2e-4 (at 32 episodes/step on a 4B model)
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta_weight: float = 0.01  # weight of the β sparsity term
    beta_target: float = 0.05
    # evaluation and bookkeeping
    eval_every: int = 50  # steps between quick validations
    eval_episodes: int = 64  # episodes per split in the final evaluation
    out: str = "runs/tsw"
    ckpt: str | None = None  # converted backbone directory (default: the embedded SmolLM2-135M-Instruct)
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16 (autocast)
    seed: int = 0
    resume: bool = False  # continue from out/ckpt.pt
    eval_adapter: str | None = None  # skip training: evaluate this saved adapter (its own δ-mem config)

    def task(self) -> TaskConfig:
        return TaskConfig(attributes=self.attributes, values=self.values, facts=self.facts, filler=self.filler,
                          answer=self.answer)

    def memory(self) -> DeltaMemConfig:
        return DeltaMemConfig(write=self.write, rank=self.rank, beta_bias_init=self.beta_bias_init)


# ----------------------------------------------------------------------------- episodes -> tensors

def value_span(tok, ep) -> tuple[list[int], int, int]:
    """Answer ids (+ <|im_end|>) and the [start, end) of the value's tokens in them."""
    head = ep["answer"][: ep["answer"].rindex(" " + ep["value"])]
    ids = tok.encode(ep["answer"]) + [tok.added["<|im_end|>"]]
    start, end = len(tok.encode(head)), len(tok.encode(head + " " + ep["value"]))
    assert ids[:end] == tok.encode(head + " " + ep["value"]), "the value must be whole tokens of the answer"
    return ids, start, end


def pad(rows: list[list[int]], value: int, left=False) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([[value] * (T - len(r)) + r if left else r + [value] * (T - len(r)) for r in rows])


def make_batch(tok, eps: list[dict], device) -> dict:
    """Write pass (history, segment ids) and read pass (question + answer, labels on the answer) tensors."""
    hist = [chat_with_segments(tok, ep["history"]) for ep in eps]
    read, labels, value_pos = [], [], []
    for ep in eps:
        prompt = tok.encode_chat([{"role": "user", "content": ep["question"]}])
        answer, start, end = value_span(tok, ep)
        read.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        value_pos.append((len(prompt) + start, len(prompt) + end))
    t = dict(write=pad([h[0] for h in hist], 0), segments=pad([h[1] for h in hist], -1),
             write_real=pad([[1] * len(h[0]) for h in hist], 0).bool(),
             read=pad(read, 0), read_real=pad([[1] * len(r) for r in read], 0).bool(), labels=pad(labels, -100))
    return {**{k: v.to(device) for k, v in t.items()}, "value_pos": value_pos}


# ----------------------------------------------------------------------------- training

def write_pass(model, b):
    return model(b["write"], pad_mask=b["write_real"], segment_ids=b["segments"])[1]


def episode_loss(model, b, cfg: TrainConfig):
    """(sum of answer-token cross-entropies, β term, answer tokens) for one micro-batch of episodes."""
    state = write_pass(model, b)
    beta_means = torch.stack([blk.self_attn.delta_mem.beta_mean for blk in model.model.layers])  # (L,)
    logits, _ = model(b["read"], state=state, write=False, pad_mask=b["read_real"])
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum")
    beta_term = cfg.beta_weight * ((beta_means - cfg.beta_target) ** 2).mean()
    return ce, beta_term, (b["labels"] != -100).sum(), beta_means.mean().detach(), state


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
            ce, beta_term, _, beta_m, state = episode_loss(model, b, cfg)
        ((ce / n_tokens) + beta_term * len(b["value_pos"]) / len(eps)).backward()
        ce_sum += ce.item()
        beta_mean += beta_m.item() / len(micro)
        norm += torch.stack([s.float().norm(dim=-1).mean() for s in state]).mean().item() / len(micro)
    grad_norm = torch.nn.utils.clip_grad_norm_(adapter_parameters(model).values(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(step=step, loss=ce_sum / n_tokens.item(), lr=lr, beta=beta_mean, state_norm=norm,
                grad_norm=grad_norm.item())


# ----------------------------------------------------------------------------- evaluation

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval for k successes out of n."""
    if n == 0:
        return (0.0, 1.0)
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


CONDITIONS = {  # name -> (history written to the state, history in context, state shuffled across episodes)
    "a_question_only": (False, False, False),
    "b_history_in_context": (False, True, False),
    "c_state_only": (True, False, False),
    "d_shuffled_state": (True, False, True),
    "e_state_and_context": (True, True, False),
}


@torch.no_grad()
def evaluate(model, tok, eps: list[dict], device, autocast, batch_size=16, conditions=CONDITIONS, greedy=True) -> dict:
    """Exact match of the greedy answer and teacher-forced value accuracy per condition (a)–(e).

    greedy=False skips generation (exact match counts stay 0): the cheap check used during training.
    """
    counts = {c: dict(exact=0, value=0, donor=0, n=0) for c in conditions}
    for i in range(0, len(eps), batch_size):
        group = eps[i:i + batch_size]
        b = make_batch(tok, group, device)
        with autocast():
            state = write_pass(model, b)
        for name, (written, in_context, shuffled) in conditions.items():
            s = None if not written else [x.roll(1, 0) for x in state] if shuffled else state
            with autocast():
                exact, value = answer_episodes(model, tok, group, s, in_context, device, greedy)
            donors = [group[(j - 1) % len(group)]["answer"] for j in range(len(group))]
            c = counts[name]
            c["exact"] += sum(a == ep["answer"] for a, ep in zip(exact, group))
            c["donor"] += sum(a == d for a, d in zip(exact, donors))
            c["value"] += sum(value)
            c["n"] += len(group)
    return {name: {**c, "exact_ci": wilson(c["exact"], c["n"]), "value_ci": wilson(c["value"], c["n"])}
            for name, c in counts.items()}


def answer_episodes(model, tok, group, state, in_context: bool, device, greedy=True) -> tuple[list[str], list[bool]]:
    """Greedy answers (text; empty if not greedy) and whether teacher forcing puts the argmax on every value token."""
    prompts, full, spans = [], [], []
    for ep in group:
        messages = (ep["history"] if in_context else []) + [{"role": "user", "content": ep["question"]}]
        prompt = tok.encode_chat(messages)
        answer, start, end = value_span(tok, ep)
        prompts.append(prompt)
        full.append(prompt + answer)
        spans.append((len(prompt) + start, len(prompt) + end))
    texts = [""] * len(group)
    if greedy:  # as many new tokens as the longest answer has, plus one to see whether it stops
        idx = pad(prompts, 0, left=True).to(device)
        real = pad([[1] * len(p) for p in prompts], 0, left=True).bool().to(device)
        n_new = max(len(f) - len(p) for f, p in zip(full, prompts)) + 1
        steps = [t for t, _ in model.generate(idx, n_new, temperature=0, stop_ids=tok.stop_ids, pad_mask=real,
                                              state=state, write=False)]
        out = torch.stack(steps, 1).tolist()  # (B, steps)
        texts = [tok.decode(row[: next((k for k, t in enumerate(row) if t in tok.stop_ids), len(row))]).strip()
                 for row in out]
    ids = pad(full, 0).to(device)
    logits, _ = model(ids, state=state, write=False, pad_mask=pad([[1] * len(f) for f in full], 0).bool().to(device))
    pred = logits.argmax(-1)  # (B, T): pred[:, t] predicts token t + 1
    value = [bool((pred[j, s - 1:e - 1] == ids[j, s:e]).all()) for j, (s, e) in enumerate(spans)]
    return texts, value


def report(results: dict) -> str:
    lines = [f"{'split':8} {'condition':22} {'exact':>18} {'teacher-forced':>18} {'=donor':>7}"]
    for split, res in results.items():
        for name, c in res.items():
            ex, tf = c["exact_ci"], c["value_ci"]
            lines.append(f"{split:8} {name:22} {c['exact'] / c['n']:6.1%} [{ex[0]:.0%},{ex[1]:.0%}]"
                         f"  {c['value'] / c['n']:6.1%} [{tf[0]:.0%},{tf[1]:.0%}] {c['donor'] / c['n']:6.1%}")
    return "\n".join(lines)


def plot_results(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), sharey=True, squeeze=False)
    for ax, (split, res) in zip(axes[0], results.items()):
        names = list(res)
        acc = [res[n]["exact"] / res[n]["n"] for n in names]
        err = [[a - res[n]["exact_ci"][0] for a, n in zip(acc, names)], [res[n]["exact_ci"][1] - a for a, n in zip(acc, names)]]
        ax.bar(range(len(names)), acc, yerr=err, capsize=3, color=["#999", "#69c", "#d62", "#bbb", "#e95"])
        ax.set_xticks(range(len(names)), [n[0] for n in names])
        ax.set_title(f"{split} (n={res[names[0]]['n']})")
    axes[0][0].set_ylabel("exact match (95% Wilson)")
    fig.text(0.5, 0.01, "a question only · b history in context · c state only · d shuffled state · e state + context",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(log: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    """Adapter + optimizer + configs + step + backbone identity, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(adapter={k: p.detach() for k, p in adapter_parameters(model).items()},
                    optimizer=opt.state_dict(), train_config=asdict(cfg), step=step, log=log,
                    base_model=base_model_id(model)), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, opt) -> tuple[int, list]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck["base_model"] != base_model_id(model):
        raise ValueError(f"{path}: checkpoint is for another backbone")
    with torch.no_grad():
        for k, p in adapter_parameters(model).items():
            p.copy_(ck["adapter"][k])
    opt.load_state_dict(ck["optimizer"])
    return ck["step"], ck["log"]


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "write":
            p.add_argument(flag, choices=["tsw", "ssw", "msw"], default=f.default)
        else:
            p.add_argument(flag, type=f.type if f.type in (int, float) else str, default=f.default)
    return TrainConfig(**vars(p.parse_args(argv)))


def setup(cfg: TrainConfig):
    """Backbone + tokenizer, with δ-mem attached fresh (or loaded from --eval-adapter); device and autocast."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    ckpt = cfg.ckpt or default_checkpoint()
    model = load_model(ckpt, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.eval_adapter:
        load_adapter(model, cfg.eval_adapter)
    else:
        attach(model, cfg.memory())
    return model, load_tokenizer(ckpt), device, autocast


def final_evaluation(model, tok, cfg: TrainConfig, device, autocast, out: Path) -> dict:
    """All conditions on the valid, test (held-out pairs) and unseen-values splits: table, eval.json, eval.png."""
    results = {split: evaluate(model, tok, episodes(cfg.task(), split, cfg.eval_episodes, seed=cfg.seed + 1),
                               device, autocast) for split in ("valid", "test", "unseen")}
    print(report(results))
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    plot_results(results, out / "eval.png")
    return results


def main(argv=None):
    cfg = parse_args(argv)
    torch.set_flush_denormal(True)  # denormal states stalled CPU steps for 20–100 s in a prototype
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model, tok, device, autocast = setup(cfg)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if cfg.eval_adapter:
        final_evaluation(model, tok, cfg, device, autocast, out)
        return
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
    final_evaluation(model, tok, cfg, device, autocast, out)
    print(f"wrote {out}/adapter.safetensors, eval.json, eval.png, loss.png ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
