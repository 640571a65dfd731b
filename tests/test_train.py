"""train.py and data.py on a tiny random Llama with a tiny SmolLM2-style tokenizer (seconds on a CPU)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from data import TaskConfig, address_logits, episode_loss, episodes, fact_inputs, make_batch, vocabulary, write_pass
from data import main as main_data
from deltamem import previous_keys
from deltamem_io import read_safetensors
from tokenizer import load_tokenizer


def config(tiny_ckpt, tmp_path, **change) -> train.TrainConfig:
    """A small run of the closed 3-fact task (the tests below check the mechanics, not the recipe)."""
    return train.TrainConfig(**{**dict(ckpt=str(tiny_ckpt), out=str(tmp_path / "run"), device="cpu", batch_size=4,
                                       micro_batch=2, episodes=12, eval_every=100, eval_episodes=4, lr=1e-2,
                                       pool="lists", facts=3, copy_warmup=0, ask_all=False, one_fact_episodes=0,
                                       key_warmup=0, address_weight=0.0), **change})


def test_episode_tensors(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    eps = episodes(TaskConfig(filler=2), "train", 3, seed=0)
    b = make_batch(tok, eps, "cpu")
    for i, ep in enumerate(eps):
        prompt = tok.encode_chat(ep["read"])
        answer = tok.encode(ep["target"]) + [tok.added["<|im_end|>"]]
        read = b["read"][i][b["read_real"][i]].tolist()
        assert read == prompt + answer  # the question only: no history in it
        labels = b["labels"][i]
        n = len(prompt)
        assert labels[:n].eq(-100).all() and labels[n:n + len(answer)].tolist() == answer  # loss on the answer only
        assert labels[n + len(answer):].eq(-100).all()
        s, e = b["value_pos"][i]
        assert tok.decode(read[s:e]) == " " + ep["value"]
        seg = b["segments"][i][b["write_real"][i]].tolist()
        assert sorted(set(seg)) == list(range(len(ep["write"])))  # one id per message, no system prompt
        assert seg == sorted(seg)  # each message's tokens are contiguous


def test_splits_keep_their_promises():
    cfg = TaskConfig()
    asked = lambda split: {(e["read"][0]["content"], e["value"]) for e in episodes(cfg, split, 300, seed=1)}
    train_values = {m["content"] for e in episodes(cfg, "train", 300, seed=1) for m in e["write"]}
    assert not asked("test") & asked("train")  # held-out pairs are never asked in training...
    assert all(any(v in h for h in train_values) for _, v in asked("test"))  # ...but training histories mention them
    assert not any(v in h for _, v in asked("unseen") for h in train_values)  # unseen values never occur at all


def test_training_steps_reduce_the_loss_through_the_state(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt, tmp_path)
    model, tok, device, autocast = train.setup(cfg)
    opt = torch.optim.AdamW(train.adapter_parameters(model).values(), lr=1e-2)
    b = make_batch(tok, episodes(cfg.task(), "train", 4, seed=0), device)
    losses = []
    for _ in range(15):
        out = episode_loss(model, b, cfg.beta_weight, cfg.beta_target)
        (out["ce"] / out["tokens"] + out["beta_term"]).backward()
        mem = model.model.layers[0].self_attn.delta_mem
        assert mem.memory_k_proj.weight.grad.abs().sum() > 0  # only reachable through the written state
        opt.step()
        opt.zero_grad()
        losses.append((out["ce"] / out["tokens"]).item())
    assert losses[-1] < 0.8 * losses[0]


def test_ask_all_writes_each_history_once_and_reads_it_once_per_fact(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt, tmp_path)
    model, tok, device, autocast = train.setup(cfg)
    eps = episodes(cfg.task(), "train", 2, seed=0, ask_all=True)  # 2 chats, 3 facts each
    b = make_batch(tok, eps, device)
    assert b["write"].shape[0] == 2 and b["write_of"].tolist() == [0, 0, 0, 1, 1, 1] and b["read"].shape[0] == 6
    state = write_pass(model, b)
    alone = write_pass(model, make_batch(tok, eps[3:4], device))  # the second history, written by itself
    for s, a in zip(state, alone):
        assert s.shape[0] == 6 and torch.equal(s[3], s[5])
        torch.testing.assert_close(s[3], a[0], rtol=1e-6, atol=1e-7)  # fp32 rounding: measured 6e-9 on entries ~0.1


@pytest.mark.parametrize("write,key_shift", [("msw", False), ("msw", True), ("ssw", False)])
def test_address_logits_are_the_q_dot_k_of_the_answers_query_with_each_facts_key(tiny_ckpt, tmp_path, write,
                                                                                    key_shift):
    """fact_inputs finds, in padded batches of histories asked about each fact, the write of each fact's value (its
    last mention, here the assistant's acknowledgement) and the key it was written under (with key_shift, the token
    before's; SSW: the key of its message's mean x); address_logits is then the q·k of the query where the answer's
    value is predicted with those keys, as the model's own projections of the whole passes give them."""
    cfg = config(tiny_ckpt, tmp_path, pool="vocab", acks=True, filler=1, write=write, key_shift=key_shift,
                 frozen_query=True)
    model, tok, device, autocast = train.setup(cfg)
    eps = episodes(cfg.task(), "train", 3, seed=0, words=vocabulary(tok), ask_all=True)
    b = make_batch(tok, eps, device)
    ids = b["write"].tolist()
    for ep, row, told, asked in zip(eps, b["write_of"].tolist(), b["told"].tolist(), b["asked"].tolist()):
        assert [ids[row][t] for t in told] == [tok.encode(" " + v)[0] for v in ep["facts"]]
        assert all(ids[row][t + 1:].count(ids[row][t]) == 0 for t in told)  # the last mention
        assert ep["facts"][asked] == ep["value"]
    assert len(set(b["write_real"].sum(1).tolist())) > 1  # padding was exercised
    x_write, x_read = [], []
    state = write_pass(model, b, inputs=x_write)
    model(b["read"], state=state, write=False, pad_mask=b["read_real"], logits=False, inputs=x_read)
    x_facts, x_query = fact_inputs(model, b, x_write, x_read)
    for mem, xw, xr, xf, xq in zip([blk.self_attn.delta_mem for blk in model.model.layers], x_write, x_read, x_facts,
                                   x_query):
        k = mem.project(xw)[1]  # (B_write, T, n, r)
        if key_shift:
            k = previous_keys(k, b["write_real"])
        for i, (start, _) in enumerate(b["value_pos"]):
            q = mem.project(xr[i:i + 1])[0][0, start - 1]  # (n, r): where the value's first token is predicted
            row, told = b["write_of"][i], b["told"][i]
            if write == "ssw":  # each fact's key is made from the mean x of the message its value is in
                segments = b["segments"][row]  # (T,)
                means = torch.stack([xw[row, segments == segments[t]].mean(0) for t in told])  # (facts, d)
                keys = mem.project(means)[1]  # (facts, n, r)
            else:
                keys = k[row, told]  # (facts, n, r)
            torch.testing.assert_close(address_logits(mem, xf[i:i + 1], xq[i:i + 1])[0], (keys * q).sum(-1).T,
                                       rtol=1e-5, atol=1e-6)  # fp32: the same products on gathered rows


def test_the_address_term_trains_the_query_and_key_projections_only(tiny_ckpt, tmp_path):
    """x is detached in the address loss: even when the write pass reads the state (so its x depends on the
    adapter), the term reaches W_mq and W_mk of every layer and nothing else; weight 0 leaves it out."""
    cfg = config(tiny_ckpt, tmp_path, write="msw", key_shift=True, frozen_query=True)
    model, tok, device, autocast = train.setup(cfg)
    b = make_batch(tok, episodes(cfg.task(), "train", 2, seed=0, ask_all=True), device)
    out = episode_loss(model, b, cfg.beta_weight, cfg.beta_target, address_weight=0.5)
    out["address_term"].backward()
    for name, p in train.adapter_parameters(model).items():
        learns = p.grad is not None and p.grad.abs().sum() > 0
        assert learns == name.endswith(("memory_q_proj.weight", "memory_k_proj.weight")), name
    assert 0 <= out["address_top1"] <= 1
    off = episode_loss(model, b, cfg.beta_weight, cfg.beta_target)
    assert off["address_term"] == 0 and off["address_top1"] is None


def test_resume_gives_the_same_next_step(tiny_ckpt, tmp_path):
    cfg = config(tiny_ckpt, tmp_path)
    path = tmp_path / "ckpt.pt"

    def fresh():
        torch.manual_seed(0)
        model, tok, device, autocast = train.setup(cfg)
        return model, tok, torch.optim.AdamW(train.adapter_parameters(model).values(), lr=cfg.lr)

    no_autocast = lambda: torch.autocast("cpu", enabled=False)
    stream = train.EpisodeStream(cfg, load_tokenizer(tiny_ckpt))
    step = lambda model, opt, tok, s: train.train_step(train.EpisodeLoss(model, cfg), opt, tok, cfg, stream, s, 4,
                                                        "cpu", no_autocast)["loss"]
    model, tok, opt = fresh()
    for s in range(2):
        step(model, opt, tok, s)
    train.save_checkpoint(path, model, opt, cfg, 2, [])
    uninterrupted = [step(model, opt, tok, 2), step(model, opt, tok, 3)]
    model, tok, opt = fresh()
    assert train.load_checkpoint(path, model, opt)[0] == 2
    resumed = [step(model, opt, tok, 2), step(model, opt, tok, 3)]
    assert resumed == uninterrupted  # the second step also depends on the restored optimizer moments


def test_main_end_to_end(tiny_ckpt, tmp_path):
    train.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "run"), "--episodes", "8", "--batch-size", "4",
                "--eval-episodes", "4", "--eval-every", "1", "--device", "cpu", "--facts", "1"])
    run = tmp_path / "run"
    for name in ("adapter.safetensors", "ckpt.pt", "eval.json", "eval.png", "loss.png"):
        assert (run / name).is_file(), name
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"valid", "test", "unseen"} and set(results["test"]) == set(train.CONDITIONS)
    assert all(c["n"] == 4 for split in results.values() for c in split.values())


@pytest.mark.parametrize("write", ["tsw", "ssw"])  # ssw: from the mean input of a fact message
def test_copy_warmup_ties_keys_to_queries_and_teaches_the_read_out_to_name_words(tiny_ckpt, tmp_path, write):
    cfg = config(tiny_ckpt, tmp_path, copy_warmup=150, write=write)
    model, tok, device, autocast = train.setup(cfg)
    said = []
    train.copy_warmup(model, tok, vocabulary(tok), cfg, device, autocast, lambda text, **kw: said.append(text))
    losses = [float(re.search(r"loss (\S+)", line).group(1)) for line in said]
    uniform = math.log(len(vocabulary(tok)["trained"]))
    assert losses[0] > 0.9 * uniform and losses[-1] < 0.5 * uniform, said
    for block in model.model.layers:
        mem = block.self_attn.delta_mem
        assert torch.equal(mem.memory_k_proj.weight, mem.memory_q_proj.weight)


def test_main_runs_the_default_recipe_in_miniature(tiny_ckpt, tmp_path):
    """The default pipeline, short: copy warm-up, a one-fact stage, the key warm-up, three facts with small talk
    asked about each with the addressing loss, the final table on its three splits."""
    train.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "run"), "--episodes", "8", "--batch-size", "4",
                "--eval-episodes", "4", "--device", "cpu", "--copy-warmup", "3", "--one-fact-episodes", "4",
                "--key-warmup", "3"])
    cfg = json.loads(read_safetensors(tmp_path / "run" / "adapter.safetensors")[1]["train_config"])
    assert (cfg["facts"], cfg["filler"], cfg["acks"], cfg["ask_all"], cfg["address_weight"]) == (3, 1, True, True, 1.0)
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert all(c["n"] == 4 for split in results.values() for c in split.values())
    first = tmp_path / "run" / "adapter.safetensors"  # a curriculum's next stage starts from it (lr 0: stays it)
    train.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "next"), "--episodes", "4", "--batch-size", "4",
                "--eval-episodes", "0", "--device", "cpu", "--init-adapter", str(first), "--lr", "0", "--facts", "1"])
    assert read_safetensors(tmp_path / "next" / "adapter.safetensors")[0].keys() == read_safetensors(first)[0].keys()
    assert all(torch.equal(a, read_safetensors(first)[0][k])
               for k, a in read_safetensors(tmp_path / "next" / "adapter.safetensors")[0].items())


def test_one_fact_episodes_run_a_one_fact_stage_first_and_train_from_its_adapter(tiny_ckpt, tmp_path):
    """The curriculum in one command: out/one_fact holds a one-fact run (no small talk, no addressing), the main
    stage starts from its adapter, and the main stage's log carries on the first's (wall time growing, facts 1 then
    3). --resume after the first stage finished runs only what is left."""
    flags = ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "4",
             "--micro-batch", "4", "--eval-every", "1", "--eval-episodes", "0", "--pool", "vocab", "--facts", "3",
             "--acks", "--filler", "1", "--ask-all", "--copy-warmup", "2", "--one-fact-episodes", "8",
             "--episodes", "4"]
    train.main(flags)
    first, second = train.stages(train.parse_args(flags))
    assert (first.facts, first.filler, first.acks, first.ask_all, first.episodes, first.eval_episodes) == (1, 0, False,
                                                                                                            False, 8, 0)
    assert first.out == str(tmp_path / "run" / "one_fact") and first.one_fact_episodes == 0
    assert second.init_adapter == str(tmp_path / "run" / "one_fact" / "adapter.safetensors")
    meta = read_safetensors(tmp_path / "run" / "adapter.safetensors")[1]
    assert json.loads(meta["train_config"])["init_adapter"] == second.init_adapter
    log = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["log"]
    assert [r["facts"] for r in log] == [1, 1, 3]  # 8 one-fact episodes in steps of 4, then one step of 4 histories
    assert all(a["minutes"] <= b["minutes"] for a, b in zip(log, log[1:])) and all("val_state" in r for r in log)
    assert (tmp_path / "run" / "one_fact" / "adapter.safetensors").is_file()
    assert [s.out for s in train.stages(train.parse_args(flags + ["--resume"]))] == [str(tmp_path / "run")]


def test_bad_inputs_are_one_line_errors(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no checkpoint to resume from"):
        train.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "r"), "--resume", "--device", "cpu"])
    with pytest.raises(SystemExit, match="nowhere: no such checkpoint directory; make one with python load_hf_weights"):
        train.main(["--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--device", "cpu"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        train.main(["--write", "xyz"])
    with pytest.raises(SystemExit):  # a usage error: --ask-all asks data.py's facts, not a chat file's
        train.main(["--ask-all", "--data", "chats.jsonl"])
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.endswith("--ask-all asks about data.py's facts: it does not apply to --data"), error
    for flags in (["--address-weight", "1", "--facts", "1"], ["--key-warmup", "5", "--facts", "3", "--data", "c.json"]):
        with pytest.raises(SystemExit):
            train.main(flags)
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.endswith("they need --facts 2 or more and no --data"), error
    for flags in (["--one-fact-episodes", "8", "--facts", "1"], ["--one-fact-episodes", "8", "--data", "chats.jsonl"]):
        with pytest.raises(SystemExit):
            train.main(flags)
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.endswith("before --facts 2 or more: it needs no --data"), error
    run = tmp_path / "r2"
    run.mkdir()
    cfg = config(tiny_ckpt, tmp_path)
    model, tok, device, autocast = train.setup(cfg)
    train.save_checkpoint(run / "ckpt.pt", model, torch.optim.AdamW(train.adapter_parameters(model).values()), cfg,
                          1, [])
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SystemExit) as e:
        train.main(["--ckpt", str(tiny_ckpt), "--out", str(run), "--resume", "--device", "cpu"])
    assert str(e.value.code) == (f"error: {run / 'ckpt.pt'}: not a readable checkpoint (truncated or corrupt); "
                                 f"delete it to start afresh")
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt"]  # nothing else written


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["-h"])
    assert e.value.code == 0
    assert set(train.field_help()) == {f.name for f in train.fields(train.TrainConfig)}  # no field left undocumented


def test_copy_warmup_and_out_defaults_depend_on_the_write_mode():
    """SSW fits message means, which take ~5x the steps of token inputs; an explicit value (0 included) wins. Each
    write mode has its own run directory unless --out names one."""
    assert [train.parse_args(["--write", w]).out for w in ("tsw", "ssw", "msw")] == ["runs/tsw", "runs/ssw", "runs/msw"]
    assert train.parse_args(["--write", "msw", "--out", "x"]).out == "x"
    assert train.parse_args([]).copy_warmup == 300
    assert train.parse_args(["--write", "msw"]).copy_warmup == 300
    assert train.parse_args(["--write", "ssw"]).copy_warmup == 1500
    assert train.parse_args(["--write", "ssw", "--copy-warmup", "0"]).copy_warmup == 0
    assert train.parse_args(["--copy-warmup", "7"]).copy_warmup == 7


def test_the_default_is_the_three_fact_curriculum_of_the_readme_and_fits_the_flags_given():
    """`python train.py --write tsw` runs the recipe README's table measured; a flag left out takes the value that
    fits the task and write mode given, an explicit one (0 and --no-... included) wins."""
    recipe = dict(key_shift=True, write_pass_reads=False, frozen_query=True, facts=3, acks=True, filler=1, ask_all=True,
                  one_fact_episodes=2400, key_warmup=400, address_weight=1.0, episodes=800, rank=16, lr=3e-3)

    def picked(cfg, names=recipe):
        return {k: getattr(cfg, k) for k in names}

    assert picked(train.parse_args(["--write", "tsw"])) == recipe
    off = dict(ask_all=False, one_fact_episodes=0, key_warmup=0, address_weight=0.0, episodes=2400)
    assert picked(train.parse_args(["--facts", "1"]), off) == off  # one fact: no curriculum, nothing to address
    assert picked(train.parse_args(["--data", "chats.jsonl"]), off) == off
    ssw = train.parse_args(["--write", "ssw"])  # message writes: no key shift, no addressing; still the curriculum
    assert (ssw.key_shift, ssw.key_warmup, ssw.address_weight, ssw.one_fact_episodes) == (False, 0, 0.0, 2400)
    addressed = train.parse_args(["--write", "ssw", "--key-warmup", "400", "--address-weight", "1"])  # README's run
    assert (addressed.key_warmup, addressed.address_weight) == (400, 1.0)
    mine = train.parse_args(["--episodes", "100", "--no-ask-all", "--key-warmup", "0", "--no-key-shift"])
    assert (mine.episodes, mine.ask_all, mine.key_warmup, mine.key_shift, mine.address_weight) == (100, False, 0, False,
                                                                                                  1.0)


def test_ctrl_c_during_training_leaves_a_loadable_checkpoint(tiny_ckpt, tmp_path):
    """A real SIGINT to a running `train.py`: it saves ckpt.pt at the step reached, and --resume can load it."""
    cfg = config(tiny_ckpt, tmp_path)
    flags = ["--ckpt", cfg.ckpt, "--out", cfg.out, "--device", "cpu", "--episodes", "100000", "--batch-size", "2",
             "--micro-batch", "2", "--eval-every", "100000", "--facts", "1"]
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a runner that started us in the background may have SIGINT ignored, and a child
                            # would inherit that; Ctrl-C in a terminal has the default action
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # wait until it is inside the training loop
            if line.startswith("step    2/"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    saved = re.search(r"interrupted at step (\d+); saved .*ckpt\.pt", err)
    assert proc.returncode == 1 and saved, err
    step = int(saved[1])
    assert step >= 2
    model, tok, device, autocast = train.setup(cfg)
    opt = torch.optim.AdamW(train.adapter_parameters(model).values(), lr=cfg.lr)
    resumed, log = train.load_checkpoint(tmp_path / "run" / "ckpt.pt", model, opt)
    assert resumed == step and len(log) == step and opt.state  # the optimizer moments came back too


def test_interrupted_checkpoint_save_keeps_the_previous_one(tiny_ckpt, tmp_path, monkeypatch):
    cfg = config(tiny_ckpt, tmp_path)
    model, tok, device, autocast = train.setup(cfg)
    opt = torch.optim.AdamW(train.adapter_parameters(model).values(), lr=cfg.lr)
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint(path, model, opt, cfg, 3, [])

    def interrupted(obj, f):  # half a file, then Ctrl-C
        open(f, "wb").write(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, model, opt, cfg, 4, [])
    monkeypatch.undo()
    assert train.load_checkpoint(path, model, opt)[0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # the half-written file is gone


def test_unknown_write_mode_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit):
        train.main(["--write", "xyz"])
    err = capsys.readouterr().err
    assert "argument --write: invalid choice: 'xyz'" in err and "tsw" in err and "msw" in err


def run_train(flags, ranks=1):
    """train.py in a subprocess: one process, or `ranks` ranks under torchrun (gloo on CPU), one thread each."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    return subprocess.run(launch + ["train.py", *flags], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("data", [False, True])
def test_two_ranks_train_the_same_adapter_as_one_process(tiny_ckpt, tmp_path, data):
    """DDP over 2 gloo ranks, each taking half of every step's episodes, ends where one process doing the whole
    batch ends (fp32, 2 optimizer steps), as closely as one process ends with another micro-batch size: the same sums
    in another order. Adam moves a weight by about lr whatever its gradient's size, so a small gradient whose terms
    cancel carries its rounding into the weights (measured at r = 16: up to 4e-5 with 2 ranks and 7e-5 with 2
    episodes per micro-batch, on weights of 0.3). A checkpoint of the 2 ranks resumes on 1."""
    from deltamem_io import read_safetensors
    flags = ["--ckpt", str(tiny_ckpt), "--episodes", "8", "--batch-size", "4", "--lr", "1e-2",
             "--eval-every", "1000", "--eval-episodes", "0", "--device", "cpu", "--dtype", "float32", "--threads", "1",
             "--facts", "1"]
    if data:
        chats = tmp_path / "chats.jsonl"
        main_data(["--out", str(chats), "--n", "6", "--filler", "1"])
        flags += ["--data", str(chats)]
    runs = {}
    for ranks, micro in ((1, "1"), (1, "2"), (2, "1")):
        out = tmp_path / f"r{ranks}m{micro}"
        proc = run_train(flags + ["--micro-batch", micro, "--out", str(out)], ranks)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[ranks, micro] = read_safetensors(out / "adapter.safetensors")[0]
    assert "(2 ranks x 2)" in proc.stdout
    for name, one in runs[1, "1"].items():
        order = (runs[1, "2"][name] - one).abs().max()  # the same sums in another order: rounding, nothing else
        diff = (runs[2, "1"][name] - one).abs().max()
        assert diff <= 4 * order + 1e-6 * one.abs().max(), (name, diff.item(), order.item())
    assert any((t != 0).any() for t in runs[1, "1"].values())
    resumed = run_train(flags + ["--micro-batch", "1", "--out", str(tmp_path / "r2m1"), "--resume", "--episodes", "12"])
    assert resumed.returncode == 0 and "step    3/3" in resumed.stdout, resumed.stderr[-2000:]
