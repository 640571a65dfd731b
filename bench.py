"""Benchmarks for deltamem on CPU: prints a table and writes every measurement to a JSON file.

Sections (each a function `bench_<name>(args) -> list[dict]`, one dict per table row; add new ones to SECTIONS):
  scan        the delta-rule scan, chunked vs per-token loop (deltamem.delta_rule_chunked / delta_rule_loop),
              forward and forward+backward, fp32, r = 8, over B × n (state heads) × T.
  chunk_size  the chunked scan alone at several chunk sizes (how the default chunk size was chosen).
  backbone    model.py vs transformers on the same converted weights (fp32): prefill time and greedy decode speed
              (transformers is optional; without it, its columns are empty).
  prefill     δ-mem (TSW, writing every token) vs the frozen backbone: prefill time, fp32 and bf16 autocast.
  decode      the same, per-token latency of decoding after a prompt (the state read and written every token).
  memory      bytes of the δ-mem state vs the KV cache holding the same history (computed, not timed).
  train       tokens/s of train.py's default episode batch (write + read pass, backward): bf16 with the chunked
              scan vs the loop, bf16 vs fp32, and the process's peak RSS.
  compile     torch.compile on the δ-mem model vs eager prefill (not in the default sections: compiling is slow).

Timing: each case runs once untimed (warm-up), then in rounds that alternate the compared sides, so that load from
other processes hits both alike; we report medians. Set --threads to the cores that are actually free: extra
threads on a busy machine give 10-100x outliers. Flush-to-zero is on (denormals can stall a step for seconds).

    python bench.py                        # every section but compile (the loop's fwd+bwd at T = 8192 is slow)
    python bench.py --quick                # tiny sizes, a few seconds (used by tests/test_bench.py)
    python bench.py --sections chunk_size --chunk-sizes 4,8,16,32,64
"""
import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from data import episodes, make_batch
from deltamem import DeltaMemConfig, attach, delta_rule_chunked, delta_rule_loop
from load_hf_weights import default_checkpoint
from model import KVCache, load_model


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
    ckpt = args.ckpt or default_checkpoint()
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
    """The backbone twice: frozen, and with a fresh TSW adapter attached (reads and writes cost the same at init)."""
    ckpt = args.ckpt or default_checkpoint()
    backbone, mem = load_model(ckpt), attach(load_model(ckpt), DeltaMemConfig(write="tsw"))
    return backbone, mem


def bench_prefill(args):
    """δ-mem prefill (writing the whole prompt) vs the frozen backbone, fp32 and bf16 autocast."""
    backbone, mem = memory_models(args)
    idx = torch.randint(0, backbone.config.vocab_size, (1, args.T_prefill), generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in ("float32", "bfloat16"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        with torch.inference_mode(), autocast:
            times = time_alternating({"backbone": lambda: backbone(idx), "deltamem": lambda: mem(idx)},
                                     args.reps, args.budget)
        b, m = (1e3 * statistics.median(times[s]) for s in ("backbone", "deltamem"))
        rows.append(dict(section="prefill", dtype=dtype, T=args.T_prefill, backbone_ms=round(b, 1),
                         deltamem_ms=round(m, 1), overhead=round(m / b, 3), rounds=len(times["backbone"])))
        print_row(rows[-1])
    return rows


def bench_decode(args):
    """Per-token decode latency after a prompt, δ-mem reading and writing every token vs the frozen backbone."""
    backbone, mem = memory_models(args)
    prompt = torch.randint(0, backbone.config.vocab_size, (1, args.T_decode), generator=torch.Generator().manual_seed(0))
    steps = args.decode

    def decode_ms(model):
        """Prefill (untimed), then `steps` single-token calls with the KV cache (and the state): ms per token."""
        cache = KVCache(model.config, 1, args.T_decode + steps, "cpu", torch.float32)
        logits, state = model(prompt, cache=cache)
        tok = logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = model(tok, state=state, cache=cache)
            tok = logits[:, -1:].argmax(-1)
        return 1e3 * (time.perf_counter() - t0) / steps

    times = {"backbone": [], "deltamem": []}
    with torch.inference_mode():
        decode_ms(backbone), decode_ms(mem)  # warm-up
        for _ in range(max(3, args.reps // 2)):
            for name, model in (("backbone", backbone), ("deltamem", mem)):
                times[name].append(decode_ms(model))
    b, m = (statistics.median(times[s]) for s in ("backbone", "deltamem"))
    row = dict(section="decode", prompt=args.T_decode, tokens=steps, backbone_ms_per_token=round(b, 2),
               deltamem_ms_per_token=round(m, 2), overhead=round(m / b, 3), rounds=len(times["backbone"]))
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
    """Training throughput of train.py's default episode shape: bf16 (the default) with the chunked scan vs the
    per-token loop, and bf16 vs fp32 (both chunked)."""
    import deltamem
    import train
    cfg = {dtype: train.TrainConfig(ckpt=args.ckpt, device="cpu", dtype=dtype) for dtype in ("bfloat16", "float32")}
    setups = {dtype: train.setup(c) for dtype, c in cfg.items()}  # dtype -> (model, tok, device, autocast)
    model, tok, device, _ = setups["bfloat16"]
    batch = make_batch(tok, episodes(cfg["bfloat16"].task(), "train", cfg["bfloat16"].batch_size, seed=0), device)
    n_tokens = int(batch["write_real"].sum() + batch["read_real"].sum())

    def step(dtype, scan):
        model, _, _, autocast = setups[dtype]
        chunked, deltamem.delta_rule_chunked = deltamem.delta_rule_chunked, scan
        try:
            with autocast():
                ce, beta_term, n, _, _ = train.episode_loss(model, batch, cfg[dtype])
            (ce / n + beta_term).backward()
        finally:
            deltamem.delta_rule_chunked = chunked
        model.zero_grad(set_to_none=True)

    sides = {"bf16": lambda: step("bfloat16", deltamem.delta_rule_chunked),
             "bf16_loop": lambda: step("bfloat16", deltamem.delta_rule_loop),
             "fp32": lambda: step("float32", deltamem.delta_rule_chunked)}
    raw = time_alternating(sides, args.reps, args.budget)
    times = {k: statistics.median(v) for k, v in raw.items()}
    row = dict(section="train", episodes=cfg["bfloat16"].batch_size, tokens=n_tokens,
               bf16_tok_s=round(n_tokens / times["bf16"]), bf16_loop_tok_s=round(n_tokens / times["bf16_loop"]),
               fp32_tok_s=round(n_tokens / times["fp32"]), speedup=round(times["bf16_loop"] / times["bf16"], 2),
               bf16_over_fp32=round(times["fp32"] / times["bf16"], 2),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               rounds=len(raw["bf16"]))
    print_row(row)
    return [row]


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
            "decode": bench_decode, "memory": bench_memory, "train": bench_train, "compile": bench_compile}


def print_row(row):
    """One table line; the header is printed whenever the section or its columns change."""
    cols = [c for c in row if c != "section"]
    if getattr(print_row, "cols", None) != (row["section"], cols):
        print_row.cols = (row["section"], cols)
        print(f"\n[{row['section']}]\n" + " ".join(f"{c:>10}" for c in cols))
    print(" ".join(f"{str(row[c]):>10}" for c in cols), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="scan,chunk_size,backbone,prefill,decode,memory,train",
                   help=f"comma-separated, from: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (seconds; for tests)")
    p.add_argument("--out", default="bench.json", help="JSON file for all rows and the run's settings")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads: the free cores (default: all cores of this process)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds per case (at most)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per case; fewer rounds (>= 3) above it")
    g = p.add_argument_group("sizes (comma-separated lists)")
    g.add_argument("--B", type=ints, default=[1, 4], help="batch sizes")
    g.add_argument("--n", type=ints, default=[1, 4], help="state heads per sequence (1; 4 for MSW)")
    g.add_argument("--T", type=ints, default=[512, 2048, 8192], help="sequence lengths")
    g.add_argument("--r", type=int, default=8, help="state rank")
    g.add_argument("--chunk-sizes", type=ints, default=[4, 8, 16, 32, 64], help="for the chunk_size section")
    g.add_argument("--ckpt", help="backbone section: converted checkpoint (default: the embedded SmolLM2-135M)")
    g.add_argument("--prefill", type=int, default=512, help="backbone section: prompt tokens timed for prefill")
    g.add_argument("--decode", type=int, default=64, help="backbone, decode sections: tokens decoded")
    g.add_argument("--T-prefill", type=int, default=2048, help="prefill, compile sections: prompt tokens")
    g.add_argument("--T-decode", type=int, default=1024, help="decode section: prompt tokens before decoding")
    args = p.parse_args(argv)
    if args.quick:
        args.B, args.n, args.T, args.chunk_sizes, args.reps, args.budget = [1, 2], [1, 4], [16, 100], [4, 16], 3, 1.0
        args.ckpt = args.ckpt or os.path.join(os.path.dirname(__file__), "tests", "fixtures", "hf_llama")
        args.prefill, args.decode, args.T_prefill, args.T_decode = 16, 4, 16, 16

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores, load average {load:.2f}")
    if load > 0.5:
        print("warning: other processes are using the CPU; timings will be noisy (set --threads to the free cores)")
    rows = []
    for name in args.sections.split(","):
        rows += SECTIONS[name](args)
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), threads=args.threads, load_average_at_start=load,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(args))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    main()
