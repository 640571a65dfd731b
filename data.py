"""A synthetic memory task for δ-mem, offline and deterministic by seed.

An episode is a chat history that states a few facts ("My favourite colour is teal."), possibly between filler
turns, then a question about one of them ("What is my favourite colour?") and the answer ("It's teal."). Training
writes the history into the δ-mem state and reads the question *without the history in context*, so the state is
the only way to the answer (the paper's training episode; `episode_loss`).

Splits, by what the asked fact is: "train" and "valid" (fresh episodes of the training distribution) ask the
training pairs; "test" asks held-out (attribute, value) pairs, which training histories mention but training never
asks; "unseen" asks values that never occur in training at all. Values come from a few words per attribute
(`pool="lists"`, where remembering which of 8 labels was said suffices) or from the tokenizer's ~16k whole-word
tokens (`pool="vocab"`, where only a state that carries the word itself can answer).

`make_batch` turns episodes into the tensors of a write pass and a read pass, and `episode_loss` is the training
objective on them (shared by train.py, evaluate.py and bench.py). `write_messages` writes any chat messages into a
state the same way, in windows for long histories (sample.py, LoCoMo).
"""
import hashlib
import json
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from deltamem import beta_term, segment_means
from model import KVCache

# attribute -> values that are single tokens (with a leading space) in SmolLM2's vocabulary; the first
# TaskConfig.values of each list form the training pool, the next TaskConfig.unseen_values are never trained on.
ATTRIBUTES = {
    "colour": "red blue green yellow purple orange pink brown black white grey silver gold navy violet cyan".split(),
    "animal": "cat dog horse rabbit lion tiger bear wolf fox owl eagle shark whale dolphin snake frog".split(),
    "food": "pizza pasta rice bread soup cheese salad chicken fish steak curry sushi cake cookies honey mango".split(),
    "city": "Paris London Rome Berlin Tokyo Madrid Vienna Prague Dublin Lisbon Athens Oslo Cairo Delhi Sydney Boston".split(),
    "sport": "tennis football golf hockey rugby cricket boxing cycling swimming skiing chess baseball surfing sailing rowing climbing".split(),
    "country": "France Spain Italy Japan China India Brazil Canada Mexico Egypt Greece Kenya Peru Chile Norway Sweden".split(),
    "fruit": "apple banana cherry grape lemon peach pear plum kiwi lime berry fig".split(),
    "number": "one two three four five six seven eight nine ten eleven twelve".split(),
}
FILLER = [  # (user, assistant) small talk between facts
    ("How are you today?", "I'm doing well, thank you for asking."),
    ("Can you recommend a good book?", "You might enjoy a classic novel or a popular science book."),
    ("What's the weather usually like in spring?", "Spring is often mild, with some rain and sunny days."),
    ("Tell me a fun fact.", "Honey never spoils if it is stored properly."),
    ("I had a long day at work.", "That sounds tiring. I hope you can rest this evening."),
    ("Do you like music?", "I can't listen to music, but I enjoy talking about it."),
    ("What should I cook tonight?", "A simple stir-fry with vegetables is quick and tasty."),
    ("Any tips for sleeping better?", "Keep a regular schedule and avoid screens before bed."),
]
ACKS = ["Got it.", "Noted!", "Thanks for telling me.", "I'll remember that.", "Okay, {value} it is.",
        "That's a great choice!", "I'm glad to know your favourite {attribute} is {value}."]  # with acks=True


@dataclass
class TaskConfig:
    attributes: int = 3  # how many attributes the task uses (the first ones of ATTRIBUTES)
    values: int = 8  # training values per attribute
    unseen_values: int = 4  # further values per attribute, never in training (the "unseen" split)
    facts: int = 3  # facts per history, each about a different attribute (≤ attributes)
    filler: int = 0  # filler turns (user + assistant) placed at random before, between and after the facts
    heldout: int = 2  # (attribute, value) pairs per attribute never asked in training (the "test" split)
    answer: str = "short"  # "short": "It's teal." / "sentence": "Your favourite colour is teal."
    pool: str = "lists"  # values: "lists" (values + unseen_values per attribute) or "vocab" (see `vocabulary`)
    acks: bool = False  # the assistant acknowledges each fact with a short reply, as in a chat

    def __post_init__(self):
        if not 1 <= self.facts <= self.attributes <= len(ATTRIBUTES):
            raise ValueError(f"need 1 <= facts ({self.facts}) <= attributes ({self.attributes}) <= {len(ATTRIBUTES)}")
        if self.pool not in ("lists", "vocab"):
            raise ValueError(f"pool must be 'lists' or 'vocab', not {self.pool!r}")
        if self.pool == "lists" and min(len(ATTRIBUTES[a]) for a in self.names) < self.values + self.unseen_values:
            raise ValueError(f"an attribute has fewer than values + unseen_values = {self.values + self.unseen_values}")
        if self.answer not in ("short", "sentence"):
            raise ValueError(f"answer must be 'short' or 'sentence', not {self.answer!r}")

    @property
    def names(self) -> list[str]:
        return list(ATTRIBUTES)[: self.attributes]


def vocabulary(tok) -> dict[str, list[str]]:
    """The "vocab" pool: every token that is a space and 4–9 lower-case letters (" teal") and stays that one token
    before a full stop (~15.9k for SmolLM2; no word list to ship), split by a hash of the word into "trained" (~90%)
    and "unseen" (~10%, never in any training episode)."""
    stop = tok.encode(".")
    words = sorted(b.decode()[1:] for i, b in tok.token_bytes.items()
                   if re.fullmatch(rb" [a-z]{4,9}", b) and tok.encode(f"is{b.decode()}.")[-2:] == [i, *stop])
    unseen = lambda w: hashlib.sha256(w.encode()).digest()[0] < 26
    return {"trained": [w for w in words if not unseen(w)], "unseen": [w for w in words if unseen(w)]}


def task_words(cfg: TaskConfig, tok) -> dict[str, list[str]] | None:
    """What chats() and episodes() need besides the config: the tokenizer's words for the "vocab" pool."""
    return vocabulary(tok) if cfg.pool == "vocab" else None


def heldout_pair(attribute: str, value: str) -> bool:
    """"vocab" pool: ~10% of the (attribute, trained word) pairs are never asked in training (the "test" split)."""
    return hashlib.sha256(f"{attribute} {value}".encode()).digest()[0] < 26


def draw_value(rng: random.Random, cfg: TaskConfig, attribute: str, split: str, asked: bool, words) -> str:
    """A value for a fact about `attribute` in an episode of `split` (`asked`: the fact asked about)."""
    if cfg.pool == "lists":
        return rng.choice(value_pool(cfg, attribute, split, asked))
    if asked and split == "unseen":
        return rng.choice(words["unseen"])
    while True:  # ~1.1 draws on average
        value = rng.choice(words["trained"])
        if not asked or heldout_pair(attribute, value) == (split == "test"):
            return value


def value_pool(cfg: TaskConfig, attribute: str, split: str, asked: bool) -> list[str]:
    """"lists" pool: values a fact about `attribute` may take in an episode of `split` (`asked`: the fact asked)."""
    values = ATTRIBUTES[attribute]
    if asked and split == "unseen":
        return values[cfg.values: cfg.values + cfg.unseen_values]
    if not asked:
        return values[: cfg.values]
    i = cfg.names.index(attribute)  # a different slice of the training pool is held out for each attribute
    held = {values[(i * cfg.heldout + j) % cfg.values] for j in range(cfg.heldout)}
    return [v for v in values[: cfg.values] if (v in held) == (split == "test")]


def answer_text(cfg: TaskConfig, attribute: str, value: str) -> str:
    return f"It's {value}." if cfg.answer == "short" else f"Your favourite {attribute} is {value}."


def question(attribute: str) -> dict:
    """The user's question about one of their facts."""
    return {"role": "user", "content": f"What is my favourite {attribute}?"}


def make_chat(rng: random.Random, cfg: TaskConfig, split: str, words=None, ask_all=False) -> dict:
    """One chat record: {"messages": history + question + answer, "value": the value asked about, "facts": every
    fact's value in the order the history tells them, "pairs": every fact's (attribute, value), the asked one
    first}. ask_all: every fact's value is drawn as the asked one's is (so that any of them may be asked)."""
    attributes = rng.sample(cfg.names, cfg.facts)
    asked = attributes[0]
    facts = {a: draw_value(rng, cfg, a, split, ask_all or a == asked, words) for a in attributes}
    turns = [[{"role": "user", "content": f"My favourite {a} is {v}."}] for a, v in facts.items()]
    if cfg.acks:
        for turn, (a, v) in zip(turns, facts.items()):
            turn.append({"role": "assistant", "content": rng.choice(ACKS).format(attribute=a, value=v)})
    order = list(zip(facts.values(), turns))
    rng.shuffle(order)  # the asked fact may be anywhere in the history
    turns = [turn for _, turn in order]
    for _ in range(cfg.filler):  # small talk anywhere: before, between or after the facts
        user, assistant = rng.choice(FILLER)
        turns.insert(rng.randint(0, len(turns)), [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": assistant}])
    return {"messages": [m for turn in turns for m in turn] + [
                question(asked),
                {"role": "assistant", "content": answer_text(cfg, asked, facts[asked])}],
            "value": facts[asked], "facts": [value for value, _ in order], "pairs": list(facts.items())}


def chats(cfg: TaskConfig, split: str, n: int, seed: int, words=None, ask_all=False) -> list[dict]:
    """n chat records of `split`, the same for the same seed; `words`: vocabulary(tok), for the "vocab" pool."""
    if cfg.pool == "vocab" and words is None:
        raise ValueError("the 'vocab' pool needs the tokenizer's words: pass words=vocabulary(tok)")
    rng = random.Random(f"{split}-{seed}")
    return [make_chat(rng, cfg, split, words, ask_all) for _ in range(n)]


def episodes(cfg: TaskConfig, split: str, n: int, seed: int, words=None, ask_all=False) -> list[dict]:
    """Episodes of n chats: each chat's history written, its question read, its answer the target (+ the value and
    the facts' values). ask_all: one episode per fact of each chat (n · facts), all about the same history; they
    share its `write` list, so make_batch writes it once."""
    out = []
    for c in chats(cfg, split, n, seed, words, ask_all):
        ep = {**chat_episodes(c["messages"], EpisodeConfig(), None)[0], "value": c["value"], "facts": c["facts"]}
        out.append(ep)
        if ask_all:
            out += [{**ep, "read": [question(a)], "target": answer_text(cfg, a, v), "value": v} for a, v in c["pairs"][1:]]
    return out


# ----------------------------------------------------------------------------- chats -> episodes

ROLES = ("system", "user", "assistant")


@dataclass
class EpisodeConfig:
    """How a chat becomes training episodes (the official trainer's episode mode; its launch script's values)."""
    supervise: str = "last"  # last: the chat's final assistant message is the target; all: every assistant message
    recent_messages: int = 1  # non-system messages just before the target kept visible in the read pass
    write_len: int = 8192  # written tokens kept, the most recent ones
    state_only_prob: float = 0.0  # chance that only the question turn stays visible (the rest is written instead)

    def __post_init__(self):
        if self.supervise not in ("last", "all"):
            raise ValueError(f"supervise must be 'last' or 'all', not {self.supervise!r}")
        if self.recent_messages < 0 or self.write_len < 1 or not 0 <= self.state_only_prob <= 1:
            raise ValueError("need recent_messages >= 0, write_len >= 1 and 0 <= state_only_prob <= 1")


def check_chat(messages, where: str) -> list[dict]:
    """A chat's messages, each {"role": system/user/assistant, "content": non-empty text}, with at least one assistant
    message; anything else is one ValueError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{where}: message {i} has empty content")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: message {i} is not UTF-8 text") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_chats(path) -> list[list[dict]]:
    """Chats from a .json file holding a list of {"messages": [...]} records, or a .jsonl file with one per line; a
    malformed record is one error naming the file and the record number (from 1)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        if path.suffix == ".jsonl":
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            records = [(n, json.loads(line)) for n, line in lines]
        else:
            data = json.loads(text)
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of records (or use .jsonl, one record per line)")
            records = list(enumerate(data, 1))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not records:
        raise ValueError(f"{path}: no records")
    chats = []
    for n, record in records:
        if not isinstance(record, dict) or "messages" not in record:
            raise ValueError(f"{path}: record {n}: expected an object with 'messages'")
        chats.append(check_chat(record["messages"], f"{path}: record {n}"))
    return chats


def chat_episodes(messages: list[dict], cfg: EpisodeConfig, rng: random.Random | None) -> list[dict]:
    """The episodes of one chat, one per supervised assistant message: {"write": messages written into the state,
    "read": messages visible in the read pass, "target": the assistant reply to learn}. A leading system message
    stays in the read pass and is not written; the last `recent_messages` non-system messages before the target stay
    visible and the earlier ones are written (with probability state_only_prob only the question turn stays
    visible). A target with nothing before it to write gives no episode (the state would play no part), so the number
    of episodes does not depend on `rng`."""
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    out = []
    for i in targets[-1:] if cfg.supervise == "last" else targets:
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = [m for m in messages[len(system):i] if m["role"] != "system"]
        if len(rest) <= cfg.recent_messages:
            continue
        state_only = cfg.state_only_prob > 0 and rng.random() < cfg.state_only_prob
        split = len(rest) - (min(cfg.recent_messages, 1) if state_only else cfg.recent_messages)
        out.append({"write": rest[:split], "read": system + rest[split:], "target": messages[i]["content"]})
    return out


# ----------------------------------------------------------------------------- episodes -> tensors

def chat_with_segments(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """ChatML ids of messages written into a δ-mem state, and each token's SSW segment (message i -> i). No system
    prompt: it is not part of what is remembered, and in training it would be the same writes in every episode."""
    ids, seg = [], []
    for i, m in enumerate(messages):
        part = tok.encode_message(m)
        ids, seg = ids + part, seg + [i] * len(part)
    return ids, seg


def target_ids(tok, ep) -> list[int]:
    """The target reply's ids, ending with <|im_end|> (the model must learn to stop)."""
    return tok.encode(ep["target"]) + [tok.added["<|im_end|>"]]


def value_span(tok, ep) -> tuple[int, int]:
    """[start, end) of the value's tokens in target_ids (synthetic episodes, which know their value)."""
    head = ep["target"][: ep["target"].rindex(" " + ep["value"])]
    start, end = len(tok.encode(head)), len(tok.encode(head + " " + ep["value"]))
    assert target_ids(tok, ep)[:end] == tok.encode(head + " " + ep["value"]), "the value must be whole tokens"
    return start, end


def pad(rows: list[list[int]], value: int, left=False) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([[value] * (T - len(r)) + r if left else r + [value] * (T - len(r)) for r in rows])


def make_batch(tok, eps: list[dict], device, write_len: int | None = None) -> dict:
    """Write pass (the written messages, at most the last write_len tokens, with SSW segment ids) and read pass (the
    visible messages + the target, labels on the target) tensors; `value_pos` where the episodes know their value.
    Episodes that share one `write` list (episodes(ask_all=True)) share one row of the write pass: `write_of` (B,)
    is each episode's row. Where the episodes know their facts: `told` (B, facts), the place in its write row of the
    last token that spells each fact's value's first token, and `asked` (B,), which of the facts is asked."""
    rows = {}  # id of a write list -> (its row in the write pass, the list)
    write_of = [rows.setdefault(id(ep["write"]), (len(rows), ep["write"]))[0] for ep in eps]
    hist = [chat_with_segments(tok, w) for _, w in rows.values()]
    if write_len:
        hist = [(ids[-write_len:], seg[-write_len:]) for ids, seg in hist]
    read, labels, value_pos = [], [], []
    for ep in eps:
        prompt, answer = tok.encode_chat(ep["read"]), target_ids(tok, ep)
        read.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        if "value" in ep:
            start, end = value_span(tok, ep)
            value_pos.append((len(prompt) + start, len(prompt) + end))
    t = dict(write=pad([h[0] for h in hist], 0), segments=pad([h[1] for h in hist], -1),
             write_real=pad([[1] * len(h[0]) for h in hist], 0).bool(),
             read=pad(read, 0), read_real=pad([[1] * len(r) for r in read], 0).bool(), labels=pad(labels, -100),
             write_of=torch.tensor(write_of))
    if all("facts" in ep for ep in eps):
        ids = [hist[row][0] for row in write_of]
        t["told"] = torch.tensor([[len(row) - 1 - row[::-1].index(tok.encode(" " + v)[0]) for v in ep["facts"]]
                                  for ep, row in zip(eps, ids)])  # (B, facts)
        t["asked"] = torch.tensor([ep["facts"].index(ep["value"]) for ep in eps])  # (B,)
    return {**{k: v.to(device) for k, v in t.items()}, "value_pos": value_pos}


def write_pass(model, b, betas: list | None = None, inputs: list | None = None):
    """Write a batch's histories into a fresh δ-mem state (no logits needed) and return each episode's state, one
    (B, n, r, r) per layer; `betas`, if a list, receives each layer's mean write gate β, `inputs` each layer's x."""
    state = model(b["write"], pad_mask=b["write_real"], segment_ids=b["segments"], logits=False, betas=betas,
                  inputs=inputs)[1]
    return [s.index_select(0, b["write_of"]) for s in state]  # (B, n, r, r): the state of each episode's history


def fact_inputs(model, b, x_write: list, x_read: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's inputs at the places that decide what a read of several facts returns: the x each fact's value
    was written under a key from, (L, B, facts, d), and the x of the query where the answer's value is predicted,
    (L, B, d). Token writes key a value on its last token `told` (with key_shift the token before it); SSW on the mean
    x of the message that holds `told`. x_write: each layer's x in the write pass (B_write, T, d); x_read: the x each
    layer made its read-pass queries from (B, T', d)."""
    cfg = model.delta_mem_config
    rows = b["write_of"][:, None]  # (B, 1)
    at = torch.tensor([start - 1 for start, _ in b["value_pos"]], device=b["read"].device)  # (B,): predicts the value
    if cfg.write == "ssw":  # what the module writes: segment_means, here taken at each fact's message
        segments = b["segments"][b["write_of"]]  # (B, T): each token's message, -1 for padding
        fact = segments.gather(1, b["told"])[..., None].expand(-1, -1, x_write[0].shape[-1])  # (B, facts, d)
        x_facts = torch.stack([segment_means(x[b["write_of"]], segments)[0].gather(1, fact) for x in x_write])
    else:
        x_facts = torch.stack([x[rows, b["told"] - int(cfg.key_shift)] for x in x_write])  # (L, B, facts, d)
    x_query = torch.stack([x[torch.arange(len(at), device=at.device), at] for x in x_read])  # (L, B, d)
    return x_facts, x_query


def address_logits(mem, x_facts, x_query) -> torch.Tensor:
    """One layer's q·k between the query made from x_query (B, d) and the keys made from x_facts (B, facts, d), per
    state: how much a read takes from each fact's write, before the gates: (B, n, facts)."""
    k = mem.project(x_facts.to(mem.beta_bias.dtype))[1]  # (B, facts, n, r)
    q = mem.project(x_query.to(mem.beta_bias.dtype)[:, None])[0][:, 0]  # (B, n, r)
    return torch.einsum("bfnr,bnr->bnf", k, q)


def address_loss(model, x_facts, x_query, asked, tau: float = 0.1) -> tuple[torch.Tensor, float]:
    """Teach each query to find the asked fact (ours, not the paper's): per layer and state, cross-entropy of
    q·k / tau over the facts of the history (fact_inputs' x, detached, so only W_mq and W_mk learn), the asked one
    (B,) the target; mean over layers. Returns the loss and how often the asked fact had the largest q·k."""
    loss, top1 = 0.0, 0.0
    mems = [block.self_attn.delta_mem for block in model.model.layers]
    for mem, xf, xq in zip(mems, x_facts.detach(), x_query.detach()):
        logits = address_logits(mem, xf, xq) / tau  # (B, n, facts)
        target = asked[:, None].expand(logits.shape[:2])  # (B, n)
        loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten())
        top1 += (logits.argmax(-1) == target).float().mean().item()
    return loss / len(mems), top1 / len(mems)


def episode_loss(model, b, beta_weight: float, beta_target: float, address_weight: float = 0.0) -> dict:
    """The training objective on a batch (paper, training; official trainer): write the histories into a fresh
    state, read question + answer with writes off and without the history in context, cross-entropy on the answer
    tokens + beta_weight · mean over layers of (mean β of the write pass − beta_target)². Gradients flow through the
    state into the whole write pass. address_weight > 0 adds address_weight · address_loss (ours). Returns a dict:
    ce (summed over answer tokens), tokens, beta_term and address_term (per episode), beta_mean (detached),
    address_top1 (None without the address term), state."""
    betas, x_write, x_read = [], [] if address_weight else None, [] if address_weight else None
    state = write_pass(model, b, betas, x_write)
    targets = b["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    where = F.pad(targets != -100, (0, 1))  # (B, T): positions that predict an answer token
    logits, _ = model(b["read"], state=state, write=False, pad_mask=b["read_real"], logits=where,
                      inputs=x_read)  # (N, V)
    ce = F.cross_entropy(logits.float(), targets[where[:, :-1]], reduction="sum")
    mean_beta = torch.stack(betas).mean().detach() if betas else torch.zeros(())
    address, top1 = ce.new_zeros(()), None
    if address_weight:
        address, top1 = address_loss(model, *fact_inputs(model, b, x_write, x_read), b["asked"])
    return dict(ce=ce, tokens=where.sum(), beta_term=beta_weight * beta_term(betas, beta_target),
                address_term=address_weight * address, beta_mean=mean_beta, address_top1=top1, state=state)


# ----------------------------------------------------------------------------- chat messages -> state

def windows(seg: list[int], size: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most `size` tokens covering a write; each ends where a message starts if one does
    inside it. seg: the tokens' segment ids (one per message)."""
    spans, start = [], 0
    while start < len(seg):
        end = min(start + size, len(seg))
        if end < len(seg):
            end = max((i for i in range(start + 1, end + 1) if seg[i] != seg[i - 1]), default=end)
        spans.append((start, end))
        start = end
    return spans


@torch.no_grad()
def write_messages(model, tok, state: list, messages: list[dict], window: int, context: list[dict] = ()
                   ) -> tuple[list, int, int]:
    """Write chat messages into `state` as a training write pass writes a history (chat_with_segments: ChatML ids,
    one SSW segment per message, no system prompt), in forwards of their own. More than `window` tokens are cut into
    windows at message boundaries (inside a message only when it alone is longer than a window) and written one
    after another with the state carried; attention does not span windows, so a windowed write is not identical to
    one long write. `context`: the messages before these that a live chat still has in view. The first window is
    read after them (a KV cache of the backbone alone: no writes, an empty state, oldest messages dropped until it
    fits the window), so the new messages are written from the x a write pass over context + messages computes;
    identical to it without key_shift, whose first written token has no previous key. Returns (new state, tokens
    written, windows used)."""
    ids, seg = chat_with_segments(tok, messages)
    device = state[0].device
    spans = windows(seg, window)
    parts = [tok.encode_message(m) for m in context]  # the context's messages, the oldest first
    while parts and sum(map(len, parts)) + spans[0][1] > window:
        parts = parts[1:]
    prefix = [i for part in parts for i in part]
    for start, end in spans:
        cache = None
        if prefix:  # the first window only
            cache = KVCache(model.config, 1, len(prefix) + end - start, device, model.lm_head.weight.dtype)
            model(torch.tensor([prefix], device=device), None, False, cache=cache, logits=False)  # reads 0: no change
            prefix = []
        idx = torch.tensor([ids[start:end]], device=device)  # (1, T)
        _, state = model(idx, state=state, segment_ids=torch.tensor([seg[start:end]], device=device), cache=cache,
                         logits=False)
    return state, len(ids), len(spans)


# ----------------------------------------------------------------------------- the task as a chat file

def main(argv=None):
    """Write chats of the synthetic task as a .jsonl file of {"messages": [...], "value": ...} records, the format
    `train.py --data` and `evaluate.py --data` read."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--split", default="train", choices=("train", "valid", "test", "unseen"))
    p.add_argument("--n", type=int, default=1000, help="chats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", help="with --pool vocab: the converted backbone whose tokenizer gives the words; "
                                  "leave out for the embedded SmolLM2-135M-Instruct")
    for f in fields(TaskConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    task = TaskConfig(**{f.name: getattr(args, f.name) for f in fields(TaskConfig)})
    words = None
    if task.pool == "vocab":
        from load_hf_weights import checkpoint_dir
        from tokenizer import load_tokenizer
        words = vocabulary(load_tokenizer(checkpoint_dir(args.ckpt)))
    lines = [json.dumps(c, ensure_ascii=False) for c in chats(task, args.split, args.n, args.seed, words)]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.n} {args.split} chats to {args.out}")


if __name__ == "__main__":
    main()
