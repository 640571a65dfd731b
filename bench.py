"""Benchmarks for deltamem on CPU: prints a table and writes every measurement to a JSON file.

Sections (each a function `bench_<name>(args) -> list[dict]`, one dict per table row; add new ones to SECTIONS):
  scan        the delta-rule scan, chunked vs per-token loop (deltamem.delta_rule_chunked / delta_rule_loop),
              forward and forward+backward, fp32, r = 8, over B × n (state heads) × T.
  chunk_size  the chunked scan alone at several chunk sizes (how the default chunk size was chosen).
  backbone    model.py vs transformers on the same converted weights (fp32): prefill time and greedy decode speed
              (transformers is optional; without it, its columns are empty).
  prefill     δ-mem (TSW, writing every token) vs the frozen backbone: prefill time, in the --dtype.
  decode      the same, per-token latency of decoding after a prompt (the state read and written every token).
  memory      bytes of the δ-mem state vs the KV cache holding the same history (computed, not timed).
  train       tokens/s of a training step on train.py's default episode batch (write + read pass, backward) in the
              --dtype, with the chunked scan vs the per-token loop, and the process's peak RSS.
  activations what a bf16 write pass through Qwen3-4B keeps for the backward, with and without --grad-checkpoint,
              counted on one Qwen3-4B-shaped layer and scaled to the whole model at --T-write tokens.
  compile     torch.compile on the δ-mem model vs eager prefill (not in the default sections: compiling is slow).

Timing: each case runs once untimed (warm-up), then in rounds that alternate the compared sides, so that load from
other processes hits both alike; we report medians. Set --threads to the cores that are actually free: extra
threads on a busy machine give 10-100x outliers. Flush-to-zero is on (denormals can stall a step for seconds).

    python bench.py                        # every section but compile (the loop's fwd+bwd at T = 8192 is slow)
    python bench.py --quick                # tiny sizes on the default model, seconds (tests/test_bench.py runs it)
    python bench.py --sections chunk_size --chunk-sizes 4,8,16,32,64
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from data import TaskConfig, episode_loss, episodes, make_batch
from deltamem import DeltaMemConfig, attach, delta_rule_chunked, delta_rule_loop
from load_hf_weights import checkpoint_dir
from model import KVCache, ModelConfig, Transformer, load_model
from runtime import DTYPES, HelpFormatter, configure, precision
from tokenizer import load_tokenizer


def ints(text):
    return [int(x) for x in text.split(",")]


def scan_inputs(B, T, n, r, seed=0):
    """q, k (tanh + L2-normalised), v, beta_logit: (B, T, n, r) fp32 leaves; gates around the init (β ≈ 0.18)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.tanh(torch.randn(B, T, n, r, generator=g)), dim=-1)
    k = F.normalize(torch.tanh(torch.randn(B, T, n, r, generator=g)), dim=-1)
    v = torch.randn(B, T, n, r, generator=g)
    beta_logit = torch.randn(B, T, n, r, generator=g) - 1.5
    return [x.requires_grad_() for x in (q, k, v, beta_logit)]


def scan_call(fn, inputs, backward, **kw):
    """One timed unit of work: forward only (no autograd graph) or forward + backward of a scalar loss."""
    def call():
        if backward:
            reads, state = fn(*inputs, **kw)
            (reads.sum() + state.sum()).backward()
        else:
            with torch.no_grad():
                fn(*inputs, **kw)
    return call


def time_alternating(calls, reps, budget_s):
    """{name: call} -> {name: [seconds]}. One untimed warm-up call each, then rounds that alternate the sides.
    Rounds: `reps`, but fewer (at least 3) if a round would take longer than budget_s / reps."""
    round_s = 0.0
    for call in calls.values():
        t0 = time.perf_counter()
        call()
        round_s += time.perf_counter() - t0
    rounds = max(3, min(reps, int(budget_s / max(round_s, 1e-9))))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return times


def scan_cases(args):
    """Every (T, B, n, mode) of the size grid, with its scan inputs and whether to time the backward too."""
    for T in args.T:
        for B in args.B:
            for n in args.n:
                inputs = scan_inputs(B, T, n, args.r)
                for mode in ("fwd", "fwd+bwd"):
                    yield dict(mode=mode, B=B, n=n, r=args.r, T=T), inputs, mode == "fwd+bwd"


def bench_scan(args):
    rows = []
    for case, inputs, backward in scan_cases(args):
        calls = {"loop": scan_call(delta_rule_loop, inputs, backward),
                 "chunked": scan_call(delta_rule_chunked, inputs, backward)}
        times = time_alternating(calls, args.reps, args.budget)
        loop_ms, chunked_ms = (1e3 * statistics.median(times[s]) for s in ("loop", "chunked"))
        rows.append(dict(section="scan", **case, loop_ms=round(loop_ms, 3), chunked_ms=round(chunked_ms, 3),
                         speedup=round(loop_ms / chunked_ms, 2), rounds=len(times["loop"])))
        print_row(rows[-1])
    return rows


def bench_chunk_size(args):
    rows = []
    for case, inputs, backward in scan_cases(args):
        calls = {C: scan_call(delta_rule_chunked, inputs, backward, chunk_size=C) for C in args.chunk_sizes}
        times = time_alternating(calls, args.reps, args.budget)
        medians = {C: 1e3 * statistics.median(t) for C, t in times.items()}
        best = min(medians, key=medians.get)
        for C, ms in medians.items():
            rows.append(dict(section="chunk_size", **case, chunk_size=C, chunked_ms=round(ms, 3),
                             vs_best=round(ms / medians[best], 2), rounds=len(times[C])))
            print_row(rows[-1])
    return rows


def bench_backbone(args):
    """Our model vs transformers' on the same converted weights (fp32): prefill time and greedy decode speed."""
    ckpt = checkpoint_dir(args.ckpt)
    ours = load_model(ckpt)
    try:
        from transformers import AutoModelForCausalLM
        theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    except ImportError:
        print("transformers is not installed: its columns are left empty")
        theirs = None
    idx = torch.randint(0, ours.config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    prompt = idx[:, :32]  # (1, 32)

    def our_decode():
        for _ in ours.generate(prompt, args.decode, temperature=0):
            pass

    calls = {"ours_prefill": lambda: ours(idx), "ours_decode": our_decode}
    if theirs is not None:
        calls.update(theirs_prefill=lambda: theirs(idx), theirs_decode=lambda: theirs.generate(
            prompt, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False, pad_token_id=0))
    with torch.inference_mode():
        times = time_alternating(calls, args.reps, args.budget)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for what, unit, scale in (("prefill", f"ms ({args.prefill} tokens)", 1e3), ("decode", "tokens/s", None)):
        value = lambda side: (med[f"{side}_{what}"] * scale if scale else args.decode / med[f"{side}_{what}"])
        ours_v = value("ours")
        theirs_v = value("theirs") if theirs is not None else None
        # speedup > 1 means ours is faster
        speedup = None if theirs_v is None else (theirs_v / ours_v if scale else ours_v / theirs_v)
        rows.append(dict(section="backbone", what=what, unit=unit, ours=round(ours_v, 2),
                         transformers=None if theirs_v is None else round(theirs_v, 2),
                         ours_speedup=None if speedup is None else round(speedup, 3), rounds=len(times["ours_decode"])))
        print_row(rows[-1])
    return rows


def memory_models(args):
    """The backbone twice, in the compute dtype: frozen, and with a fresh TSW adapter attached (reads and writes cost
    the same at init)."""
    ckpt = checkpoint_dir(args.ckpt)
    backbone, mem = (load_model(ckpt, dtype=args.dtype) for _ in range(2))
    return backbone, attach(mem, DeltaMemConfig(write="tsw"))


def bench_prefill(args):
    """δ-mem prefill (writing the whole prompt) vs the frozen backbone."""
    backbone, mem = memory_models(args)
    idx = torch.randint(0, backbone.config.vocab_size, (1, args.T_prefill), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), precision(torch.device("cpu"), args.dtype):
        times = time_alternating({"backbone": lambda: backbone(idx), "deltamem": lambda: mem(idx)},
                                 args.reps, args.budget)
    b, m = (1e3 * statistics.median(times[s]) for s in ("backbone", "deltamem"))
    row = dict(section="prefill", dtype=str(args.dtype).removeprefix("torch."), T=args.T_prefill,
               backbone_ms=round(b, 1), deltamem_ms=round(m, 1), overhead=round(m / b, 3), rounds=len(times["backbone"]))
    print_row(row)
    return [row]


def bench_decode(args):
    """Per-token latency of decoding after a prompt, δ-mem reading and writing every token, vs the frozen backbone."""
    backbone, mem = memory_models(args)
    prompt = torch.randint(0, backbone.config.vocab_size, (1, args.T_decode), generator=torch.Generator().manual_seed(0))
    steps = args.decode

    def decode_ms(model):
        """Prefill (untimed), then `steps` single-token calls with the KV cache (and the state): ms per token."""
        cache = KVCache(model.config, 1, args.T_decode + steps, "cpu", args.dtype)
        logits, state = model(prompt, cache=cache)
        tok = logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = model(tok, state=state, cache=cache)
            tok = logits[:, -1:].argmax(-1)
        return 1e3 * (time.perf_counter() - t0) / steps

    times = {"backbone": [], "deltamem": []}
    with torch.inference_mode(), precision(torch.device("cpu"), args.dtype):
        decode_ms(backbone), decode_ms(mem)  # warm-up
        for _ in range(max(3, args.reps // 2)):
            for name, model in (("backbone", backbone), ("deltamem", mem)):
                times[name].append(decode_ms(model))
    b, m = (statistics.median(times[s]) for s in ("backbone", "deltamem"))
    row = dict(section="decode", dtype=str(args.dtype).removeprefix("torch."), prompt=args.T_decode, tokens=steps,
               backbone_ms_per_token=round(b, 2), deltamem_ms_per_token=round(m, 2), overhead=round(m / b, 3),
               rounds=len(times["backbone"]))
    print_row(row)
    return [row]


def bench_memory(args):
    """Bytes of the δ-mem state (fp32) vs the KV cache (bf16) that would keep the same history in context."""
    configs = {"SmolLM2-135M": (30, 3, 64), "Qwen3-4B": (36, 8, 128)}  # layers, KV heads, head dim
    rows = []
    for name, (L, nkv, hd) in configs.items():
        for write, n in (("tsw/ssw", 1), ("msw", 4)):
            for T in (1024, 8192, 32768):
                state, kv = L * n * 8 * 8 * 4, 2 * L * nkv * hd * T * 2
                rows.append(dict(section="memory", model=name, write=write, history=T, state_bytes=state,
                                 kv_cache_bytes=kv, kv_over_state=round(kv / state)))
                print_row(rows[-1])
    return rows


def bench_train(args):
    """Throughput of one training step (write pass, read pass, backward; data.episode_loss) on train.py's default
    episode batch, in the compute dtype: the chunked scan (the default) vs the per-token loop."""
    ckpt = checkpoint_dir(args.ckpt)
    tok = load_tokenizer(ckpt)
    batch = make_batch(tok, episodes(TaskConfig(), "train", 8, seed=0), "cpu")
    n_tokens = int(batch["write_real"].sum() + batch["read_real"].sum())
    models = {name: attach(load_model(ckpt, dtype=args.dtype), DeltaMemConfig(chunk_size=C))
              for name, C in (("chunked", 16), ("loop", 0))}

    def step(model):
        with precision(torch.device("cpu"), args.dtype):
            out = episode_loss(model, batch, beta_weight=0.01, beta_target=0.05)
        (out["ce"] / out["tokens"] + out["beta_term"]).backward()
        model.zero_grad(set_to_none=True)

    raw = time_alternating({name: (lambda m=m: step(m)) for name, m in models.items()}, args.reps, args.budget)
    times = {k: statistics.median(v) for k, v in raw.items()}
    row = dict(section="train", dtype=str(args.dtype).removeprefix("torch."), episodes=8, tokens=n_tokens,
               chunked_tok_s=round(n_tokens / times["chunked"]), loop_tok_s=round(n_tokens / times["loop"]),
               speedup=round(times["loop"] / times["chunked"], 2),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), rounds=len(raw["chunked"]))
    print_row(row)
    return [row]


QWEN3_4B = dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                rope_theta=5000000, max_position_embeddings=262144, tie_word_embeddings=True)


def saved_bytes(model, idx, dtype) -> dict[str, int]:
    """Bytes autograd keeps for the backward of a write pass, by kind: activations (one row per token), attention
    probabilities (T × T per head) and the weights (kept by reference: no extra memory)."""
    params, T, kept = {id(p) for p in model.parameters()}, idx.shape[1], dict(activations=0, attention=0, weights=0)

    def pack(t):
        kind = ("weights" if id(t if t._base is None else t._base) in params
                else "attention" if list(t.shape).count(T) == 2 else "activations")
        kept[kind] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision(idx.device, dtype):
        model(idx, logits=False)
    return kept


def bench_activations(args):
    """Activation memory of a Qwen3-4B write pass (bf16 weights + autocast, δ-mem fp32), from one layer of its shape
    at T = 256: per token and layer, and scaled to 36 layers × --T-write tokens plus the bf16 weights. With
    --grad-checkpoint a block keeps only its input, and the backward recomputes one block at a time (+ that block's
    activations once). The CPU's math attention kernel also keeps the T × T probabilities (4·heads·T bytes per token
    and layer); CUDA's flash and memory-efficient kernels keep O(T) instead: reported apart, not in the total."""
    with torch.device("meta"):
        weights = 2 * sum(p.numel() for p in Transformer(ModelConfig.from_hf(QWEN3_4B)).parameters())
    rows, T, L, T_write = [], 256, QWEN3_4B["num_hidden_layers"], args.T_write
    per_token = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        layer = Transformer(ModelConfig.from_hf({**QWEN3_4B, "num_hidden_layers": 1, "vocab_size": 1024}))
        model = attach(layer.to(torch.bfloat16), DeltaMemConfig(write="tsw"))
        model.grad_checkpoint = checkpoint
        kept = saved_bytes(model, torch.zeros(1, T, dtype=torch.long), torch.bfloat16)
        per_token[checkpoint] = kept["activations"] / T  # bytes per token and layer
        total = weights + per_token[checkpoint] * L * T_write + (per_token[False] * T_write if checkpoint else 0)
        rows.append(dict(section="activations", grad_checkpoint=checkpoint,
                         KiB_per_token_layer=round(per_token[checkpoint] / 2**10, 1),
                         attention_KiB_per_token_layer=round(kept["attention"] / T / 2**10, 1), T_write=T_write,
                         weights_GiB=round(weights / 2**30, 1), total_GiB=round(total / 2**30, 1)))
        print_row(rows[-1])
    return rows


def bench_compile(args):
    """Whether torch.compile helps δ-mem prefill here (the repo's default stays eager unless it does)."""
    _, mem = memory_models(args)
    idx = torch.randint(0, mem.config.vocab_size, (1, args.T_prefill), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(mem)
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(idx)  # compiles
        compile_s = time.perf_counter() - t0
        times = time_alternating({"eager": lambda: mem(idx), "compiled": lambda: compiled(idx)}, args.reps, args.budget)
    e, c = (1e3 * statistics.median(times[s]) for s in ("eager", "compiled"))
    row = dict(section="compile", T=args.T_prefill, eager_ms=round(e, 1), compiled_ms=round(c, 1),
               speedup=round(e / c, 3), compile_s=round(compile_s, 1), rounds=len(times["eager"]))
    print_row(row)
    return [row]


SECTIONS = {"scan": bench_scan, "chunk_size": bench_chunk_size, "backbone": bench_backbone, "prefill": bench_prefill,
            "decode": bench_decode, "memory": bench_memory, "train": bench_train, "activations": bench_activations,
            "compile": bench_compile}


def print_row(row):
    """One table line; the header is printed whenever the section or its columns change."""
    cols = [c for c in row if c != "section"]
    if getattr(print_row, "cols", None) != (row["section"], cols):
        print_row.cols = (row["section"], cols)
        print(f"\n[{row['section']}]\n" + " ".join(f"{c:>10}" for c in cols))
    print(" ".join(f"{str(row[c]):>10}" for c in cols), flush=True)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def sections(text: str) -> list[str]:
    """--sections: comma-separated names from SECTIONS."""
    names = text.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sections", type=sections, default="scan,chunk_size,backbone,prefill,decode,memory,train,activations",
                   help=f"comma-separated, from: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (seconds; for tests)")
    p.add_argument("--out", default="bench.json", help="JSON file for all rows and the run's settings")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads: the free cores")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="compute dtype of the model sections; auto: bf16 where this CPU runs it fast, else fp32")
    p.add_argument("--reps", type=int, default=7, help="timed rounds per case (at most)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per case; fewer rounds (>= 3) above it")
    g = p.add_argument_group("sizes (comma-separated lists)")
    g.add_argument("--B", type=ints, default=[1, 4], help="batch sizes")
    g.add_argument("--n", type=ints, default=[1, 4], help="state heads per sequence (1; 4 for MSW)")
    g.add_argument("--T", type=ints, default=[512, 2048, 8192], help="sequence lengths")
    g.add_argument("--r", type=int, default=8, help="state rank")
    g.add_argument("--chunk-sizes", type=ints, default=[4, 8, 16, 32, 64], help="for the chunk_size section")
    g.add_argument("--ckpt", help="converted checkpoint for the model sections; leave out for the embedded SmolLM2-135M")
    g.add_argument("--prefill", type=int, default=512, help="backbone section: prompt tokens timed for prefill")
    g.add_argument("--decode", type=int, default=64, help="backbone, decode sections: tokens decoded")
    g.add_argument("--T-write", type=int, default=8192, help="activations section: write-pass tokens to estimate for")
    g.add_argument("--T-prefill", type=int, default=2048, help="prefill, compile sections: prompt tokens")
    g.add_argument("--T-decode", type=int, default=1024, help="decode section: prompt tokens before decoding")
    args = p.parse_args(argv)
    if args.quick:
        args.B, args.n, args.T, args.chunk_sizes, args.reps, args.budget = [1, 2], [1, 4], [16, 100], [4, 16], 3, 1.0
        args.prefill, args.decode, args.T_prefill, args.T_decode = 16, 4, 16, 16
    try:
        _, args.dtype = configure("cpu", args.dtype, args.threads)
        load = os.getloadavg()[0]
        print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, load average {load:.2f}")
        if load > 0.5:
            print("warning: other processes are using the CPU; timings will be noisy (set --threads to the free cores)")
        rows = []
        for name in args.sections:
            rows += SECTIONS[name](args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    dtype = str(args.dtype).removeprefix("torch.")
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(), cpu=cpu_name(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_count=os.cpu_count(), dtype=dtype,
                threads=args.threads, load_average_at_start=load, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                args={**vars(args), "dtype": dtype})
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
