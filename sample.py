"""Chat with a converted checkpoint, optionally with a δ-mem state that keeps what was said (deltamem.py).

    python sample.py --prompt "What is the capital of France?"
    python sample.py --ckpt checkpoints/qwen3-4b --prompt "Hi" --temperature 0.7 --top-p 0.9
    python sample.py --adapter runs/tsw/adapter.safetensors --history facts.json --state me.safetensors
    python sample.py --adapter runs/tsw/adapter.safetensors --state me.safetensors --prompt "What is my ...?"
    python sample.py --adapter runs/tsw/adapter.safetensors --state me.safetensors --chat

Without --ckpt it uses the embedded SmolLM2-135M-Instruct default (converted on first use, see load_hf_weights.py).

The memory is one file, --state: read at the start if it exists, written (atomically) whenever the state changes.
How text gets into the state: messages are written the way a training write pass writes a history
(data.write_messages: their ChatML ids, one SSW segment per message, no system prompt, in forwards of their own,
cut into windows of at most --window tokens at message boundaries). A reply is generated with writes off, reading
the state as it was before the turn; then the finished turn (the user message and the reply) is written, once,
after the turns still in view, as a write pass over the whole chat would write it.
"""
import argparse
import codecs
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from data import write_messages
from deltamem import zero_state
from deltamem_io import check_writable, load_adapter, load_state, save_state
from load_hf_weights import checkpoint_dir
from model import load_model
from runtime import DTYPES, HelpFormatter, configure
from tokenizer import load_tokenizer

ROLES = ("system", "user", "assistant")
COMMANDS = {
    "/save": "/save [FILE]: save the state (default: the --state file)",
    "/load": "/load [FILE]: replace the state with a saved one (default: the --state file)",
    "/reset": "/reset: empty the state (the visible context stays)",
    "/forget-context": "/forget-context: drop the visible context (the state stays)",
}


@dataclass
class Memory:
    """One conversation's δ-mem state, with what the state file's metadata records about it."""
    state: list  # one (1, n, r, r) tensor per layer
    tokens: int  # tokens written into it so far
    created: str  # when it was started (UTC, ISO 8601)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Stream chat answers from a deltamem checkpoint, with or without a "
                                            "δ-mem state.", epilog="chat commands: " + "; ".join(COMMANDS.values()),
                                formatter_class=HelpFormatter)
    p.add_argument("--prompt", help="the user message (one turn); leave out with --chat, or to only write --history")
    p.add_argument("--ckpt", help="converted checkpoint directory; leave out for the embedded SmolLM2-135M-Instruct")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    g.add_argument("--top-p", type=float, default=None, help="sample from the smallest set holding probability p")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; leave out for cuda if available, else cpu")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bf16 where this device runs it fast (measured on CPU), else fp32")
    g.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    m = p.add_argument_group("δ-mem memory")
    m.add_argument("--adapter", help="δ-mem adapter file (train.py's adapter.safetensors); without it, no state")
    m.add_argument("--no-mem", action="store_true", help="answer with the frozen backbone alone (no adapter, no "
                                                         "state), for a side-by-side comparison")
    m.add_argument("--history", help="written into the state before the prompt, never into the prompt: a .json "
                                     "file holding a list of {\"role\", \"content\"} messages, or any other file as "
                                     "plain text (one user message)")
    m.add_argument("--window", type=int, default=None, help="write at most this many tokens per forward (default: "
                                                            "the model's max_position_embeddings)")
    m.add_argument("--state", metavar="FILE", help="the memory file (safetensors with metadata): loaded if it exists, "
                                                   "saved whenever the state changes")
    m.add_argument("--chat", action="store_true", help="interactive: one user message per stdin line (a terminal or "
                                                       "a script), every turn written to the state; see the commands")
    args = p.parse_args(argv)
    if args.no_mem and args.state:
        p.error("--no-mem has no state: leave out --state")
    for flag in ("history", "state"):
        if getattr(args, flag) and not args.adapter and not args.no_mem:
            p.error(f"--{flag} needs --adapter (the δ-mem weights that write and read the state)")
    if args.chat and args.prompt is not None:
        p.error("--prompt is one turn, --chat reads its turns from stdin: give one of them")
    if not (args.prompt is not None or args.chat or (args.history and args.state)):
        p.error("nothing to do: give --prompt, --chat, or --history with --state")
    for flag, ok, need in (("max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
                           ("window", args.window is None or args.window >= 1, "at least 1"),
                           ("threads", args.threads >= 1, "at least 1"),
                           ("temperature", args.temperature >= 0, "0 (greedy) or more"),
                           ("top_k", args.top_k is None or args.top_k >= 1, "at least 1"),
                           ("top_p", args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            p.error(f"--{flag.replace('_', '-')} must be {need}, got {getattr(args, flag)}")
    return args


def check_text(text: str, where: str) -> str:
    """Text must be valid Unicode (a non-UTF-8 command-line argument arrives with lone surrogates in it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at character {e.start})") from None
    return text


def read_history(path) -> list[dict]:
    """--history: a .json file holding a list of chat messages, or any other file as plain text (one user message)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")  # a missing file is an OSError naming it
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() != ".json":
        messages = [{"role": "user", "content": text}] if text.strip() else []
    else:
        try:
            messages = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(messages, list):
            raise ValueError(f"{path}: expected a JSON list of chat messages, got {type(messages).__name__}")
        for i, msg in enumerate(messages):
            if not (isinstance(msg, dict) and set(msg) == {"role", "content"} and msg["role"] in ROLES
                    and isinstance(msg["content"], str)):
                raise ValueError(f'{path}: message {i}: expected {{"role": one of {", ".join(ROLES)}, "content": '
                                 f'a string}}, got {json.dumps(msg)[:80]}')
            check_text(msg["content"], f"{path}: message {i}")
    if not messages:
        raise ValueError(f"{path}: the history is empty")
    return messages


def remember(model, tok, mem: Memory, messages: list[dict], window: int, context: list[dict] = ()
             ) -> tuple[Memory, int]:
    """Write chat messages, read after the visible `context`, into the memory (data.write_messages); returns it and
    the number of windows used."""
    state, tokens, n_windows = write_messages(model, tok, mem.state, messages, window, context)
    return Memory(state, mem.tokens + tokens, mem.created), n_windows


@torch.no_grad()
def reply(model, tok, messages: list[dict], mem: Memory | None, args, generator, out) -> str:
    """Stream the assistant's reply to `messages` to `out` and return it. Writes are off: every token reads the
    state from before the turn, and nothing the reply processes is written (the caller writes the finished turn)."""
    idx = torch.tensor([tok.encode_chat(messages)], device=model.lm_head.weight.device)  # (1, T)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span several tokens
    ids = []
    for tok_id, _ in model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                    stop_ids=tok.stop_ids, generator=generator, state=mem and mem.state, write=False):
        if tok_id.item() in tok.stop_ids:
            break
        ids.append(tok_id.item())
        print(utf8.decode(tok.decode_bytes(ids[-1:])), end="", flush=True, file=out)
    print(utf8.decode(b"", final=True), file=out, flush=True)
    return tok.decode(ids)


def fit_context(tok, context: list[dict], user: dict, budget: int, err) -> list[dict]:
    """The visible context, its oldest turns dropped until it and the new message fit `budget` tokens."""
    dropped = 0
    while context and len(tok.encode_chat(context + [user])) > budget:
        context, dropped = context[2:], dropped + 1
    if dropped:
        print(f"(dropped the {dropped} oldest turn(s) from the visible context to fit the model's context; "
              f"the state keeps them)", file=err)
    if (n := len(tok.encode_chat([user]))) > budget:
        raise ValueError(f"the message is {n} tokens with the chat template, more than the {budget} that fit "
                         f"beside --max-new-tokens in the model's context")
    return context


def turn(model, tok, mem: Memory | None, context: list[dict], text: str, args, generator, out, err):
    """One user message: reply from the visible context (oldest turns dropped if it no longer fits), then write the
    finished turn into the state, read after that context as a training write pass reads a history. Returns the new
    memory and visible context."""
    user = {"role": "user", "content": check_text(text, "the message")}
    context = fit_context(tok, context, user, model.config.max_position_embeddings - args.max_new_tokens, err)
    context = context + [user, {"role": "assistant", "content": reply(model, tok, context + [user], mem, args,
                                                                      generator, out)}]
    if mem is not None:
        mem, _ = remember(model, tok, mem, context[-2:], args.window, context[:-2])
    return mem, context


def new_memory(model) -> Memory:
    return Memory(zero_state(model), 0, datetime.now(timezone.utc).isoformat(timespec="seconds"))


def load_memory(path, model) -> Memory:
    state, meta = load_state(path, model)
    if state[0].shape[0] != 1:
        raise ValueError(f"{path}: holds a batch of {state[0].shape[0]} states; sample.py uses one")
    try:
        tokens = int(meta.get("tokens_written", "0"))
    except ValueError:
        raise ValueError(f"{path}: tokens_written {meta['tokens_written']!r} is not a number") from None
    return Memory(state, tokens, meta.get("created", ""))


def save_memory(path, mem: Memory, model, args):
    save_state(path, mem.state, model, {"tokens_written": str(mem.tokens), "created": mem.created,
                                        "adapter": str(args.adapter), "ckpt": str(args.ckpt)})


def command(line: str, model, mem: Memory | None, context: list, args, err) -> tuple[Memory | None, list]:
    """Run one chat command; returns the (possibly new) memory and visible context."""
    name, _, path = line.partition(" ")
    path = path.strip() or args.state
    if name not in COMMANDS:
        raise ValueError(f"{name}: unknown command (commands: {', '.join(COMMANDS)})")
    if name == "/forget-context":
        print(f"(visible context dropped: {len(context) // 2} turn(s); the state is kept)", file=err)
        return mem, []
    if mem is None:
        raise ValueError(f"{name}: there is no state without --adapter")
    if name == "/reset":
        print("(state emptied)", file=err)
        return new_memory(model), context
    if not path:
        raise ValueError(f"{name}: give a file (or start with --state FILE)")
    if name == "/save":
        save_memory(path, mem, model, args)
        print(f"(saved the state to {path}: {mem.tokens} tokens written)", file=err)
        return mem, context
    mem = load_memory(path, model)
    print(f"(loaded {path}: {mem.tokens} tokens written since {mem.created})", file=err)
    return mem, context


def chat(model, tok, mem: Memory | None, lines, args, generator, out=sys.stdout, err=sys.stderr) -> Memory | None:
    """One user message per line of `lines` (bytes); a line starting with "/" is a command (COMMANDS).

    The visible context is a list of messages, encoded again for every turn: generate() builds its KV cache from it
    (so there is no cache to keep between turns), and /forget-context empties it. The state is separate: each
    finished turn is written into it once (write_messages), and with --state saved after every change. Errors in a
    line (bad UTF-8, an unknown command, a file that won't load) are reported and the session goes on.
    """
    context = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            print(f"error: stdin line {n}: not UTF-8 ({e.reason} at byte {e.start}); line skipped", file=err)
            continue
        if not line:
            continue
        try:
            if line.startswith("/"):
                mem, context = command(line, model, mem, context, args, err)
            else:
                mem, context = turn(model, tok, mem, context, line, args, generator, out, err)
            if args.state and mem is not None:
                save_memory(args.state, mem, model, args)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=err)
    return mem


def stdin_lines():
    """Lines of stdin as bytes; on a terminal, with a short help first and a prompt before each line."""
    tty = sys.stdin.isatty()
    if tty:
        print(f"one message per line; {'; '.join(COMMANDS.values())}; Ctrl-D ends", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", flush=True, file=sys.stderr)
        if not (line := sys.stdin.buffer.readline()):
            return
        yield line


def load(args):
    """Backbone (+ adapter unless --no-mem) and tokenizer."""
    device, dtype = configure(args.device, args.dtype, args.threads)
    args.ckpt = str(checkpoint_dir(args.ckpt))  # recorded in saved states
    model = load_model(args.ckpt, device=device, dtype=dtype)
    if args.adapter and not args.no_mem:
        load_adapter(model, args.adapter)
    return model, load_tokenizer(args.ckpt)


def start_memory(model, tok, args, err) -> Memory | None:
    """The state to start from: the --state file if it exists, else empty; then --history written into it (and
    saved)."""
    if not args.adapter or args.no_mem:
        if args.no_mem and (args.adapter or args.history):
            print("(--no-mem: the frozen backbone answers; --adapter and --history are not used)", file=err)
        return None
    mem = load_memory(args.state, model) if args.state and Path(args.state).exists() else new_memory(model)
    if args.history:
        messages = read_history(args.history)
        mem, n_windows = remember(model, tok, mem, messages, args.window)
        how = (f"in {n_windows} windows of at most {args.window} tokens, attention not spanning windows"
               if n_windows > 1 else "in one forward")
        print(f"(wrote {args.history} into the state: {len(messages)} message(s), {mem.tokens} tokens written in "
              f"all, {how})", file=err)
        if args.state:
            save_memory(args.state, mem, model, args)
    return mem


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.state:
            check_writable(args.state)  # before any work
        model, tok = load(args)
        args.window = args.window or model.config.max_position_embeddings
        mem = start_memory(model, tok, args, sys.stderr)
        generator = torch.Generator(model.lm_head.weight.device).manual_seed(args.seed)
        if args.chat:
            chat(model, tok, mem, stdin_lines(), args, generator)
        elif args.prompt is not None:
            mem, _ = turn(model, tok, mem, [], check_text(args.prompt, "--prompt"), args, generator, sys.stdout,
                          sys.stderr)
            if args.state:
                save_memory(args.state, mem, model, args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted" + (f"; {args.state} holds the state as of the last finished turn" if args.state else ""))


if __name__ == "__main__":
    main()
