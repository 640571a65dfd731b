"""Does the δ-mem state remember? Evaluate trained adapters against controls, on data.py's task and on chat data.

    python evaluate.py runs/tsw/adapter.safetensors                     # conditions (a)–(e), 3 splits, Wilson 95%
    python evaluate.py runs/tsw/adapter.safetensors runs/ssw/adapter.safetensors --curves   # capacity, forgetting
    python evaluate.py runs/tsw/adapter.safetensors --probe                                 # does the state hold it?
    python evaluate.py runs/tsw/adapter.safetensors --data heldout.jsonl                    # replies to real chats
    python evaluate.py runs/tsw/adapter.safetensors --locomo locomo10.json --recent-messages 8   # LoCoMo

On data.py's task (train.py's final evaluation uses the same code): (a) frozen backbone, question only (the floor: a
zero state reads 0, so δ-mem adds nothing); (b) frozen backbone with the history in context; (c) δ-mem state only;
(d) a shuffled state, written from another episode's history (the informative control); (e) state + history.
On chats (--data, and LoCoMo, read from its public JSON by `load_locomo`): the generated reply against the reference
with the recent messages only, with the state, with a shuffled state, and with the whole history in context; see
`token_f1` for how our score differs from LoCoMo's official scorer.
"""
import argparse
import json
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from data import (ATTRIBUTES, EpisodeConfig, TaskConfig, address_logits, chat_episodes, chat_with_segments, episodes,
                  fact_inputs, make_batch, pad, read_chats, target_ids, task_words, value_span, write_messages,
                  write_pass)
from deltamem import zero_state
from deltamem_io import load_adapter, read_safetensors
from load_hf_weights import checkpoint_dir
from model import load_model
from runtime import DTYPES, HelpFormatter, configure, precision
from tokenizer import load_tokenizer


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


class Progress:
    """Prints `what: done/total episodes, elapsed, ETA` after each step of a long loop (evaluation can take minutes)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()

    def step(self, n: int, what: str):
        self.done += n
        elapsed = time.time() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"  {what}: {self.done}/{self.total} episodes, {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
              flush=True)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval for k successes out of n."""
    if n == 0:
        return (0.0, 1.0)
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


# ----------------------------------------------------------------------------- the synthetic task

CONDITIONS = {  # name -> (history written to the state, history in context, state shuffled across episodes)
    "a_question_only": (False, False, False),
    "b_history_in_context": (False, True, False),
    "c_state_only": (True, False, False),
    "d_shuffled_state": (True, False, True),
    "e_state_and_context": (True, True, False),
}


@torch.no_grad()
def evaluate(model, tok, eps: list[dict], device, autocast, batch_size=32, conditions=CONDITIONS,
             progress: tuple[Progress, str] | None = None) -> dict:
    """Per condition (a)–(e): exact match (greedy decoding would give exactly the answer's tokens and then stop:
    under teacher forcing, the argmax at every answer position, <|im_end|> included, is the next answer token),
    value accuracy (the argmax is right on the value's tokens), and for a shuffled state how often it gives the
    donor episode's answer exactly; Wilson 95% intervals. `progress`: a Progress and a label for each batch."""
    counts = {c: dict(exact=0, value=0, donor=0, n=0) for c in conditions}
    for i in range(0, len(eps), batch_size):
        group = eps[i:i + batch_size]
        with autocast():
            state = write_pass(model, make_batch(tok, group, device))
        for name, (written, in_context, shuffled) in conditions.items():
            s = None if not written else [x.roll(1, 0) for x in state] if shuffled else state
            with autocast():
                exact, value = teacher_forced(model, tok, group, s, in_context, device)
                if shuffled:  # episode j holds episode j-1's state: does it answer with j-1's answer?
                    donors = [{**ep, "target": d["target"], "value": d["value"]}
                              for ep, d in zip(group, group[-1:] + group[:-1])]
                    counts[name]["donor"] += sum(teacher_forced(model, tok, donors, s, in_context, device)[0])
            c = counts[name]
            c["exact"] += sum(exact)
            c["value"] += sum(value)
            c["n"] += len(group)
        if progress:
            progress[0].step(len(group), f"{progress[1]} ({', '.join(conditions)})")
    return {name: {**c, "exact_ci": wilson(c["exact"], c["n"]), "value_ci": wilson(c["value"], c["n"])}
            for name, c in counts.items()}


def teacher_forced(model, tok, group, state, in_context: bool, device) -> tuple[list[bool], list[bool]]:
    """Read each episode's prompt (its question, after its history if in_context) + answer on `state`: whether the
    argmax is the next token at every answer position (exact match), and at the value's positions."""
    rows, spans = [], []
    for ep in group:
        prompt = tok.encode_chat((ep["write"] if in_context else []) + ep["read"])
        rows.append(prompt + target_ids(tok, ep))
        spans.append((len(prompt), len(rows[-1]), *(len(prompt) + v for v in value_span(tok, ep))))
    ids = pad(rows, 0).to(device)  # (B, T)
    where = torch.zeros_like(ids, dtype=torch.bool)  # positions that predict an answer token
    for j, (start, end, _, _) in enumerate(spans):
        where[j, start - 1:end - 1] = True
    logits, _ = model(ids, state=state, write=False, pad_mask=pad([[1] * len(r) for r in rows], 0).bool().to(device),
                      logits=where)  # (N, V), rows of `where` in order
    right = (logits.argmax(-1) == ids[:, 1:][where[:, :-1]]).tolist()
    exact, value, k = [], [], 0
    for start, end, v0, v1 in spans:
        ok = right[k:k + end - start]
        exact.append(all(ok))
        value.append(all(ok[v0 - start:v1 - start]))
        k += end - start
    return exact, value


def answered_facts(model, tok, group, state, device) -> list[int]:
    """Which of each episode's facts the read on `state` names (question only in context): the index, in the order
    the history tells them, of the fact whose value's first token is the argmax where the value starts (the first
    such fact: "vocab" values are single tokens, but two "lists" values may share a first token); -1 if none."""
    rows, at = [], []
    for ep in group:
        prompt = tok.encode_chat(ep["read"])
        rows.append(prompt + target_ids(tok, ep))
        at.append(len(prompt) + value_span(tok, ep)[0] - 1)  # the position that predicts the value's first token
    ids = pad(rows, 0).to(device)  # (B, T)
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[torch.arange(len(rows)), torch.tensor(at)] = True
    logits, _ = model(ids, state=state, write=False, pad_mask=pad([[1] * len(r) for r in rows], 0).bool().to(device),
                      logits=where)  # (B, V)
    firsts = [[tok.encode(" " + v)[0] for v in ep["facts"]] for ep in group]  # each fact's value, first token
    return [f.index(p) if p in f else -1 for f, p in zip(firsts, logits.argmax(-1).tolist())]


def addressing(model, tok, eps: list[dict], device, autocast, batch_size=32) -> dict:
    """Episodes of several facts, state only: the recall by where the asked fact is in the history (first, second,
    ...), and how often the read names another fact's value instead (the state holds it but the query does not
    pick the asked one)."""
    answered = []
    for i in range(0, len(eps), batch_size):
        group = eps[i:i + batch_size]
        with autocast():
            answered += answered_facts(model, tok, group, write_pass(model, make_batch(tok, group, device)), device)
    asked = [ep["facts"].index(ep["value"]) for ep in eps]
    by_place = [[a == k for a, k in zip(answered, asked) if k == place] for place in range(len(eps[0]["facts"]))]
    return {"recall_by_place": [sum(x) / max(1, len(x)) for x in by_place],
            "another_fact": sum(a not in (-1, k) for a, k in zip(answered, asked)) / len(eps)}


def generate_answers(model, tok, prompts: list[list[int]], state, max_new_tokens: int, device) -> list[str]:
    """Greedy continuations of a left-padded batch of prompts, read-only on `state`, cut at the first stop id."""
    idx = pad(prompts, 0, left=True).to(device)  # (B, T)
    real = pad([[1] * len(p) for p in prompts], 0, left=True).bool().to(device)
    steps = [t for t, _ in model.generate(idx, max_new_tokens, temperature=0, stop_ids=tok.stop_ids, pad_mask=real,
                                          state=state, write=False)]
    out = torch.stack(steps, 1).tolist()  # (B, steps)
    return [tok.decode(row[: next((k for k, t in enumerate(row) if t in tok.stop_ids), len(row))]).strip()
            for row in out]


def report(results: dict) -> str:
    lines = [f"{'split':8} {'condition':22} {'exact':>18} {'teacher-forced':>18} {'=donor':>7}"]
    for split, res in results.items():
        for name, c in res.items():
            ex, tf = c["exact_ci"], c["value_ci"]
            lines.append(f"{split:8} {name:22} {c['exact'] / c['n']:6.1%} [{ex[0]:.0%},{ex[1]:.0%}]"
                         f"  {c['value'] / c['n']:6.1%} [{tf[0]:.0%},{tf[1]:.0%}] {c['donor'] / c['n']:6.1%}")
    return "\n".join(lines)


def plot_results(results: dict, path: Path):
    plt = pyplot()
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


def final_evaluation(model, tok, task: TaskConfig, n: int, seed: int, device, autocast, out: Path) -> dict:
    """All conditions on the valid, test (held-out pairs) and unseen-values splits: table, eval.json, eval.png."""
    splits = ("valid", "test", "unseen")
    progress = Progress(n * len(splits))
    print(f"evaluating {n} episodes per split on {', '.join(splits)}:", flush=True)
    words = task_words(task, tok)
    results = {split: evaluate(model, tok, episodes(task, split, n, seed + 1, words), device, autocast,
                               progress=(progress, split)) for split in splits}
    print(report(results))
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    plot_results(results, out / "eval.png")
    return results


# ----------------------------------------------------------------------------- capacity and forgetting

def curves(model, tok, task: TaskConfig, n: int, seed: int, device, autocast, fillers=(0, 1, 2, 4, 8)) -> dict:
    """Teacher-forced state-only vs shuffled-state accuracy on valid episodes, (1) against the number of facts in
    the history (capacity, no filler; with the "vocab" pool up to all 8 attributes, the untrained ones included;
    with the `addressing` breakdown and, for token writes, the `anatomy`) and (2) against filler turns after a single
    fact (forgetting)."""
    conditions = {k: CONDITIONS[k] for k in ("c_state_only", "d_shuffled_state")}
    words = task_words(task, tok)
    point = lambda eps: {k: v["value"] / v["n"] for k, v in
                         evaluate(model, tok, eps, device, autocast, conditions=conditions).items()}
    most = len(ATTRIBUTES) if task.pool == "vocab" else task.attributes  # vocab words are values of any attribute
    capacity = {}
    for k in range(1, most + 1):
        eps = episodes(TaskConfig(**{**vars(task), "attributes": max(k, task.attributes), "facts": k, "filler": 0}),
                       "valid", n, seed, words)
        several = k > 1 and model.delta_mem_config.write != "ssw"  # anatomy follows token writes
        capacity[k] = {**point(eps), **(addressing(model, tok, eps, device, autocast) if k > 1 else {}),
                       **(anatomy(model, tok, eps, device, autocast) if several else {})}
    forgetting = {}
    for f in fillers:
        eps = [fact_first(ep) for ep in episodes(TaskConfig(**{**vars(task), "facts": 1, "filler": f}), "valid", n,
                                                     seed, words)]
        after = [len(chat_with_segments(tok, ep["write"][1:])[0]) for ep in eps]
        forgetting[f] = {**point(eps), "tokens_after": sum(after) / n}
    return {"capacity": capacity, "forgetting": forgetting, "n": n}


def query_inputs(model, b: dict, state: list) -> list[torch.Tensor]:
    """The x (B, T, d) each layer projects its read-pass queries from: its input as the reads of `state` moved it,
    or with frozen_query the backbone's own (the input on an empty state)."""
    xs = []  # with frozen_query, a pass on an empty state records the same x as a read of `state`, in one pass
    model(b["read"], state=None if model.delta_mem_config.frozen_query else state, write=False,
          pad_mask=b["read_real"], logits=False, inputs=xs)
    return xs


@torch.no_grad()
def anatomy(model, tok, eps: list[dict], device, autocast, batch_size=32) -> dict:
    """Why a state of several facts answers with the wrong one, per layer, for token writes. `kept_by_place`: what is
    left of each fact when the question comes, by its place in the history: the weight β_t·Π_{s>t}(1 − β_s) of the
    write at the last token that spells the fact's value (mean over rows; the erasure along k is left out, so an
    upper bound). `key_match`: how often the question's query q, where the answer starts, has a larger q·k with the
    asked fact's key than with the other facts' (mean over states; chance 1/facts)."""
    mems = [block.self_attn.delta_mem for block in model.model.layers]
    places = len(eps[0]["facts"])
    kept, match = torch.zeros(places, len(mems), dtype=torch.float64), torch.zeros(len(mems), dtype=torch.float64)
    for i in range(0, len(eps), batch_size):
        group = eps[i:i + batch_size]
        b = make_batch(tok, group, device)
        with autocast():
            x_write = []
            state = write_pass(model, b, inputs=x_write)
            x_facts, x_query = fact_inputs(model, b, x_write, query_inputs(model, b, state))  # (L,B,f,d), (L,B,d)
        for l, (mem, xw) in enumerate(zip(mems, x_write)):
            beta_logit = mem.project(xw.to(mem.beta_bias.dtype))[3]  # (B, T, n, r)
            # (B, T, n, r): log λ_t, 0 on padding
            log_keep = torch.nn.functional.logsigmoid(-beta_logit) * b["write_real"][..., None, None]
            later = log_keep.flip(1).cumsum(1).flip(1) - log_keep  # (B, T, n, r): Σ_{s>t} log λ_s
            weight = (torch.sigmoid(beta_logit) * later.exp()).mean((-2, -1))  # (B, T)
            kept[:, l] += weight[b["write_of"][:, None], b["told"]].sum(0).cpu()  # (facts,)
            sims = address_logits(mem, x_facts[l], x_query[l])  # (B, n, facts): q·k per state
            match[l] += (sims.argmax(-1) == b["asked"][:, None]).float().mean(-1).sum().cpu()
    return {"kept_by_place": (kept / len(eps)).tolist(), "key_match": (match / len(eps)).tolist(),
            "key_match_chance": 1 / places}


def fact_first(ep: dict) -> dict:
    """A one-fact episode with its fact (and the acknowledgement, if any) moved to the front of the written
    history, so that all the small talk comes after it."""
    w = ep["write"]
    i = next(i for i, m in enumerate(w) if m["content"].startswith("My favourite"))
    n = 2 if i + 1 < len(w) and w[i + 1]["role"] == "assistant" else 1  # the fact's user turn + its acknowledgement
    return {**ep, "write": w[i:i + n] + w[:i] + w[i + n:]}


def plot_curves(results: dict, path: Path):
    """One line per adapter (solid: state only, dotted: shuffled state; dashed: the state names another fact's
    value) in a capacity and a forgetting panel."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for i, (name, r) in enumerate(results.items()):
        cap, fog = r["capacity"], r["forgetting"]
        ax1.plot(list(cap), [v["c_state_only"] for v in cap.values()], "o-", c=f"C{i}", label=f"{name} state")
        ax1.plot(list(cap), [v["d_shuffled_state"] for v in cap.values()], "o:", c=f"C{i}", alpha=0.6,
                 label=f"{name} shuffled")
        several = {k: v for k, v in cap.items() if "another_fact" in v}
        ax1.plot(list(several), [v["another_fact"] for v in several.values()], "x--", c=f"C{i}", alpha=0.6,
                 label=f"{name} names another fact")
        x = [v["tokens_after"] for v in fog.values()]
        ax2.plot(x, [v["c_state_only"] for v in fog.values()], "o-", c=f"C{i}")
        ax2.plot(x, [v["d_shuffled_state"] for v in fog.values()], "o:", c=f"C{i}", alpha=0.6)
    ax1.set(xlabel="facts in the history", ylabel=f"teacher-forced accuracy (n={r['n']} per point)", ylim=(0, 1),
            title="capacity")
    ax2.set(xlabel="filler tokens after the fact", title="forgetting (one fact)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- a linear probe of the state

@torch.no_grad()
def state_reads(model, b: dict, state: list) -> torch.Tensor:
    """What the layers read from `state` in the read pass, at the position that predicts the value's first token:
    (B, layers·n·r). The read is S q(x), as in DeltaMem.forward, from each layer's `query_inputs`."""
    rows = torch.arange(len(b["value_pos"]))
    pos = torch.tensor([start - 1 for start, _ in b["value_pos"]])
    xs = query_inputs(model, b, state)
    reads = []
    for block, x, S in zip(model.model.layers, xs, state):
        mem = block.self_attn.delta_mem
        q = mem.project(x[rows, pos].to(mem.beta_bias.dtype)[:, None])[0][:, 0]  # (B, n, r)
        reads.append(torch.einsum("bnij,bnj->bni", S.to(q.dtype), q).flatten(1))  # (B, n·r)
    return torch.cat(reads, -1)  # (B, layers·n·r)


@torch.no_grad()
def probe(model, tok, task: TaskConfig, n: int, seed: int, device, autocast, batch_size=32, ridge=1e-2) -> dict:
    """Does the state hold the asked value, whatever the Δ-projections make of it? Ridge regression from the
    state-only reads onto the input embedding of the value's first token, fitted on n training episodes; scored on
    n episodes per split by the nearest neighbour (cosine) among the first tokens of all the task's values, with the
    episode's own state and with a shuffled one. If the probe finds values the model does not say, the read-out is
    the bottleneck; if it does not, the write side is."""
    E = model.model.embed_tokens.weight.float()
    words = task_words(task, tok)
    values = words["trained"] + words["unseen"] if words else [v for a in task.names for v in ATTRIBUTES[a]]
    candidates = torch.tensor(sorted({tok.encode(" " + v)[0] for v in values}))

    def features(eps, shuffled=False):  # reads of each episode's own state (and of a shuffled one) + value ids
        X, X_shuffled, y = [], [], []
        for i in range(0, len(eps), batch_size):
            b = make_batch(tok, eps[i:i + batch_size], device)
            with autocast():
                state = write_pass(model, b)
                X.append(state_reads(model, b, state).float().cpu())
                if shuffled:
                    X_shuffled.append(state_reads(model, b, [s.roll(1, 0) for s in state]).float().cpu())
            y += [b["read"][j, start].item() for j, (start, _) in enumerate(b["value_pos"])]
        return torch.cat(X), (torch.cat(X_shuffled) if shuffled else None), torch.tensor(y)

    def nearest(X, W, mu_x, mu_y):  # the candidate token whose embedding is closest to the probe's prediction
        C = torch.nn.functional.normalize(E[candidates].cpu(), dim=-1)  # (K, d)
        return candidates[(torch.nn.functional.normalize((X - mu_x) @ W + mu_y, dim=-1) @ C.T).argmax(-1)]

    X, _, y = features(episodes(task, "train", n, seed, words))
    Y = E[y].cpu()  # (N, d)
    mu_x, mu_y = X.mean(0), Y.mean(0)
    G = (X - mu_x).T @ (X - mu_x)  # (D, D)
    W = torch.linalg.solve(G + ridge * G.trace() / len(G) * torch.eye(len(G)), (X - mu_x).T @ (Y - mu_y))  # (D, d)
    out = {"fit": (nearest(X, W, mu_x, mu_y) == y).float().mean().item(), "chance": 1 / len(candidates), "n": n}
    for split in ("valid", "test", "unseen"):
        X_state, X_shuffled, ys = features(episodes(task, split, n, seed + 1, words), shuffled=True)
        out[split] = {condition: (nearest(Xs, W, mu_x, mu_y) == ys).float().mean().item()
                      for condition, Xs in (("state", X_state), ("shuffled", X_shuffled))}
    return out


def report_probe(res: dict) -> str:
    lines = [f"linear probe: nearest value to the predicted embedding (fit on {res['n']} training episodes: "
             f"{res['fit']:.1%}; chance {res['chance']:.1%})", f"{'split':8} {'state':>7} {'shuffled':>9}"]
    lines += [f"{split:8} {res[split]['state']:7.1%} {res[split]['shuffled']:9.1%}" for split in ("valid", "test", "unseen")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- LoCoMo

def load_locomo(path) -> list[dict]:
    """The public LoCoMo JSON as [{"messages": [...], "qa": [...]}], checked field by field.

    Each session becomes one message announcing its date ("Session 3, 1:56 pm on 8 May, 2023.") followed by its
    turns, every turn a user message "Speaker: text" (plus " [shares <caption>]" for shared images).
    """
    path = Path(path)
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable LoCoMo JSON file ({e})") from None
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{path}: expected a non-empty list of samples")
    out = []
    for i, s in enumerate(samples):
        where = f"{path}: sample {i}"
        if not isinstance(s, dict) or not isinstance(s.get("conversation"), dict) or not isinstance(s.get("qa"), list):
            raise ValueError(f"{where}: needs a 'conversation' object and a 'qa' list")
        conv = s["conversation"]
        sessions = sorted((int(k.split("_")[1]), k) for k in conv if re.fullmatch(r"session_\d+", k))
        if not sessions:
            raise ValueError(f"{where}: conversation has no session_N lists")
        messages = []
        for n, key in sessions:
            messages.append({"role": "user", "content": f"Session {n}, {conv.get(key + '_date_time', 'date unknown')}."})
            for j, turn in enumerate(conv[key]):
                if not isinstance(turn, dict) or not {"speaker", "text"} <= set(turn):
                    raise ValueError(f"{where}: {key}[{j}] needs 'speaker' and 'text'")
                shared = f" [shares {turn['blip_caption']}]" if turn.get("blip_caption") else ""
                messages.append({"role": "user", "content": f"{turn['speaker']}: {turn['text']}{shared}"})
        for j, q in enumerate(s["qa"]):
            if not isinstance(q, dict) or "question" not in q or "category" not in q:
                raise ValueError(f"{where}: qa[{j}] needs 'question' and 'category'")
            if q["category"] != 5 and "answer" not in q:
                raise ValueError(f"{where}: qa[{j}] (category {q['category']}) has no 'answer'")
        out.append({"messages": messages, "qa": [q for q in s["qa"] if q["category"] in (1, 2, 3, 4)]})
    return out


def normalize_answer(s) -> list[str]:
    """Lower-case words without punctuation and without the articles a/an/the (and 'and', as LoCoMo's scorer)."""
    s = "".join(c for c in str(s).lower() if c not in string.punctuation)
    return [w for w in s.split() if w not in ("a", "an", "the", "and")]


def token_f1(prediction: str, answer) -> float:
    """Token-level F1 of normalised words. The official LoCoMo scorer also Porter-stems every word, splits
    category-1 answers at commas (mean over parts of the best match) and keeps only the part of category-3 answers
    before ';'; we score the whole answer as one string, unstemmed, in every category."""
    p, a = normalize_answer(prediction), normalize_answer(answer)
    common = sum((Counter(p) & Counter(a)).values())
    if common == 0:
        return 0.0
    precision_, recall = common / len(p), common / len(a)
    return 2 * precision_ * recall / (precision_ + recall)


def locomo_episodes(samples: list[dict], recent_messages: int) -> list[dict]:
    """Every scored LoCoMo question as an episode of its conversation: the last `recent_messages` messages visible,
    the earlier ones written, the question asked ("... Answer briefly."), the gold answer the reference."""
    out = []
    for s in samples:
        split = max(0, len(s["messages"]) - recent_messages)
        for q in s["qa"]:
            ask = {"role": "user", "content": f"{q['question']} Answer briefly."}
            out.append({"write": s["messages"][:split], "read": s["messages"][split:] + [ask],
                        "target": str(q["answer"]), "category": str(q["category"])})
    return out


DATA_CONDITIONS = {  # name -> (state: None / "own" / "shuffled", written messages also in context)
    "recent_only": (None, False),
    "state_and_recent": ("own", False),
    "shuffled_state_and_recent": ("shuffled", False),
    "full_history_in_context": (None, True),
}


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean."""
    n = len(xs)
    if n < 2:
        return (0.0, 1.0)
    m = sum(xs) / n
    half = 1.96 * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
    return (max(0.0, m - half), min(1.0, m + half))


@torch.no_grad()
def data_evaluation(model, tok, eps: list[dict], device, autocast, out: Path | None = None, window: int = 2048,
                    max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Generated replies against the reference targets, per condition (DATA_CONDITIONS): exact match (normalised
    words equal; Wilson 95%) and token F1 (mean, normal 95%), overall and per `category` where episodes have one.
    Each episode's written messages go into a fresh state as data.write_messages writes them (windows of `window`
    tokens); the shuffled control reads the state of the next episode with another history. The full history in context is scored only on
    the episodes it fits in the model's context (its n says how many)."""
    limit = model.config.max_position_embeddings - max_new_tokens
    keys = [json.dumps(ep["write"]) for ep in eps]
    donors = [next((k for k in [*range(i + 1, len(eps)), *range(i)] if keys[k] != keys[i]), i) for i in range(len(eps))]
    states, cache = [], {}
    progress = Progress(len(eps) * (1 + len(DATA_CONDITIONS)))
    for i, ep in enumerate(eps):  # histories shared by several episodes (LoCoMo) are written once
        key = keys[i]
        if key not in cache:
            with autocast():
                cache[key] = write_messages(model, tok, zero_state(model), ep["write"], window)[0]
        states.append(cache[key])
        if (i + 1) % batch_size == 0 or i + 1 == len(eps):
            progress.step((i % batch_size) + 1, "writing the histories")
    scores = {}
    for name, (which, in_context) in DATA_CONDITIONS.items():
        rows = []
        for j in range(0, len(eps), batch_size):
            group = list(range(j, min(j + batch_size, len(eps))))
            prompts = [tok.encode_chat((eps[k]["write"] if in_context else []) + eps[k]["read"]) for k in group]
            keep = [k for k, p in zip(group, prompts) if len(p) <= limit]
            prompts = [p for p in prompts if len(p) <= limit]
            if prompts:
                source = {"own": keep, "shuffled": [donors[k] for k in keep]}.get(which)
                state = None if source is None else [torch.cat([states[k][l] for k in source])
                                                     for l in range(len(model.model.layers))]
                with autocast():
                    replies = generate_answers(model, tok, prompts, state, max_new_tokens, device)
                rows += [(eps[k], r) for k, r in zip(keep, replies)]
            progress.step(len(group), name)
        scores[name] = score_replies(rows)
    for name, sc in scores.items():
        print(f"{name:28} n={sc['n']:4d}  exact {sc['exact']:6.1%} [{sc['exact_ci'][0]:.0%},{sc['exact_ci'][1]:.0%}]"
              f"  F1 {sc['f1']:6.1%} [{sc['f1_ci'][0]:.0%},{sc['f1_ci'][1]:.0%}]")
    if out is not None:
        (out / "eval.json").write_text(json.dumps(scores, indent=2))
    return scores


def score_replies(rows: list[tuple[dict, str]]) -> dict:
    """Exact match and token F1 of (episode, reply) pairs, overall and per category."""
    def score(pairs):
        exact = [normalize_answer(r) == normalize_answer(ep["target"]) for ep, r in pairs]
        f1 = [token_f1(r, ep["target"]) for ep, r in pairs]
        n = len(pairs)
        return dict(n=n, exact=sum(exact) / max(n, 1), exact_ci=wilson(sum(exact), n), f1=sum(f1) / max(n, 1),
                    f1_ci=mean_ci(f1))
    result = score(rows)
    categories = sorted({ep["category"] for ep, _ in rows if "category" in ep})
    if categories:
        result["categories"] = {c: score([(ep, r) for ep, r in rows if ep.get("category") == c]) for c in categories}
    return result


# ----------------------------------------------------------------------------- command line

def task_of(adapter) -> TaskConfig:
    """The task an adapter was trained on (train.py stores its TrainConfig in the file), else the default task."""
    train_config = json.loads(read_safetensors(adapter)[1].get("train_config", "{}"))
    return TaskConfig(**{k: v for k, v in train_config.items() if k in TaskConfig.__dataclass_fields__})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("adapters", nargs="+", help="adapter .safetensors files (train.py writes runs/<name>/adapter.safetensors)")
    p.add_argument("--ckpt", help="converted backbone directory; leave out for the embedded SmolLM2-135M-Instruct")
    p.add_argument("--episodes", type=int, default=64, help="episodes per split / per curve point")
    p.add_argument("--seed", type=int, default=0, help="which episodes: the evaluation draws them from seed + 1")
    p.add_argument("--curves", action="store_true", help="capacity and forgetting curves instead of the conditions "
                   "table; for several facts, which one the read names, what is left of each, whether q finds it")
    p.add_argument("--probe", action="store_true", help="a linear probe of the state (fitted on --episodes training "
                                                        "episodes) instead of the conditions table")
    p.add_argument("--data", help="a .json/.jsonl chat file: exact match and token F1 of the replies per condition")
    p.add_argument("--locomo", help="a LoCoMo JSON file: the same, per question category")
    p.add_argument("--recent-messages", type=int, default=1, help="--data, --locomo: messages before the question "
                                                                  "left visible; the earlier ones are written")
    p.add_argument("--supervise", choices=["last", "all"], default="last", help="--data: which replies to score")
    p.add_argument("--max-new-tokens", type=int, default=64, help="--data, --locomo: longest reply")
    p.add_argument("--window", type=int, default=2048, help="--data, --locomo: tokens per write window")
    p.add_argument("--out", default=".", help="directory for the JSON and PNG outputs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; leave out for cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bf16 where this device runs it fast (measured on CPU), else fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (two jobs on the same cores: "
                                                                      "give each a share)")
    args = p.parse_args(argv)
    device, dtype = configure(args.device, args.dtype, args.threads)
    autocast = lambda: precision(device, dtype)
    out = Path(args.out)
    try:
        ckpt = checkpoint_dir(args.ckpt)
        tok = load_tokenizer(ckpt)
        eps = None
        if args.data:
            ecfg = EpisodeConfig(supervise=args.supervise, recent_messages=args.recent_messages)
            eps = [ep for c in read_chats(args.data) for ep in chat_episodes(c, ecfg, random.Random(0))]
        elif args.locomo:
            eps = locomo_episodes(load_locomo(args.locomo), args.recent_messages)
        out.mkdir(parents=True, exist_ok=True)
        results = {}
        for adapter in args.adapters:
            model = load_adapter(load_model(ckpt, device, dtype), adapter)
            name = f"{model.delta_mem_config.write} ({Path(adapter).parent.name})"
            print(name)
            where = out if len(args.adapters) == 1 else out / Path(adapter).parent.name
            where.mkdir(parents=True, exist_ok=True)
            if eps is not None:
                results[name] = data_evaluation(model, tok, eps, device, autocast, where, args.window,
                                                args.max_new_tokens)
            elif args.probe:
                results[name] = probe(model, tok, task_of(adapter), args.episodes, args.seed, device, autocast)
                print(report_probe(results[name]))
                (where / "probe.json").write_text(json.dumps(results[name], indent=2))
            elif args.curves:
                results[name] = curves(model, tok, task_of(adapter), args.episodes, args.seed, device, autocast)
                print(json.dumps(results[name]))
            else:
                results[name] = final_evaluation(model, tok, task_of(adapter), args.episodes, args.seed, device,
                                                 autocast, where)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.curves:
        (out / "curves.json").write_text(json.dumps(results, indent=2))
        plot_curves(results, out / "curves.png")
        print(f"wrote {out / 'curves.json'} and curves.png")


if __name__ == "__main__":
    main()
