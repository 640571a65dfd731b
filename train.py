"""Fit a δ-mem adapter on a frozen backbone, then evaluate whether its state remembers.

    python train.py --write tsw                       # the embedded SmolLM2-135M on CPU, data.py's task, 3 facts
    python train.py --data chats.jsonl --eval-data heldout.jsonl --ckpt checkpoints/qwen3-4b --batch-size 32
    torchrun --nproc_per_node 8 train.py --data chats.jsonl --ckpt checkpoints/qwen3-4b --batch-size 32

An episode (the paper's training section; the official trainer): reset the state; write pass over the chat history
(its messages in ChatML, without the system prompt; writes on, no KV cache); read pass over system prompt + question
+ answer with writes off and WITHOUT the history in context; loss = cross-entropy on the answer tokens + beta_weight ·
mean over layers of (mean β − beta_target)², with gradients through the state into the whole write pass
(data.episode_loss). Before the first episode, `copy_warmup` (ours; --copy-warmup 0 for the paper's init) teaches
the read-out to copy words; without it, no value outside a small trained set was ever recalled. Episodes come from
chats (data.chat_episodes): data.py's synthetic facts-in-a-chat task by default, or --data, a file of
{"messages": [...]} chats. On data.py's task with several facts (the default: three, acknowledged, with small talk)
the run is a curriculum of ours: a one-fact stage (`stages`), then `key_warmup` and the addressing loss beside the
answer's, which teach each question's query to find its fact among the others. Also ours by default: 16×16 states,
token writes keyed by the previous token (--key-shift), a write pass that does not read and reads whose queries come
from the backbone's own x (DeltaMemConfig); each is one flag away from the paper (one fact, as the paper trains:
--rank 8 --facts 1 --no-acks --filler 0 --no-key-shift --write-pass-reads --no-frozen-query). The final evaluation is
evaluate.py's: on held-out episodes, the frozen backbone (question only; history in context), the δ-mem state alone,
a shuffled state (another episode's, the informative control) and state + history, with 95% intervals.

Under torchrun, every rank takes its share of each step's episodes and DistributedDataParallel averages the
adapter's gradients (nccl on CUDA, gloo on CPU); the frozen backbone is loaded by every rank and never synchronised.
Only rank 0 logs, evaluates and writes checkpoints; a checkpoint resumes with any number of ranks.
"""
import argparse
import inspect
import json
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data import (ATTRIBUTES, EpisodeConfig, TaskConfig, address_loss, chat_episodes, episode_loss, episodes,
                  fact_inputs, make_batch, read_chats, task_words, vocabulary, write_pass)
from deltamem import WRITE_MODES, DeltaMemConfig, adapter_parameters, attach
from deltamem_io import atomic_path, base_model_id, load_adapter, save_adapter
from evaluate import CONDITIONS, data_evaluation, evaluate, final_evaluation, pyplot, query_inputs
from load_hf_weights import checkpoint_dir
from model import load_model
from runtime import DTYPES, HelpFormatter, configure, precision
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    # δ-mem
    write: str = "tsw"  # tsw: every token writes; ssw: one write per message; msw: 4 states, every token
    rank: int = 16  # r: each state is r x r (paper: 8; 16 recalls more unseen words: README)
    key_shift: bool | None = None  # token t writes under token t−1's key, made from the context the value follows (paper: its own); leave out for: yes with tsw/msw
    write_pass_reads: bool = False  # the write pass also reads the state (paper); off: the history is written from the frozen x
    frozen_query: bool = True  # reads take their queries from the backbone's own x, not the x the corrections moved (paper: moved)
    beta_bias_init: float = -4.0  # initial write-gate bias: β = sigmoid(-4) = 0.018, a fact keeps ~0.98 per later token (paper: -1.5)
    # data: data.py's task, or chats from a file
    data: str | None = None  # a .json/.jsonl file of {"messages": [...]} chats to train on; leave out for data.py's task
    eval_data: str | None = None  # with --data: held-out chats for the final evaluation (evaluate.py --data)
    supervise: str = "last"  # last: each chat's final assistant message is the target; all: every assistant message
    recent_messages: int = 1  # messages before the target left visible in the read pass; earlier ones are written
    write_len: int = 8192  # written tokens kept per episode (the most recent)
    state_only_prob: float = 0.0  # chance that only the question turn stays visible and the rest is written
    # data.py's task
    attributes: int = 3  # attributes in the task (colour, animal, food, ... up to 8)
    values: int = 8  # training values per attribute
    facts: int = 3  # facts per history, one per attribute; one of them is asked
    filler: int = 1  # small-talk turns placed between and after the facts
    answer: str = "short"  # short: "It's teal." | sentence: "Your favourite colour is teal."
    pool: str = "vocab"  # values: vocab (~16k words from the tokenizer, 1 in 10 never trained) | lists (8 per attribute)
    acks: bool = True  # the assistant acknowledges each fact, as in a chat
    ask_all: bool | None = None  # ask about every fact of a history (one write pass, --facts reads), not one; counts as one episode; leave out for: yes with data.py's task and --facts 2+
    # optimisation
    episodes: int | None = None  # training episodes in total; leave out for 800 (histories, every fact asked) with data.py's task and --facts 2+, else 2400
    batch_size: int = 8  # episodes per optimizer step
    micro_batch: int = 8  # episodes per forward/backward (accumulated up to batch_size)
    lr: float = 3e-3  # peak learning rate (paper: 2e-4 at 32 episodes/step on a 4B model)
    warmup: float = 0.1  # fraction of steps with linear warm-up, then cosine to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    grad_checkpoint: bool = False  # recompute each block's activations in the backward: less memory, ~1.3x the time
    beta_weight: float = 0.01  # weight of the β sparsity term
    beta_target: float = 0.05  # the mean write gate β the sparsity term pulls towards
    copy_warmup: int | None = None  # steps teaching the read-out to copy words first: leave out for 300 (1500 for ssw); 0: none
    init_adapter: str | None = None  # start from this adapter instead (a curriculum: e.g. a 1-fact run's), no copy warm-up
    key_warmup: int | None = None  # steps fitting W_mq, W_mk to find the asked fact's key, on 512 histories, before training (ours); leave out for 400 with data.py's task, --facts 2+, tsw/msw; else 0
    address_weight: float | None = None  # weight of a loss that teaches each query to find the asked fact's key (ours); leave out for 1 as --key-warmup 400, else 0
    one_fact_episodes: int | None = None  # first a stage of this many one-fact episodes without small talk, in out/one_fact; then --facts from its adapter (ours); leave out for 2400 with data.py's task and --facts 2+, else 0
    # evaluation and bookkeeping
    eval_every: int = 25  # steps between quick validations
    eval_episodes: int = 128  # episodes per split in the final evaluation (0: none)
    out: str | None = None  # run directory (ckpt.pt, adapter.safetensors, eval.json, PNGs); leave out for runs/<write>
    ckpt: str | None = None  # converted backbone directory; leave out for the embedded SmolLM2-135M-Instruct
    device: str | None = None  # cpu, cuda, cuda:1, ...; leave out for cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 where this device runs it fast (measured on CPU), else fp32; bf16 = bf16 backbone + autocast, δ-mem and its state fp32
    threads: int = os.cpu_count()  # CPU threads (under torchrun: shared by the local ranks); two jobs on the same cores run 2-6x slower
    seed: int = 0  # seeds the adapter init and the episode stream
    resume: bool = False  # continue from out/ckpt.pt

    def __post_init__(self):
        several = self.data is None and self.facts >= 2  # data.py's task with several facts: the curriculum applies
        address = several and self.write != "ssw"  # SSW: one flag away; it found the facts, recall stayed ~0 (README)
        defaults = dict(key_shift=self.write != "ssw", copy_warmup=1500 if self.write == "ssw" else 300,
                        ask_all=several, one_fact_episodes=2400 if several else 0, episodes=800 if several else 2400,
                        key_warmup=400 if address else 0, address_weight=1.0 if address else 0.0)
        for name, value in defaults.items():  # a flag left out takes the default that fits the others
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.out = self.out or f"runs/{self.write}"
        if self.ask_all and self.data:
            raise ValueError("--ask-all asks about data.py's facts: it does not apply to --data")
        if (self.key_warmup or self.address_weight) and (self.data or self.facts < 2):
            raise ValueError("--key-warmup and --address-weight teach the queries to tell data.py's facts apart: they "
                             "need --facts 2 or more and no --data")
        if self.one_fact_episodes and (self.data or self.facts < 2):
            raise ValueError("--one-fact-episodes is a first stage of data.py's task before --facts 2 or more: "
                             "it needs no --data")

    def task(self) -> TaskConfig:
        return TaskConfig(attributes=self.attributes, values=self.values, facts=self.facts, filler=self.filler,
                          answer=self.answer, pool=self.pool, acks=self.acks)

    def episode_config(self) -> EpisodeConfig:
        return EpisodeConfig(supervise=self.supervise, recent_messages=self.recent_messages, write_len=self.write_len,
                             state_only_prob=self.state_only_prob)

    def memory(self) -> DeltaMemConfig:
        return DeltaMemConfig(write=self.write, rank=self.rank, beta_bias_init=self.beta_bias_init,
                              key_shift=self.key_shift, write_pass_reads=self.write_pass_reads,
                              frozen_query=self.frozen_query)


# ----------------------------------------------------------------------------- episodes

class EpisodeStream:
    """The global batch of episodes of every step, the same whatever the number of ranks: fresh episodes of
    data.py's task (seeded by the step), or the --data file's episodes, shuffled anew every epoch (seeded by it)."""

    def __init__(self, cfg: "TrainConfig", tok):
        self.cfg = cfg
        self.words = task_words(cfg.task(), tok)  # the tokenizer's words, for the "vocab" pool
        self.chats = read_chats(cfg.data) if cfg.data else None
        self.cache = {}  # the two epochs last used -> their episodes in order
        if self.chats is not None and not self.epoch(0):
            raise ValueError(f"{cfg.data}: no chat gives an episode (no target has anything before it to write)")

    def epoch(self, e: int) -> list[dict]:
        if e not in self.cache:
            rng = random.Random(f"{self.cfg.seed}-{e}")
            eps = [ep for c in self.chats for ep in chat_episodes(c, self.cfg.episode_config(), rng)]
            rng.shuffle(eps)
            self.cache = {k: v for k, v in self.cache.items() if k == e - 1} | {e: eps}
        return self.cache[e]

    def batch(self, step: int) -> list[dict]:
        B = self.cfg.batch_size
        if self.chats is None:
            return episodes(self.cfg.task(), "train", B, self.cfg.seed * 1_000_003 + step, self.words, self.cfg.ask_all)
        n = len(self.cache[min(self.cache)])  # every epoch has the same episodes, in another order
        return [self.epoch(i // n)[i % n] for i in range(step * B, (step + 1) * B)]

    def describe(self) -> str:
        if self.chats is None:
            return "data.py's task"
        ecfg, rng = self.cfg.episode_config(), random.Random(0)
        none = sum(not chat_episodes(c, ecfg, rng) for c in self.chats)
        return (f"{self.cfg.data}: {len(self.chats)} chats, {len(self.cache[min(self.cache)])} episodes per epoch"
                + (f"; {none} chats give no episode (nothing before the target to write)" if none else ""))


class EpisodeLoss(nn.Module):
    """data.episode_loss as one module call, so that DistributedDataParallel sees one forward per backward."""

    def __init__(self, model, cfg: "TrainConfig"):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict) -> dict:
        return episode_loss(self.model, batch, self.cfg.beta_weight, self.cfg.beta_target, self.cfg.address_weight)


# ----------------------------------------------------------------------------- training

def get_lr(step: int, total: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """x summed over the ranks (x itself without torchrun)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def train_step(engine, opt, tok, cfg: TrainConfig, stream: EpisodeStream, step: int, total: int, device, autocast,
               rank: int = 0, world: int = 1) -> dict:
    """One optimizer step over the step's batch_size episodes, this rank's share of them in micro-batches. The loss
    is normalised by the answer tokens of the whole step over all ranks, so any number of ranks gives the gradient
    of one process doing the whole batch (DDP averages over ranks, hence the factor `world`)."""
    eps = stream.batch(step)
    mine = eps[rank * len(eps) // world:(rank + 1) * len(eps) // world]
    per = cfg.micro_batch * (cfg.facts if cfg.ask_all else 1)  # --ask-all: a chat's episodes stay in one micro-batch
    micro = [make_batch(tok, mine[i:i + per], device, cfg.write_len) for i in range(0, len(mine), per)]
    n_tokens = all_sum(sum((b["labels"] != -100).sum() for b in micro), world)
    lr = get_lr(step, total, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    ce_sum, beta_mean, norm, top1 = torch.zeros((), device=device), 0.0, 0.0, 0.0
    for i, b in enumerate(micro):
        last = i == len(micro) - 1  # DDP averages the gradients after the last micro-batch's backward only
        with (engine.no_sync() if world > 1 and not last else nullcontext()):
            with autocast():
                out = engine(b)
            aux = out["beta_term"] + out["address_term"]  # per episode
            (world * (out["ce"] / n_tokens + aux * len(b["labels"]) / len(eps))).backward()
        ce_sum += out["ce"].detach()
        beta_mean += out["beta_mean"].item() / len(micro)
        top1 += (out["address_top1"] or 0.0) / len(micro)
        norm += torch.stack([s.float().norm(dim=-1).mean() for s in out["state"]]).mean().item() / len(micro)
    grad_norm = torch.nn.utils.clip_grad_norm_(adapter_parameters(engine).values(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    row = dict(step=step, loss=(all_sum(ce_sum, world) / n_tokens).item(), lr=lr, beta=beta_mean, state_norm=norm,
               grad_norm=grad_norm.item())
    return row | ({"address_top1": top1} if cfg.address_weight else {})


def plot_curve(log: list[dict], path: Path):
    """Training loss and validation recall (state only and the shuffled-state control) against the run's wall
    time, warm-ups included; each stage of a curriculum (another number of facts per history) its own segment."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax2 = ax.twinx()
    stages = []  # runs of rows with the same number of facts
    for r in log:
        if not stages or r.get("facts") != stages[-1][-1].get("facts"):
            stages.append([])
        stages[-1].append(r)
    for i, rows in enumerate(stages):
        t = [r.get("minutes", math.nan) for r in rows]  # logs from before the wall time was logged have none
        val = [(m, r) for m, r in zip(t, rows) if "val_state" in r]
        ax.plot(t, [r["loss"] for r in rows], lw=0.8, c="C0", label=None if i else "train answer CE")
        ax2.plot([m for m, _ in val], [r["val_state"] for _, r in val], "o-", c="C3", ms=4,
                 label=None if i else "val state only")
        ax2.plot([m for m, _ in val], [r["val_shuffled"] for _, r in val], "o-", c="C7", ms=4,
                 label=None if i else "val shuffled state")
        if len(stages) > 1:
            ax.axvline(t[0], ls=":", c="k", lw=0.8)
            ax.text(t[0], 0.98, f" {rows[0].get('facts')} fact(s)", va="top", fontsize=8,
                    transform=ax.get_xaxis_transform())
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("exact match")
    fig.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    ax.set_xlabel("minutes (wall time, warm-ups included)")
    ax.set_ylabel("loss")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- copy warm-up (not in the paper)

@torch.no_grad()
def backbone_inputs(model, idx: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's δ-mem input x and the final norm's 1/rms for the tokens of idx (B, T), from the frozen
    backbone with an empty state: (L, B·T, d) and (B·T, 1), fp32."""
    xs, inv_rms = [], []
    hooks = [block.self_attn.delta_mem.register_forward_hook(lambda m, args, out: xs.append(args[0].float()))
             for block in model.model.layers]
    norm = model.model.norm
    hooks.append(norm.register_forward_pre_hook(
        lambda m, args: inv_rms.append(args[0].float().pow(2).mean(-1, keepdim=True).add(m.eps).rsqrt())))
    try:
        for chunk in idx.split(8):
            with autocast():
                model(chunk, write=False, logits=torch.ones_like(chunk, dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    L, d = len(model.model.layers), xs[0].shape[-1]
    x = torch.stack([torch.cat(xs[layer::L]) for layer in range(L)]).reshape(L, -1, d)  # (L, B·T, d)
    return x, torch.cat(inv_rms).reshape(-1, 1)


def token_examples(model, ids: torch.Tensor, gen, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What TSW writes: every token's own x, from random sequences of the pool's words (ids: (V,) their token ids).
    Returns x (L, N, d), the final norm's 1/rms (N, 1) and each example's word as a pool index (N,)."""
    which = torch.randint(len(ids), (64, 64), generator=gen).to(ids.device)  # (B, T) random words, as pool indices
    x, inv_rms = backbone_inputs(model, ids[which], autocast)  # (L, B·T, d), (B·T, 1)
    return x, inv_rms, which.flatten()


def message_examples(model, tok, words: list[str], gen, autocast, device) -> tuple[torch.Tensor, ...]:
    """What SSW writes: the mean x of a whole message, here a user message stating one of data.py's facts about a
    random pool word ("My favourite colour is teal."; 256 per attribute), in which the word is one token of ~11.
    Returns the means (L, N, d), the messages' mean 1/rms (N, 1) and each message's word as a pool index (N,)."""
    xs, inv, targets = [], [], []
    for attribute in ATTRIBUTES:
        which = torch.randint(len(words), (256,), generator=gen)  # (B,)
        rows = [tok.encode_message({"role": "user", "content": f"My favourite {attribute} is {words[i]}."})
                for i in which.tolist()]  # the same length: pool words are one token here
        x, inv_rms = backbone_inputs(model, torch.tensor(rows, device=device), autocast)  # (L, B·T, d), (B·T, 1)
        B, T = len(rows), len(rows[0])
        xs.append(x.unflatten(1, (B, T)).mean(2))  # (L, B, d)
        inv.append(inv_rms.reshape(B, T, 1).mean(1))  # (B, 1)
        targets.append(which.to(device))
    return torch.cat(xs, 1), torch.cat(inv), torch.cat(targets)


def copy_warmup(model, tok, words: dict, cfg: TrainConfig, device, autocast, say):
    """Teach the read-out to copy before teaching the task (ours, not the paper's). δ-mem's read at a question is
    mostly a sum of the values v = W_mv x written under keys like the question's query; for the answer to be a word
    the adapter never trained on, the path read -> Δo -> logits must carry the word itself. So: tie W_mk to W_mq (a
    query then matches keys written by similar inputs, with positive weight), and fit W_mv and W_Δo of every layer
    so that a written input's value, read back through Δo of every layer and summed, Σ_l (α/r) W_Δo W_mv x_l, as
    the final norm would scale it, makes the frozen lm_head name its word among data.vocabulary's trained words.
    The written inputs are what the write mode writes: a token's own x (TSW, MSW; random word sequences, whatever
    the task) or a message's mean x (SSW; fact messages); each step fits 512 of them."""
    mems = [block.self_attn.delta_mem for block in model.model.layers]
    if "o" not in mems[0].cfg.heads:
        raise ValueError("--copy-warmup fits the Δo read-out: the adapter needs an 'o' head")
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.tensor([tok.encode(" " + w)[0] for w in words["trained"]], device=device)  # (V,)
    if mems[0].cfg.write == "ssw":
        x, inv_rms, target = message_examples(model, tok, words["trained"], gen, autocast, device)
    else:
        x, inv_rms, target = token_examples(model, ids, gen, autocast)  # (L, N, d), (N, 1), (N,)
    with torch.no_grad():
        for m in mems:
            m.memory_k_proj.weight.copy_(m.memory_q_proj.weight)
    E = model.lm_head.weight[ids].float() * model.model.norm.weight.float()  # (V, d): the pool's rows of lm_head ∘ norm
    params = [p for m in mems for p in (m.memory_v_proj.weight, m.delta_o_proj.weight)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scale = mems[0].cfg.alpha / mems[0].cfg.rank
    for step in range(cfg.copy_warmup):
        pick = torch.randint(x.shape[1], (512,), generator=gen).to(device)
        read_out = sum(m.delta_o_proj(m.memory_v_proj(x[layer, pick])) for layer, m in enumerate(mems))  # (512, d)
        loss = F.cross_entropy(scale * read_out * inv_rms[pick] @ E.T, target[pick])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == cfg.copy_warmup - 1:
            say(f"copy warm-up {step + 1}/{cfg.copy_warmup}: loss {loss.item():.2f} (uniform {math.log(len(ids)):.2f})",
                flush=True)


# ----------------------------------------------------------------------------- key warm-up (not in the paper)

def key_warmup(model, tok, words, cfg: TrainConfig, device, autocast, say, histories=512):
    """Teach the queries to find the asked fact before teaching the task (ours, not the paper's). A read of several
    facts returns the one whose key best matches the query; the answer loss alone hardly teaches which one that is.
    So: for `histories` training histories asked about each of their facts, keep every layer's x at the places the
    facts' keys are made from and at each question's answer (data.fact_inputs; one forward each, no gradient), then
    fit W_mq and W_mk of every layer to data.address_loss on them, 384 questions a step (all, if fewer). The x must
    not move as the fit goes: use --no-write-pass-reads (keys from the frozen x) and --frozen-query (queries too)."""
    eps = episodes(cfg.task(), "train", histories, cfg.seed * 1_000_003 - 1, words, ask_all=True)  # not the steps'
    say(f"key warm-up: keeping the x of {histories} histories ({len(eps)} questions), a forward each", flush=True)
    x_facts, x_query, asked = [], [], []
    with torch.no_grad():
        for i in range(0, len(eps), 8 * cfg.facts):  # 8 histories, each asked about every fact
            b = make_batch(tok, eps[i:i + 8 * cfg.facts], device)
            x_write = []
            with autocast():
                state = write_pass(model, b, inputs=x_write)
                xf, xq = fact_inputs(model, b, x_write, query_inputs(model, b, state))  # (L, B, facts, d), (L, B, d)
            x_facts.append(xf.float())
            x_query.append(xq.float())
            asked.append(b["asked"])
    x_facts, x_query, asked = torch.cat(x_facts, 1), torch.cat(x_query, 1), torch.cat(asked)
    mems = [block.self_attn.delta_mem for block in model.model.layers]
    opt = torch.optim.AdamW([p for m in mems for p in (m.memory_q_proj.weight, m.memory_k_proj.weight)], lr=cfg.lr,
                            weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.key_warmup):
        pick = torch.randperm(len(asked), generator=gen)[:384].to(device)  # (384,), or all if fewer
        loss, top1 = address_loss(model, x_facts[:, pick], x_query[:, pick], asked[pick])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == cfg.key_warmup - 1:
            say(f"key warm-up {step + 1}/{cfg.key_warmup}: loss {loss.item():.2f} (chance {math.log(cfg.facts):.2f}), "
                f"query finds the fact {top1:.2f}", flush=True)


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
    helps, choices = field_help(), {"write": WRITE_MODES, "dtype": ["auto", *DTYPES], "answer": ["short", "sentence"],
                                    "supervise": ["last", "all"], "pool": ["lists", "vocab"]}
    for f in fields(TrainConfig):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=helps.get(f.name, " "))
        if f.type in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            kind = {int | None: int, float | None: float}.get(f.type, f.type if f.type in (int, float) else str)
            p.add_argument(flag, type=kind, choices=choices.get(f.name), **kw)
    try:
        return TrainConfig(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def setup(cfg: TrainConfig, threads: int | None = None):
    """Frozen backbone (in the compute dtype: bf16 weights + autocast, or fp32) + tokenizer, with a fresh δ-mem
    attached; device and autocast."""
    device, dtype = configure(cfg.device, cfg.dtype, threads or cfg.threads)
    ckpt = checkpoint_dir(cfg.ckpt)
    model = attach(load_model(ckpt, device=device, dtype=dtype), cfg.memory())
    model.grad_checkpoint = cfg.grad_checkpoint
    return model, load_tokenizer(ckpt), device, lambda: precision(device, dtype)


def distributed(cfg: TrainConfig) -> tuple[int, int, TrainConfig, int]:
    """(rank, world size, cfg, CPU threads): under torchrun, join the process group (nccl on CUDA, gloo on CPU),
    give each rank its GPU or its share of the CPU threads; without torchrun (0, 1, cfg, cfg.threads)."""
    if "RANK" not in os.environ:
        return 0, 1, cfg, cfg.threads
    cuda = torch.cuda.is_available() and cfg.device in (None, "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        sys.exit(f"error: --batch-size {cfg.batch_size} must be a multiple of the {world} ranks")
    if cuda:
        cfg = TrainConfig(**{**asdict(cfg), "device": f"cuda:{os.environ.get('LOCAL_RANK', '0')}"})
    return rank, world, cfg, max(1, cfg.threads // local)


def engine_for(model, cfg: TrainConfig, world: int):
    """The module train_step calls: the episode loss, wrapped in DistributedDataParallel under torchrun. DDP only
    synchronises the adapter: the frozen backbone's tensors are excluded from its start-up broadcast."""
    engine = EpisodeLoss(model, cfg)
    if world == 1:
        return engine
    frozen = [n for n, p in engine.named_parameters() if not p.requires_grad] + [n for n, _ in engine.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(engine, frozen)
    device = model.lm_head.weight.device
    return DistributedDataParallel(engine, device_ids=[device] if device.type == "cuda" else None)


def stages(cfg: TrainConfig) -> list[TrainConfig]:
    """The runs one command makes: cfg, or with --one-fact-episodes first a stage of one fact per history without
    small talk (out/one_fact; from --init-adapter if given) whose adapter cfg's run starts from. A curriculum, ours:
    from the copy warm-up straight to three facts, the answer loss did not fall. --resume continues the stage that
    was interrupted."""
    if not cfg.one_fact_episodes:
        return [cfg]
    first = replace(cfg, facts=1, acks=False, filler=0, ask_all=False, key_warmup=0, address_weight=0,
                    episodes=cfg.one_fact_episodes, one_fact_episodes=0, eval_episodes=0,
                    out=str(Path(cfg.out, "one_fact")))
    second = replace(cfg, init_adapter=str(Path(first.out, "adapter.safetensors")))
    if cfg.resume and Path(cfg.out, "ckpt.pt").is_file():  # the second stage had begun
        return [second]
    return [first, replace(second, resume=False)]


def main(argv=None):
    started = time.time()  # the wall time reported at the end includes every stage, warm-up and the final evaluation
    cfg = parse_args(argv)
    rank, world, cfg, threads = distributed(cfg)
    log = []  # a stage's log goes on in the next one's (its loss.png shows the whole curriculum)
    for stage in stages(cfg):
        log = run(stage, rank, world, threads, started, log)
    if world > 1:  # leave together: a rank that exits while another still saves aborted in gloo (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


def run(cfg: TrainConfig, rank: int, world: int, threads: int, started: float, before: list) -> list[dict]:
    """One training run: warm-ups, the steps with validations and checkpoints, the adapter, the final evaluation.
    `before`: the previous stage's log rows, kept at the head of this run's log. Returns the log."""
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    out, begun = Path(cfg.out), time.time()
    try:
        model, tok, device, autocast = setup(cfg, threads)
        stream = EpisodeStream(cfg, tok)
        params = list(adapter_parameters(model).values())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        step, log = load_checkpoint(out / "ckpt.pt", model, opt) if cfg.resume else (0, list(before))
        if cfg.init_adapter and step == 0:
            load_adapter(model, cfg.init_adapter)
        elif cfg.copy_warmup and step == 0:
            copy_warmup(model, tok, stream.words or vocabulary(tok), cfg, device, autocast, say)
        if cfg.key_warmup and step == 0:
            key_warmup(model, tok, stream.words, cfg, device, autocast, say)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    engine = engine_for(model, cfg, world)
    total = max(1, cfg.episodes // cfg.batch_size)
    say(f"δ-mem {cfg.write}, {cfg.facts} fact(s) per history: {sum(p.numel() for p in params):,} trainable parameters; "
        f"{total} steps of {cfg.batch_size} episodes" + (f" ({world} ranks x {cfg.batch_size // world})" if world > 1 else "")
        + f" on {device}; data: {stream.describe()}", flush=True)
    val = episodes(cfg.task(), "valid", 64, cfg.seed, stream.words) if cfg.data is None else None
    t0, done = time.time(), step
    so_far = log[-1].get("minutes", 0.0) if log else 0.0  # wall minutes of earlier stages, or before an interruption
    try:
        while step < total:
            row = train_step(engine, opt, tok, cfg, stream, step, total, device, autocast, rank, world)
            if not math.isfinite(row["loss"]):
                sys.exit(f"error: loss became {row['loss']} at step {step}; the last good checkpoint is {out / 'ckpt.pt'}")
            step += 1
            row.update(minutes=so_far + (time.time() - begun) / 60, facts=cfg.facts)  # warm-ups included
            rate = (step - done) * cfg.batch_size / (time.time() - t0)
            if rank == 0 and (step % cfg.eval_every == 0 or step == total):
                if val is not None:
                    res = evaluate(model, tok, val, device, autocast,
                                   conditions={k: CONDITIONS[k] for k in ("c_state_only", "d_shuffled_state")})
                    row.update(val_state=res["c_state_only"]["value"] / len(val),
                               val_shuffled=res["d_shuffled_state"]["value"] / len(val))
                save_checkpoint(out / "ckpt.pt", model, opt, cfg, step, log + [row])
            log.append(row)
            extra = f" | query finds the fact {row['address_top1']:.2f}" if "address_top1" in row else ""
            extra += f" | val state {row['val_state']:.0%} shuffled {row['val_shuffled']:.0%}" if "val_state" in row else ""
            say(f"step {step:4d}/{total} loss {row['loss']:.3f} lr {row['lr']:.1e} β {row['beta']:.3f} "
                f"|S| {row['state_norm']:.2f} {rate:.1f} ep/s ETA {(total - step) * cfg.batch_size / rate / 60:.1f} min"
                + extra, flush=True)
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(out / "ckpt.pt", model, opt, cfg, step, log)
        sys.exit(f"interrupted at step {step}; saved {out / 'ckpt.pt'} (continue with --resume)")
    if rank != 0:
        return log
    save_adapter(model, out / "adapter.safetensors", {"train_config": json.dumps(asdict(cfg))})
    plot_curve(log, out / "loss.png")
    wrote = ["adapter.safetensors", "ckpt.pt", "loss.png"]
    if cfg.data is None and cfg.eval_episodes:
        final_evaluation(model, tok, cfg.task(), cfg.eval_episodes, cfg.seed, device, autocast, out)
        wrote += ["eval.json", "eval.png"]
    elif cfg.eval_data:
        eps = [ep for c in read_chats(cfg.eval_data) for ep in chat_episodes(c, cfg.episode_config(), random.Random(0))]
        data_evaluation(model, tok, eps, device, autocast, out)
        wrote.append("eval.json")
    print(f"wrote {', '.join(wrote)} to {out} ({(time.time() - started) / 60:.1f} min)")
    return log


if __name__ == "__main__":
    main()
