"""data.py: chats -> episodes (which messages are written, which stay visible, which tokens carry loss), the chat
file reader and its one-line errors, and the synthetic task written as a chat file."""
import json
import random

import pytest

from data import (EpisodeConfig, TaskConfig, chat_episodes, chat_with_segments, chats, episodes, heldout_pair, main,
                  make_batch, read_chats, vocabulary)
from tokenizer import load_tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}
CHAT = [SYSTEM, {"role": "user", "content": "I have a cat called Tom."}, {"role": "assistant", "content": "Nice."},
        {"role": "user", "content": "He is grey."}, {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What colour is Tom?"}, {"role": "assistant", "content": "Grey."}]
contents = lambda messages: [m["content"] for m in messages]


@pytest.mark.parametrize("k, written, visible", [
    (0, ["I have a cat called Tom.", "Nice.", "He is grey.", "Noted.", "What colour is Tom?"], []),
    (1, ["I have a cat called Tom.", "Nice.", "He is grey.", "Noted."], ["What colour is Tom?"]),
    (2, ["I have a cat called Tom.", "Nice.", "He is grey."], ["Noted.", "What colour is Tom?"]),
])
def test_last_target_writes_the_early_messages_and_shows_the_recent_ones(k, written, visible):
    [ep] = chat_episodes(CHAT, EpisodeConfig(recent_messages=k), random.Random(0))
    assert contents(ep["write"]) == written  # the system message is never written...
    assert contents(ep["read"]) == ["You are terse."] + visible  # ...but stays in the read pass
    assert ep["target"] == "Grey."


def test_supervise_all_makes_one_episode_per_reply_that_has_a_past():
    eps = chat_episodes(CHAT, EpisodeConfig(supervise="all", recent_messages=1), random.Random(0))
    # "Nice." has only its question before it: nothing to write, so no episode
    assert [ep["target"] for ep in eps] == ["Noted.", "Grey."]
    assert contents(eps[0]["write"]) == ["I have a cat called Tom.", "Nice."]
    assert contents(eps[0]["read"]) == ["You are terse.", "He is grey."]


def test_state_only_episodes_show_only_the_question_turn():
    [ep] = chat_episodes(CHAT, EpisodeConfig(recent_messages=3, state_only_prob=1.0), random.Random(0))
    assert contents(ep["read"]) == ["You are terse.", "What colour is Tom?"]
    assert contents(ep["write"]) == ["I have a cat called Tom.", "Nice.", "He is grey.", "Noted."]  # written instead
    [ep] = chat_episodes(CHAT, EpisodeConfig(recent_messages=3, state_only_prob=0.0), random.Random(0))
    assert contents(ep["read"]) == ["You are terse.", "He is grey.", "Noted.", "What colour is Tom?"]


def test_loss_is_on_the_target_only_and_truncation_keeps_the_newest_tokens(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    [ep] = chat_episodes(CHAT, EpisodeConfig(recent_messages=1), random.Random(0))
    b = make_batch(tok, [ep], "cpu")
    prompt, answer = tok.encode_chat(ep["read"]), tok.encode("Grey.") + [tok.added["<|im_end|>"]]
    assert b["read"][0].tolist() == prompt + answer
    assert b["labels"][0].tolist() == [-100] * len(prompt) + answer
    ids, seg = chat_with_segments(tok, ep["write"])
    assert b["write"][0].tolist() == ids and b["segments"][0].tolist() == seg
    short = make_batch(tok, [ep], "cpu", write_len=7)
    assert short["write"][0].tolist() == ids[-7:] and short["segments"][0].tolist() == seg[-7:]


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}', "record 2: message 0 needs 'role'"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "record 2: message 0 has unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "yo"}]}',
     "record 2: message 0 has empty content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "record 2: no assistant message"),
    ('{"messages": []}', "record 2: 'messages' must be a non-empty list"),
    ('{"text": "hi"}', "record 2: expected an object with 'messages'"),
    ('{"messages": [', "not valid JSON"),
])
def test_malformed_records_are_one_line_errors_naming_file_and_record(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        read_chats(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_non_utf8_and_json_lists(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl: not UTF-8"):
        read_chats(bad)
    good = tmp_path / "chats.json"
    good.write_text(json.dumps([{"messages": CHAT}, {"messages": CHAT[1:3]}]))
    assert read_chats(good) == [CHAT, CHAT[1:3]]


def test_the_task_written_as_a_chat_file_gives_the_same_episodes(tmp_path):
    path = tmp_path / "task.jsonl"
    main(["--out", str(path), "--split", "train", "--n", "50", "--seed", "3", "--filler", "1"])
    task = TaskConfig(filler=1)
    from_file = [ep for c in read_chats(path) for ep in chat_episodes(c, EpisodeConfig(), random.Random(0))]
    built_in = [{k: v for k, v in ep.items() if k not in ("value", "facts")}
                for ep in episodes(task, "train", 50, seed=3)]
    assert from_file == built_in
    assert [json.loads(line)["value"] for line in path.read_text().splitlines()] == [
        c["value"] for c in chats(task, "train", 50, seed=3)]


def test_facts_are_listed_in_the_order_the_history_tells_them():
    for c in chats(TaskConfig(facts=3, filler=2, acks=True), "valid", 50, seed=0):
        told = [m["content"].split()[-1][:-1] for m in c["messages"][:-2] if m["content"].startswith("My favourite")]
        assert c["facts"] == told and c["value"] in told
    assert {c["facts"].index(c["value"]) for c in chats(TaskConfig(facts=3), "valid", 50, seed=0)} == {0, 1, 2}


WORDS = {"trained": [f"word{i}" for i in range(300)], "unseen": [f"new{i}" for i in range(30)]}  # a stand-in pool


@pytest.mark.parametrize("acks, filler", [(False, 0), (True, 2)])
def test_vocab_pool_keeps_unseen_values_out_of_training_and_holds_out_pairs(acks, filler):
    """Over 500 seeds, no unseen word occurs anywhere in a training chat; training asks no held-out pair; the test
    split asks only held-out pairs of trained words and the unseen split only unseen words."""
    task = TaskConfig(attributes=8, facts=3, filler=filler, pool="vocab", acks=acks)
    unseen = set(WORDS["unseen"])
    for seed in range(500):
        for c in chats(task, "train", 4, seed, WORDS):
            text = " ".join(m["content"] for m in c["messages"])
            assert not unseen & set(text.replace(".", " ").replace("?", " ").split()), text
            assert not heldout_pair(c["messages"][-2]["content"].split()[-1][:-1], c["value"])
    for c in chats(task, "test", 200, 0, WORDS):
        assert c["value"] in WORDS["trained"] and heldout_pair(c["messages"][-2]["content"].split()[-1][:-1], c["value"])
    assert all(c["value"] in unseen for c in chats(task, "unseen", 200, 0, WORDS))


def test_ask_all_asks_every_fact_of_one_history_and_keeps_the_splits():
    """ask_all: one episode per fact, all sharing the history's `write` list; every asked value obeys its split (no
    held-out pair or unseen word asked in training, only unseen words asked in "unseen")."""
    task = TaskConfig(attributes=8, facts=3, filler=1, pool="vocab", acks=True)
    for split in ("train", "test", "unseen"):
        eps = episodes(task, split, 100, 0, WORDS, ask_all=True)
        assert len(eps) == 300
        for group in zip(*[iter(eps)] * 3):
            assert all(ep["write"] is group[0]["write"] for ep in group)
            asked = {(ep["read"][0]["content"].split()[-1][:-1], ep["value"]) for ep in group}
            told = {(m["content"].split()[2], m["content"].split()[-1][:-1]) for m in group[0]["write"]
                    if m["content"].startswith("My favourite")}
            assert asked == told and all(ep["target"] == f"It's {ep['value']}." for ep in group)
            for a, v in asked:
                assert {"train": not heldout_pair(a, v) and v in WORDS["trained"],
                        "test": heldout_pair(a, v), "unseen": v in WORDS["unseen"]}[split], (split, a, v)


def test_vocab_episodes_are_deterministic_by_seed_and_need_the_words():
    task = TaskConfig(facts=3, filler=1, pool="vocab", acks=True)
    assert episodes(task, "valid", 20, 5, WORDS) == episodes(task, "valid", 20, 5, WORDS)
    assert episodes(task, "valid", 20, 5, WORDS) != episodes(task, "valid", 20, 6, WORDS)
    with pytest.raises(ValueError, match="needs the tokenizer's words"):
        chats(task, "train", 1, 0)


def test_acks_are_assistant_turns_after_each_fact():
    c = chats(TaskConfig(facts=3, acks=True), "train", 1, 0)[0]["messages"]
    assert [m["role"] for m in c] == ["user", "assistant"] * 4
    assert all(m["content"].startswith("My favourite") for m in c[0:6:2])


@pytest.mark.real
def test_vocabulary_of_smollm2_is_single_token_words_split_by_hash(smollm2_ckpt):
    tok = load_tokenizer(smollm2_ckpt)
    words = vocabulary(tok)
    trained, unseen = words["trained"], words["unseen"]
    assert not set(trained) & set(unseen) and 0.07 < len(unseen) / (len(trained) + len(unseen)) < 0.13
    assert len(trained) + len(unseen) > 10_000
    for w in trained[::97] + unseen[::11]:
        assert len(tok.encode(" " + w)) == 1 and tok.encode(f"My favourite colour is {w}.")[-2] == tok.encode(" " + w)[0]
    assert vocabulary(tok) == words
