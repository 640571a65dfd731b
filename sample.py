"""Chat with a converted checkpoint: one prompt in, the answer streamed out.

    python sample.py --prompt "What is the capital of France?"
    python sample.py --ckpt checkpoints/qwen3-4b --prompt "Hi" --temperature 0.7 --top-p 0.9

Without --ckpt it uses the embedded SmolLM2-135M-Instruct default (converted on first use, see load_hf_weights.py).
"""
import argparse
import codecs
import sys

import torch

from load_hf_weights import default_checkpoint
from model import load_model
from tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv=None):
    p = argparse.ArgumentParser(description="Stream a chat answer from a deltamem checkpoint.")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--ckpt", help="converted checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    try:
        ckpt = args.ckpt or default_checkpoint()
        model = load_model(ckpt, device=device, dtype=dtype)
        tok = load_tokenizer(ckpt)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    generator = torch.Generator(device).manual_seed(args.seed)
    idx = torch.tensor([tok.encode_chat([{"role": "user", "content": args.prompt}])], device=device)  # (1, T)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span several tokens
    for tok_id, _ in model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                 stop_ids=tok.stop_ids, generator=generator):
        if tok_id.item() in tok.stop_ids:
            break
        print(utf8.decode(tok.decode_bytes([tok_id.item()])), end="", flush=True)
    print(utf8.decode(b"", final=True))


if __name__ == "__main__":
    main()
