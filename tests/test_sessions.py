"""The memory as a user meets it: facts told to `sample.py --chat` in one process, asked in a fresh one.

Needs a trained adapter, so it runs only when asked for:

    DELTAMEM_ADAPTER=runs/tsw/adapter.safetensors python -m pytest -m trained -s   # README: the default run's adapter

For each of 64 chats of the adapter's task with values never seen in training (data.py's "unseen" split), this
process tells the chat's user turns to sample.chat (the model writes its own replies, at most 16 tokens; every
finished turn goes into the state), saves the state with /save, and asks the chat's question after /forget-context
(the in-process answer). A fresh `sample.py --chat` process then /loads each saved state and asks the same question,
and again with the next chat's state (the control). Replies are exact matches when their words equal the target's.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sample
from data import chats, task_words
from evaluate import normalize_answer, task_of, wilson
from test_sample import run_chat

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = os.environ.get("DELTAMEM_ADAPTER")
N_CHATS = 64  # with 32, 16% against 0% left Wilson intervals that touch


def exact(reply: str, target: str) -> bool:
    return normalize_answer(reply) == normalize_answer(target)


@pytest.mark.trained
@pytest.mark.skipif(not ADAPTER, reason="set DELTAMEM_ADAPTER to a trained adapter file")
def test_facts_told_in_one_process_are_recalled_in_a_fresh_one(tmp_path):
    args = sample.parse_args(["--adapter", ADAPTER, "--chat", "--max-new-tokens", "16"])
    model, tok = sample.load(args)
    args.window = model.config.max_position_embeddings
    task = task_of(ADAPTER)
    records = chats(task, "unseen", N_CHATS, seed=1, words=task_words(task, tok))
    questions = [r["messages"][-2]["content"] for r in records]
    targets = [r["messages"][-1]["content"] for r in records]
    states = [tmp_path / f"chat{i}.safetensors" for i in range(N_CHATS)]

    in_process = []
    for record, question, state in zip(records, questions, states):
        told = [m["content"].encode() + b"\n" for m in record["messages"][:-2] if m["role"] == "user"]
        lines = told + [f"/save {state}\n".encode(), b"/forget-context\n", question.encode() + b"\n"]
        _, replies, err = run_chat(model, tok, args, sample.new_memory(model), lines)
        assert "error" not in err, err
        in_process.append(replies[-1])

    script = "".join(f"/load {states[j]}\n/forget-context\n{questions[i]}\n"
                     for i in range(N_CHATS) for j in (i, (i + 1) % N_CHATS))
    fresh = subprocess.run([sys.executable, "sample.py", "--adapter", ADAPTER, "--chat", "--max-new-tokens", "16"],
                           input=script.encode(), cwd=ROOT, capture_output=True, timeout=1800, check=True)
    answers = fresh.stdout.decode().splitlines()
    assert len(answers) == 2 * N_CHATS, f"expected one line per question, got:\n{fresh.stdout.decode()}"
    own, shuffled = answers[0::2], answers[1::2]

    rates = {name: sum(map(exact, replies, targets)) for name, replies in
             (("in-process", in_process), ("fresh process", own), ("fresh process, another chat's state", shuffled))}
    for name, k in rates.items():
        low, high = wilson(k, N_CHATS)
        print(f"{name:38} exact {k}/{N_CHATS} = {k / N_CHATS:.0%} [{low:.0%}, {high:.0%}]")
    assert own == in_process  # the saved state answers in a fresh process exactly as in the telling one
    assert rates["fresh process"] >= 3 * rates["fresh process, another chat's state"]
    assert rates["fresh process"] > 0
