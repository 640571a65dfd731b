"""evaluate.py: intervals, F1, the LoCoMo reader, curves and the CLI, on a tiny random model (LoCoMo conversations
are written by data.write_messages, whose windowing tests/test_sample.py checks)."""
import json
from pathlib import Path

import pytest
import torch

import evaluate
from data import TaskConfig, chat_with_segments, episodes
from deltamem import DeltaMemConfig, attach
from deltamem_io import save_adapter
from model import load_model
from runtime import precision
from tokenizer import load_tokenizer

LOCOMO = Path(__file__).parent / "fixtures" / "locomo_tiny.json"
fp32 = lambda: precision(torch.device("cpu"), torch.float32)


def test_wilson_intervals():
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)  # z²/(n+z²) = 3.8416/13.8416
    lo, hi = evaluate.wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert evaluate.wilson(0, 0) == (0.0, 1.0)


def test_token_f1_on_hand_computed_cases():
    assert evaluate.normalize_answer("The Old, harbour!") == ["old", "harbour"]
    assert evaluate.token_f1("The old harbour.", "the old harbour") == 1.0
    assert evaluate.token_f1("a big marathon", "a marathon") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert evaluate.token_f1("violin and piano", "violin, Lisbon") == pytest.approx(0.5)  # P = 1/2, R = 1/2
    assert evaluate.token_f1("in 2023", 2023) == pytest.approx(2 / 3)  # numeric answers are compared as text
    assert evaluate.token_f1("", "Pepper") == 0.0


def test_locomo_reader():
    samples = evaluate.load_locomo(LOCOMO)
    assert len(samples) == 2
    first = [m["content"] for m in samples[0]["messages"]]
    assert first[0] == "Session 1, 1:56 pm on 8 May, 2023."
    assert first[1] == "Ana: Hi Ben! I just adopted a dog called Pepper."
    assert first[3] == "Session 2, 10:04 am on 20 May, 2023."
    assert first[4] == "Ana: Pepper loves the beach. [shares a photo of a dog on a beach]"
    assert len(first) == 6
    assert [q["category"] for q in samples[0]["qa"]] == [4, 2, 1, 3]  # category 5 (adversarial) is not scored
    assert len(samples[1]["qa"]) == 2


@pytest.mark.parametrize("content, message", [
    ("{", "not a readable LoCoMo JSON file"),
    ("{}", "expected a non-empty list of samples"),
    ('[{"conversation": {}, "qa": []}]', "sample 0: conversation has no session_N lists"),
    ('[{"conversation": {"session_1": [{"speaker": "A"}]}, "qa": []}]', r"sample 0: session_1\[0\] needs 'speaker' and 'text'"),
    ('[{"conversation": {"session_1": []}, "qa": [{"question": "?", "category": 2}]}]', r"qa\[0\] \(category 2\) has no 'answer'"),
])
def test_locomo_reader_names_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"bad.json: .*{message}"):
        evaluate.load_locomo(path)
    with pytest.raises(ValueError, match="missing.json"):
        evaluate.load_locomo(tmp_path / "missing.json")


def tiny(tiny_ckpt, **cfg):
    torch.manual_seed(0)
    return attach(load_model(tiny_ckpt, dtype=torch.float64), DeltaMemConfig(**cfg)), load_tokenizer(tiny_ckpt)


def test_locomo_episodes_write_the_conversation_and_ask_each_question():
    samples = evaluate.load_locomo(LOCOMO)
    eps = evaluate.locomo_episodes(samples, recent_messages=2)
    assert len(eps) == 6 and eps[0]["category"] == "4"
    first = samples[0]["messages"]
    assert eps[0]["write"] == first[:-2] and eps[0]["read"][:2] == first[-2:]
    assert eps[0]["read"][2]["content"].endswith("Answer briefly.")


def test_data_evaluation_with_a_neutral_adapter_equals_the_backbone(tiny_ckpt):
    """Zero Δ-projections read nothing: the state conditions give the backbone's replies exactly; scores are in
    range and LoCoMo categories are reported."""
    model, tok = tiny(tiny_ckpt, init="zero")
    eps = evaluate.locomo_episodes(evaluate.load_locomo(LOCOMO), recent_messages=1)
    res = evaluate.data_evaluation(model, tok, eps, "cpu", fp32, window=64, max_new_tokens=4)
    assert set(res) == set(evaluate.DATA_CONDITIONS)
    base = res["recent_only"]
    assert res["state_and_recent"] == base == res["shuffled_state_and_recent"]
    assert base["n"] == 6 and set(base["categories"]) == {"1", "2", "3", "4"}
    assert 0 <= base["f1"] <= 1 and base["f1_ci"][0] <= base["f1"] <= base["f1_ci"][1]
    assert res["full_history_in_context"]["n"] <= 6


def test_shuffled_state_comes_from_another_history(tiny_ckpt):
    model, tok = tiny(tiny_ckpt)
    eps = [{"write": [{"role": "user", "content": w}], "read": [{"role": "user", "content": "?"}], "target": "x"}
           for w in ("a", "a", "b")]
    seen = []
    generate = evaluate.generate_answers
    evaluate.generate_answers = lambda m, t, prompts, state, *a: seen.append(state) or generate(m, t, prompts, state, *a)
    try:
        evaluate.data_evaluation(model, tok, eps, "cpu", fp32, max_new_tokens=2)
    finally:
        evaluate.generate_answers = generate
    own, shuffled = seen[1][0], seen[2][0]  # layer 0 of the state and shuffled conditions
    assert torch.equal(shuffled[0], own[2]) and torch.equal(shuffled[1], own[2]) and torch.equal(shuffled[2], own[0])


def test_curves_points(tiny_ckpt):
    model, tok = tiny(tiny_ckpt)
    res = evaluate.curves(model, tok, TaskConfig(attributes=3, facts=2), 4, 0, "cpu", fp32, fillers=(0, 2))
    assert list(res["capacity"]) == [1, 2, 3] and list(res["forgetting"]) == [0, 2]
    assert res["forgetting"][0]["tokens_after"] == 0 < res["forgetting"][2]["tokens_after"]
    assert all(0 <= v <= 1 for p in res["capacity"].values() for v in p.values() if not isinstance(v, list))
    assert "another_fact" not in res["capacity"][1] and len(res["capacity"][3]["recall_by_place"]) == 3
    assert "kept_by_place" not in res["capacity"][1] and len(res["capacity"][3]["kept_by_place"]) == 3
    assert len(res["capacity"][2]["key_match"]) == len(model.model.layers)
    res = evaluate.curves(model, tok, TaskConfig(attributes=3, facts=1, pool="vocab"), 2, 0, "cpu", fp32, fillers=(0,))
    assert list(res["capacity"]) == list(range(1, 9))  # vocabulary words fit every attribute: up to all 8 facts


def test_addressing_says_which_fact_the_read_names(tiny_ckpt, monkeypatch):
    _, tok = tiny(tiny_ckpt)
    eps = [ep for ep in episodes(TaskConfig(attributes=3, facts=3), "valid", 24, seed=0)  # told apart by a first token
           if len({tok.encode(" " + v)[0] for v in ep["facts"]}) == 3]
    asked = [ep["facts"].index(ep["value"]) for ep in eps]
    assert set(asked) == {0, 1, 2}

    def names_the_second_fact(ids, state, write, pad_mask, logits):  # a stand-in model: (B, V) logits
        out = torch.zeros(len(ids), tok.vocab_size)
        for j, ep in enumerate(eps[:len(ids)]):
            out[j, tok.encode(" " + ep["facts"][1])[0]] = 1.0
        return out, None
    monkeypatch.setattr(evaluate, "write_pass", lambda model, b: None)
    res = evaluate.addressing(names_the_second_fact, tok, eps, "cpu", fp32, batch_size=len(eps))
    assert res == {"recall_by_place": [0.0, 1.0, 0.0], "another_fact": sum(a != 1 for a in asked) / len(eps)}


@pytest.mark.parametrize("write", ["tsw", "msw"])
def test_anatomy_weighs_each_fact_by_what_later_writes_leave_of_it(tiny_ckpt, write):
    """With the same gate β on every token, the write at position t keeps β(1 − β)^(tokens after it) by the end of
    its own history (episodes of different lengths share a padded batch); with a zero query every q·k ties and
    the first fact is taken, so the key match is the share of episodes that ask the first fact."""
    model, tok = tiny(tiny_ckpt, write=write, beta_bias_init=-3.0)
    for block in model.model.layers:
        torch.nn.init.zeros_(block.self_attn.delta_mem.memory_q_proj.weight)
    eps = [ep for ep in episodes(TaskConfig(attributes=3, facts=3, filler=1), "valid", 24, seed=0)
           if len({tok.encode(" " + v)[0] for v in ep["facts"]}) == 3]
    res = evaluate.anatomy(model, tok, eps, "cpu", fp32, batch_size=5)
    beta = torch.sigmoid(torch.tensor(-3.0, dtype=torch.float64)).item()
    expected = []
    for place in range(3):
        weights = []
        for ep in eps:
            ids = chat_with_segments(tok, ep["write"])[0]
            last = len(ids) - 1 - ids[::-1].index(tok.encode(" " + ep["facts"][place])[0])
            weights.append(beta * (1 - beta) ** (len(ids) - 1 - last))
        expected.append(sum(weights) / len(eps))
    layers = len(model.model.layers)
    expected = torch.tensor(expected, dtype=torch.float64)[:, None].expand(3, layers)  # (facts, layers)
    torch.testing.assert_close(torch.tensor(res["kept_by_place"], dtype=torch.float64), expected, rtol=1e-9, atol=0)
    assert len({len(chat_with_segments(tok, ep["write"])[0]) for ep in eps}) > 1  # padding was exercised
    first = sum(ep["facts"].index(ep["value"]) == 0 for ep in eps) / len(eps)
    assert 0 < first < 1 and res["key_match"] == pytest.approx([first] * layers) and res["key_match_chance"] == 1 / 3


@pytest.mark.parametrize("acks", [False, True])
def test_fact_first_puts_all_small_talk_after_the_fact(acks):
    eps = episodes(TaskConfig(facts=1, filler=3, acks=acks), "valid", 32, seed=0)
    assert any(not ep["write"][0]["content"].startswith("My favourite") for ep in eps)  # small talk may come first
    for ep in eps:
        moved = evaluate.fact_first(ep)["write"]
        assert moved[0]["content"].startswith("My favourite") and len(moved) == len(ep["write"])
        assert (moved[1]["role"] == "assistant") == acks  # the acknowledgement stays with its fact
        assert sorted(map(str, moved)) == sorted(map(str, ep["write"]))


def test_cli_table_curves_locomo_and_errors(tiny_ckpt, tmp_path):
    model, tok = tiny(tiny_ckpt, write="ssw")
    model.float()
    adapter = tmp_path / "run" / "adapter.safetensors"
    adapter.parent.mkdir()
    save_adapter(model, adapter, {"train_config": json.dumps({"attributes": 2, "facts": 2, "lr": 1.0})})
    common = ["--ckpt", str(tiny_ckpt), "--episodes", "4", "--device", "cpu", "--dtype", "float32"]
    evaluate.main([str(adapter), *common, "--out", str(tmp_path / "table")])
    table = json.loads((tmp_path / "table" / "eval.json").read_text())
    assert set(table) == {"valid", "test", "unseen"} and set(table["valid"]) == set(evaluate.CONDITIONS)
    evaluate.main([str(adapter), *common, "--curves", "--out", str(tmp_path / "curves")])
    curves = json.loads((tmp_path / "curves" / "curves.json").read_text())
    assert list(curves["ssw (run)"]["capacity"]) == ["1", "2"]  # the task stored with the adapter: 2 attributes
    assert (tmp_path / "curves" / "curves.png").is_file()
    evaluate.main([str(adapter), *common, "--probe", "--out", str(tmp_path / "probe")])
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe["n"] == 4 and all(0 <= probe[s][c] <= 1 for s in ("valid", "test", "unseen") for c in ("state", "shuffled"))
    evaluate.main([str(adapter), *common, "--locomo", str(LOCOMO), "--out", str(tmp_path / "locomo")])
    assert json.loads((tmp_path / "locomo" / "eval.json").read_text())["state_and_recent"]["n"] == 6
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(SystemExit, match="bad.json: expected a non-empty list of samples"):
        evaluate.main([str(adapter), *common, "--locomo", str(bad)])
    with pytest.raises(SystemExit, match="nope.safetensors: not found"):
        evaluate.main([str(tmp_path / "nope.safetensors"), *common])


def test_teacher_forced_exact_match_is_what_greedy_decoding_would_answer(tiny_ckpt, monkeypatch):
    """exact == greedy decoding reproduces the answer's tokens and then stops: targets made of the model's own greedy
    tokens are exact exactly when its next greedy token is <|im_end|>; one changed token is never exact."""
    model, tok = tiny(tiny_ckpt)
    eps = [{"write": [{"role": "user", "content": f"fact {i}"}], "read": [{"role": "user", "content": f"q {i}?"}]}
           for i in range(6)]
    state = model(torch.tensor([tok.encode(f"fact {i}") for i in range(6)]))[1]
    prompts = [tok.encode_chat(ep["read"]) for ep in eps]
    greedy = [[t.item() for t, _ in model.generate(torch.tensor([p]), 5, temperature=0,
                                                    state=[s[i:i + 1] for s in state], write=False)]
              for i, p in enumerate(prompts)]
    end = tok.added["<|im_end|>"]
    targets = {f"g{i}": g for i, g in enumerate(greedy)}  # greedy's own 5 tokens: exact by construction
    targets.update({f"t{i}": g[:4] + [end] for i, g in enumerate(greedy)})
    targets.update({f"w{i}": g[:2] + [(g[2] + 1) % 100] + g[3:4] + [end] for i, g in enumerate(greedy)})
    monkeypatch.setattr(evaluate, "target_ids", lambda tok, ep: targets[ep["target"]])
    monkeypatch.setattr(evaluate, "value_span", lambda tok, ep: (0, 1))
    expected = {"g": [True] * 6, "t": [g[4] == end for g in greedy], "w": [False] * 6}
    for kind in "gtw":
        group = [{**ep, "target": f"{kind}{i}"} for i, ep in enumerate(eps)]
        exact, value = evaluate.teacher_forced(model, tok, group, state, False, "cpu")
        assert value == [True] * 6  # the first token is the greedy one in every kind
        assert exact == expected[kind], kind


@pytest.mark.parametrize("frozen_query", [False, True])
def test_probe_features_are_the_reads_the_model_uses(tiny_ckpt, frozen_query):
    """state_reads gives, per layer, the read whose Δo correction the model adds at the position before the value."""
    model, tok = tiny(tiny_ckpt, frozen_query=frozen_query)
    eps = evaluate.episodes(TaskConfig(), "valid", 4, seed=0)
    b = evaluate.make_batch(tok, eps, "cpu")
    state = evaluate.write_pass(model, b)
    feats = evaluate.state_reads(model, b, state)  # (B, layers·n·r)
    corrections = []
    hooks = [blk.self_attn.delta_mem.register_forward_hook(lambda m, a, out: corrections.append(out[0]["o"]))
             for blk in model.model.layers]
    model(b["read"], state=state, write=False, pad_mask=b["read_real"], logits=False)
    for h in hooks:
        h.remove()
    cfg, rows = model.delta_mem_config, torch.arange(4)
    pos = torch.tensor([start - 1 for start, _ in b["value_pos"]])
    m = cfg.num_states * cfg.rank
    corrections = corrections[-len(model.model.layers):]  # frozen_query: after those of the pass without memory
    for layer, (blk, delta_o) in enumerate(zip(model.model.layers, corrections)):
        read = feats[:, layer * m:(layer + 1) * m] * (cfg.alpha / cfg.rank)
        expected = read @ blk.self_attn.delta_mem.delta_o_proj.weight.T  # (B, d)
        assert delta_o[rows, pos].abs().max() > 0
        torch.testing.assert_close(delta_o[rows, pos], expected, rtol=1e-12, atol=1e-12)
