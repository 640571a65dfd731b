"""A synthetic memory task for δ-mem, offline and deterministic by seed.

An episode is a chat history that states a few facts ("My favourite colour is teal."), possibly between filler
turns, then a question about one of them ("What is my favourite colour?") and the answer ("It's teal."). Training
writes the history into the δ-mem state and reads the question *without the history in context*, so the state is
the only way to the answer (the paper's training episode; `episode_loss`).

Splits, by what the asked fact is: "train" and "valid" (fresh episodes of the training distribution) ask the
training pairs; "test" asks held-out (attribute, value) pairs, which training histories mention but training never
asks; "unseen" asks values that never occur in training at all.

`make_batch` turns episodes into the tensors of a write pass and a read pass, and `episode_loss` is the training
objective on them (shared by train.py, evaluate.py and bench.py). `write_messages` writes any chat messages into a
state the same way, in windows for long histories (sample.py, LoCoMo).
"""
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltamem import beta_term

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


@dataclass
class TaskConfig:
    attributes: int = 3  # how many attributes the task uses (the first ones of ATTRIBUTES)
    values: int = 8  # training values per attribute
    unseen_values: int = 4  # further values per attribute, never in training (the "unseen" split)
    facts: int = 3  # facts per history, each about a different attribute (≤ attributes)
    filler: int = 0  # filler turns (user + assistant) placed at random between and after the facts
    heldout: int = 2  # (attribute, value) pairs per attribute never asked in training (the "test" split)
    answer: str = "short"  # "short": "It's teal." / "sentence": "Your favourite colour is teal."

    def __post_init__(self):
        if not 1 <= self.facts <= self.attributes <= len(ATTRIBUTES):
            raise ValueError(f"need 1 <= facts ({self.facts}) <= attributes ({self.attributes}) <= {len(ATTRIBUTES)}")
        if min(len(ATTRIBUTES[a]) for a in self.names) < self.values + self.unseen_values:
            raise ValueError(f"an attribute has fewer than values + unseen_values = {self.values + self.unseen_values}")
        if self.answer not in ("short", "sentence"):
            raise ValueError(f"answer must be 'short' or 'sentence', not {self.answer!r}")

    @property
    def names(self) -> list[str]:
        return list(ATTRIBUTES)[: self.attributes]


def value_pool(cfg: TaskConfig, attribute: str, split: str, asked: bool) -> list[str]:
    """Values a fact about `attribute` may take in an episode of `split` (`asked`: it is the fact asked about)."""
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


def make_episode(rng: random.Random, cfg: TaskConfig, split: str) -> dict:
    """One episode: history messages, the question, the answer, and the value asked about."""
    attributes = rng.sample(cfg.names, cfg.facts)
    asked = attributes[0]
    facts = {a: rng.choice(value_pool(cfg, a, split, asked=a == asked)) for a in attributes}
    turns = [[{"role": "user", "content": f"My favourite {a} is {v}."}] for a, v in facts.items()]
    rng.shuffle(turns)  # the asked fact may be anywhere in the history
    for _ in range(cfg.filler):  # filler after any fact
        user, assistant = rng.choice(FILLER)
        turns.insert(rng.randint(1, len(turns)), [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": assistant}])
    return {"history": [m for turn in turns for m in turn],
            "question": f"What is my favourite {asked}?",
            "answer": answer_text(cfg, asked, facts[asked]),
            "value": facts[asked]}


def episodes(cfg: TaskConfig, split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{split}-{seed}")
    return [make_episode(rng, cfg, split) for _ in range(n)]


# ----------------------------------------------------------------------------- episodes -> tensors

def chat_with_segments(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """ChatML ids of messages written into a δ-mem state, and each token's SSW segment (message i -> i). No system
    prompt: it is not part of what is remembered, and in training it would be the same writes in every episode."""
    ids, seg = [], []
    for i, m in enumerate(messages):
        part = tok.encode_message(m)
        ids, seg = ids + part, seg + [i] * len(part)
    return ids, seg


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


def write_pass(model, b, betas: list | None = None):
    """Write a batch's histories into a fresh δ-mem state (no logits needed) and return the state; `betas`, if a
    list, receives each layer's mean write gate β."""
    return model(b["write"], pad_mask=b["write_real"], segment_ids=b["segments"], logits=False, betas=betas)[1]


def episode_loss(model, b, beta_weight: float, beta_target: float) -> dict:
    """The training objective on a batch (paper, training; official trainer): write the histories into a fresh
    state, read question + answer with writes off and without the history in context, cross-entropy on the answer
    tokens + beta_weight · mean over layers of (mean β of the write pass − beta_target)². Gradients flow through the
    state into the whole write pass. Returns a dict: ce (summed over answer tokens), tokens, beta_term, beta_mean
    (detached), state."""
    betas = []
    state = write_pass(model, b, betas)
    targets = b["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    where = F.pad(targets != -100, (0, 1))  # (B, T): positions that predict an answer token
    logits, _ = model(b["read"], state=state, write=False, pad_mask=b["read_real"], logits=where)  # (N, V)
    ce = F.cross_entropy(logits.float(), targets[where[:, :-1]], reduction="sum")
    mean_beta = torch.stack(betas).mean().detach() if betas else torch.zeros(())
    return dict(ce=ce, tokens=where.sum(), beta_term=beta_weight * beta_term(betas, beta_target),
                beta_mean=mean_beta, state=state)


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
def write_messages(model, tok, state: list, messages: list[dict], window: int) -> tuple[list, int, int]:
    """Write chat messages into `state` as a training write pass writes a history (chat_with_segments: ChatML ids,
    one SSW segment per message, no system prompt), in forwards of their own (no KV cache, positions from 0). More
    than `window` tokens are cut into windows at message boundaries (inside a message only when it alone is longer
    than a window) and written one after another with the state carried; attention does not span windows, so a
    windowed write is not identical to one long write. Returns (new state, tokens written, windows used)."""
    ids, seg = chat_with_segments(tok, messages)
    device = state[0].device
    spans = windows(seg, window)
    for start, end in spans:
        idx = torch.tensor([ids[start:end]], device=device)  # (1, T)
        _, state = model(idx, state=state, segment_ids=torch.tensor([seg[start:end]], device=device))
    return state, len(ids), len(spans)

