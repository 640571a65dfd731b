"""Makes the tokenizer test fixtures with Hugging Face `tokenizers`, the reference tokenizer.py matches.

deltamem never needs `tokenizers` or `jinja2`; only this script does:

    python3 -m venv --system-site-packages /work/venv-tok
    /work/venv-tok/bin/pip install tokenizers jinja2
    /work/venv-tok/bin/python tests/make_tokenizer_fixtures.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf]

It writes, under tests/fixtures/:
  tok_smollm/  a tiny vocab trained like SmolLM2's: Digits + ByteLevel, the 21 byte values
               SmolLM2 has no token for left out, SmolLM2's chat template (default system prompt);
  tok_qwen/    a tiny vocab trained like Qwen2/Qwen3's: NFC, Split(regex) + ByteLevel, specials
               after the vocab, <think> as a non-special added token, a Qwen3-like template.
               Its ids are shuffled, so ids are not merge ranks (tokenizer.py must map them);
  tok_gpt2/    a tiny vocab trained with GPT-2's pre-tokenizer (ByteLevel alone: digit runs
               stay together), ChatML specials and the Qwen-like template;
  smollm2_real_cases.json  the same cases under SmolLM2-135M-Instruct's real vocab, built from the
               GGUF by tokenizer.gguf_tokenizer_files (skipped when no GGUF is found).
Each cases.json: {"encode": [{"text", "ids", "ids_special", "roundtrip"}], "chat": [{"messages",
"add_generation_prompt", "ids"}]}. "ids" treat special-token strings as text (HF's
encode_special_tokens=True), "ids_special" as the special tokens; "roundtrip" says whether HF's
decode gives the text back; chat "ids" are HF's ids for the jinja2-rendered template.
"""
import argparse
import json
import random
import sys
import unicodedata
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))
import tokenizer  # noqa: E402  (gguf_tokenizer_files, for the real vocab)

# Qwen2/Qwen3 tokenizer.json's Split regex.
QWEN_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Byte values SmolLM2-135M's vocab has no token for (6 controls, 2 lead bytes of U+40000-U+BFFFF,
# 13 never valid in UTF-8).
SMOLLM2_MISSING_BYTES = [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)]
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CAFE = "Café naïve résumé façade Ångström"
STRINGS = [
    "", " ", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it.", "SHOUTING 'S 'LL 'Re",
    "def add(a, b):\n    return a + b\n", "class Foo:\n\tdef bar(self):\n\t\tpass\n",
    "    indented four\n        eight", "if (x > 0) { y = x * 2; } // comment",
    "for i in range(10):\n    print(i ** 2)  # squares",
    "3.14159", "1234567890", "Call 555-0199 or +1 (800) 123-4567.", "2024-11-22T01:38:00Z",
    "x1y22z333", "v2.0.1-rc3", "1,000,000 and 12345678901234567890", "a  1  b\t 2",
    "a  b   c    d", "trailing spaces   ", "\t\ttabs\tand\nnewlines\r\nmixed", "\n\n\n",
    "line one\n\n\nline two", "  leading", "a \t \n b", "x\u00a0y\u3000z\u2003w", "\x0b\x0c\x1c\x1e\x1f\x85 end",
    "你好，世界！这是一个测试。", "日本語のテキストとカタカナ", "東京は晴れ、気温は25度です。", "한국어 텍스트",
    "Россия и Україна", "مرحبا بالعالم", "ελληνικά γράμματα",
    "Emoji: 😀👍🏽🇺🇸 ❤️", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag and 🧑🏾‍💻",
    CAFE, unicodedata.normalize("NFD", CAFE), "e\u0301", "ﬁ ligature ½ ²",
    "<|im_start|>user\nhi<|im_end|>", "text <|endoftext|> more", "<|im_end|><|im_end|>", "<|im_start|",
    "<think>reasoning</think>answer", "<|endoftext|>",
    "a\x04b", "!\x04!", " \x04\x06", "x\U00050000y", "(\x13\x14)", "\x1d\n", "\x04abc", "\x16\x16", "\x00\x7f NUL and DEL",
    "https://example.com/path?q=1&r=2#frag", "email@example.com", "C:\\Users\\name\\file.txt",
    "$100.00 — 50% off!!!", "...---...", "«quotes» “curly” ‘single’",
    "supercalifragilisticexpialidocious", "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]
CHATS = [
    ([{"role": "user", "content": "Hi there!"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}], True),
    ([{"role": "user", "content": "def f(x):\n    return x  # code\n"}], False),
    ([{"role": "assistant", "content": "I spoke first."}, {"role": "user", "content": "你好 😀"}], True),
    ([], True),
]


def training_corpus(rng: random.Random) -> list[str]:
    """Varied lines (English, code, numbers, CJK, emoji, accents, odd spacing) to train on."""
    words = ("the of and to in is that it for was on are with as be at by this have from or one had not but "
             "what all were when we there can an your which their said if do will each about how up out them "
             "then she many some so these would other into has more her two like him see time could no make "
             "than first been its who now people my made over did down only way find use may water long little "
             "very after words called just where most know return print self import class value list data").split()
    extras = ["你好，世界！", "这是一个测试。", "我们今天去公园散步。", "日本語のテキスト", "東京は晴れです。",
              "カタカナとひらがな", "한국어 텍스트입니다", "Россия", "ελληνικά", "مرحبا", "😀", "👍🏽", "🇺🇸",
              "❤️", "👨‍👩‍👧‍👦", "🚀", "café", "naïve", "résumé", "Ångström", "Zoë", "über", "señor", "brûlée"]
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    words += ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    words += ["".join(chr(rng.randint(0x4E00, 0x4FFF)) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    lines = []
    for _ in range(6000):
        n = rng.randint(3, 14)
        line = " ".join(rng.choice(words + extras[:rng.randint(0, len(extras))]) for _ in range(n))
        kind = rng.randrange(6)
        if kind == 0:
            line = line.capitalize() + rng.choice([".", "!", "?", ",", ";", "...", ":"])
        elif kind == 1:
            line = " " * rng.choice([0, 2, 4, 8]) + f"def {line.split()[0]}(x, y={rng.randint(0, 99)}):\n    return x + y"
        elif kind == 2:
            line = f"{line} {rng.randint(0, 10 ** rng.randint(1, 12))} {rng.random():.4f} {rng.randint(1990, 2030)}-0{rng.randint(1, 9)}"
        elif kind == 3:
            line = unicodedata.normalize(rng.choice(["NFC", "NFD"]), line)
        elif kind == 4:
            line = line.replace(" ", rng.choice(["  ", "\t", " \n", "\n\n"]))
        lines.append(line)
    return lines


def train(tok: Tokenizer, alphabet: list[str], specials: list[str], vocab_size: int) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(random.Random(0)), trainer=trainer)
    return tok


def smollm_style() -> Tokenizer:
    """SmolLM2's structure: specials at ids 0..2, no normalizer, Digits + ByteLevel, 21 bytes missing."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    char_of = tokenizer.bytes_to_unicode()
    alphabet = [char_of[b] for b in range(256) if b not in SMOLLM2_MISSING_BYTES]
    return train(tok, alphabet, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=1800)


def qwen_style() -> Tokenizer:
    """Qwen2/3's structure: NFC, Split(regex) + ByteLevel, specials after the vocab, shuffled ids."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = train(tok, pre_tokenizers.ByteLevel.alphabet(), [], vocab_size=1800)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    new_ids = list(range(len(vocab)))
    random.Random(1).shuffle(new_ids)
    data["model"]["vocab"] = {t: new_ids[i] for t, i in vocab.items()}
    data["decoder"] = data["post_processor"]  # decoders.ByteLevel() ignores its arguments
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return tok


def gpt2_style() -> Tokenizer:
    """GPT-2's structure: ByteLevel alone (its own regex), all 256 bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return train(tok, pre_tokenizers.ByteLevel.alphabet(), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=1000)


def cases(tok: Tokenizer, template: str) -> dict:
    """HF's ids for STRINGS (special-token strings as text, then as specials) and for CHATS."""
    encode = []
    for text in STRINGS:
        tok.encode_special_tokens = True
        ids = tok.encode(text, add_special_tokens=False).ids
        tok.encode_special_tokens = False
        ids_special = tok.encode(text, add_special_tokens=False).ids
        roundtrip = tok.decode(ids, skip_special_tokens=False) == text
        encode.append({"text": text, "ids": ids, "ids_special": ids_special, "roundtrip": roundtrip})
    render = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template).render
    chat = [{"messages": messages, "add_generation_prompt": gen,
             "ids": tok.encode(render(messages=messages, add_generation_prompt=gen), add_special_tokens=False).ids}
            for messages, gen in CHATS]
    return {"encode": encode, "chat": chat}


def write_vocab(name: str, tok: Tokenizer, config: dict) -> None:
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_cases(out / "cases.json", cases(tok, config["chat_template"]))


def write_cases(path: Path, data: dict) -> None:
    """One case per line: small diffs when a fixture changes."""
    lines = [json.dumps(c, ensure_ascii=False) for c in data["encode"]]
    chats = [json.dumps(c, ensure_ascii=False) for c in data["chat"]]
    path.write_text('{"encode": [\n' + ",\n".join(lines) + '\n], "chat": [\n' + ",\n".join(chats) + "\n]}\n", encoding="utf-8")
    print("wrote", path.relative_to(ROOT))


def find_gguf(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    try:
        from load_hf_weights import fetch_smollm2_gguf
    except ImportError:
        return None
    return fetch_smollm2_gguf()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF file (default: load_hf_weights.fetch_smollm2_gguf())")
    args = parser.parse_args()
    write_vocab("tok_smollm", smollm_style(), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "chat_template": SMOLLM2_TEMPLATE})
    write_vocab("tok_qwen", qwen_style(), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE})
    write_vocab("tok_gpt2", gpt2_style(), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "chat_template": QWEN_TEMPLATE})
    gguf = find_gguf(args.gguf)
    if gguf is None:
        print("no SmolLM2 GGUF found: smollm2_real_cases.json left as it is")
        return
    from gguf import GGUFReader
    fields = {k: f.contents() for k, f in GGUFReader(gguf).fields.items() if k.startswith("tokenizer.")}
    tokenizer_json, config = tokenizer.gguf_tokenizer_files(fields)
    real = Tokenizer.from_str(json.dumps(tokenizer_json))
    write_cases(FIXTURES / "smollm2_real_cases.json", cases(real, config["chat_template"]))


if __name__ == "__main__":
    main()
