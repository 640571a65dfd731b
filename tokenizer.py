"""Byte-level BPE tokenizer for SmolLM2 and Qwen2/Qwen3 checkpoints, built on tiktoken.

`load_tokenizer(dir)` reads a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) and
gives the same ids as HF's `tokenizers` library for the structures these models use:

- GPT-2's byte-level alphabet (`bytes_to_unicode`, from openai/gpt-2 `encoder.py`, reused by
  HF's ByteLevel pre-tokenizer and decoder): every vocab string spells a byte string;
- HF's BPE model applies its merges in list order; tiktoken merges the adjacent pair whose
  joined bytes have the lowest rank, so a token's rank is the position of the merge making it;
- the pre-tokenizer (HF ByteLevel / Digits / Split) becomes one tiktoken split regex;
- added tokens are cut out of the text before normalisation, as HF's AddedVocabulary does.

`gguf_tokenizer_files` rebuilds those two files from a GGUF file's `tokenizer.*` metadata
(key names and token types from llama.cpp's GGUF spec), so GGUF checkpoints load the same way.
"""
import json
import re
import unicodedata
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import regex  # tiktoken's own dependency; it understands \p{L} like tiktoken's Rust regex
import tiktoken

# HF ByteLevel(use_regex=true) splits with GPT-2's pattern (also tiktoken's r50k_base).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# HF Digits(individual_digits) then ByteLevel: each digit alone, GPT-2's pattern on the stretches
# between digits. In one regex a digit must also end a stretch: a space run may stop before it.
DIGITS_GPT2_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Qwen2's Split regex, needed only for GGUF files (they don't carry it); load_tokenizer reads
# the pattern from tokenizer.json.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# A system prompt spelled out inside a ChatML template's string literal (SmolLM2's has one).
DEFAULT_SYSTEM = re.compile(r"""['"]<\|im_start\|>system(?:\n|\\n)([^'"{}]+?)<\|im_end\|>""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: visible Latin-1 bytes stand for themselves, the other
    68 (controls, space, ...) for U+0100 onwards, in byte order."""
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in visible}
    table.update({b: chr(0x100 + i) for i, b in enumerate(b for b in range(256) if b not in table)})
    return table


@dataclass(frozen=True, repr=False, eq=False)
class Tokenizer:
    """Text <-> ids for one vocabulary; build it with load_tokenizer()."""

    enc: tiktoken.Encoding  # split regex + BPE over ranks
    split: regex.Pattern  # the same split regex, for the rare path in _encode_text
    id_of_rank: list[int]
    missing_bytes: bytes  # byte values that have no token of their own
    token_bytes: dict[int, bytes]
    added: dict[str, int]  # added tokens, special or not
    special: frozenset[str]
    nfc: bool
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    system_prompt: str | None  # what the chat template adds when a chat has no system message

    def encode(self, text: str, allowed_special: str | Collection[str] = ()) -> list[int]:
        """Ids for `text`. Special-token strings stay plain text unless named in allowed_special
        ("all" for every one); non-special added tokens always match, as in HF."""
        allowed = self.special if allowed_special == "all" else frozenset(allowed_special)
        if not allowed <= self.special:
            raise ValueError(f"not special tokens of this vocabulary: {sorted(allowed - self.special)}")
        cut = sorted((t for t in self.added if t in allowed or t not in self.special), key=len, reverse=True)
        # Longest first: the leftmost-longest match of HF's added-token search.
        parts = re.split("(" + "|".join(map(re.escape, cut)) + ")", text) if cut else [text]
        ids = []
        for i, part in enumerate(parts):  # odd parts are the added tokens re.split kept
            ids += [self.added[part]] if i % 2 else self._encode_text(part)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """BPE ids for text that holds no added token: normalise, split, merge."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        data = text.encode("utf-8")
        if len(data.translate(None, self.missing_bytes)) == len(data):
            ranks = self.enc.encode_ordinary(text)
        else:
            # HF's BPE (no unk_token, no byte_fallback) drops characters it has no token for,
            # then merges across the gap; tiktoken would panic. So split here and drop the bytes
            # from each piece, as tiktoken's own _encode_only_native_bpe splits in Python.
            pieces = (p.encode("utf-8").translate(None, self.missing_bytes) for p in self.split.findall(text))
            ranks = [r for piece in pieces if piece for r in self.enc._encode_single_piece(piece)]
        return [self.id_of_rank[r] for r in ranks]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes behind `ids`. A character's bytes may span tokens, so when streaming,
        keep the bytes and decode once a character is complete."""
        return b"".join(self.token_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: eos and, for chat models, <|im_end|>."""
        ids = (self.eos_id, self.added.get("<|im_end|>"))
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """ChatML ids: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
        `<|im_start|>assistant\\n`. Contents are plain text: only the markers are special ids
        (a KeyError names the marker a vocabulary lacks)."""
        if self.system_prompt and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        ids = [i for m in messages for i in self.encode_message(m)]
        if add_generation_prompt:
            ids += [self.added["<|im_start|>"], *self.encode("assistant\n")]
        return ids

    def encode_message(self, message: dict[str, str]) -> list[int]:
        """One ChatML message: `<|im_start|>{role}\n{content}<|im_end|>\n`, the content as plain text."""
        text = f"{message['role']}\n{message['content']}"
        return [self.added["<|im_start|>"], *self.encode(text), self.added["<|im_end|>"], *self.encode("\n")]


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The Tokenizer of a checkpoint dir holding HF tokenizer.json and tokenizer_config.json."""
    path = Path(ckpt_dir) / "tokenizer.json"
    tj, config = _read_json(path), _read_json(path.with_name("tokenizer_config.json"))
    _check_supported(tj, path)
    pattern, model = _split_pattern(tj, path), tj["model"]
    ranks, id_of_rank = _mergeable_ranks(model)
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    token_bytes = {i: bytes(char_byte[c] for c in tok) for tok, i in model["vocab"].items()}
    token_bytes.update({i: tok.encode("utf-8") for tok, i in added.items()})
    ids = {**model["vocab"], **added}
    system = DEFAULT_SYSTEM.search(config.get("chat_template") or "")
    return Tokenizer(
        enc=tiktoken.Encoding(str(path.parent), pat_str=pattern, mergeable_ranks=ranks, special_tokens={}),
        split=regex.compile(pattern),
        id_of_rank=id_of_rank,
        missing_bytes=bytes(b for b in range(256) if bytes([b]) not in ranks),
        token_bytes=token_bytes,
        added=added,
        special=frozenset(t["content"] for t in tj.get("added_tokens", []) if t["special"]),
        nfc=tj.get("normalizer") is not None,
        vocab_size=max(token_bytes) + 1,
        bos_id=ids.get(_token_name(config.get("bos_token"))),
        eos_id=ids.get(_token_name(config.get("eos_token"))),
        system_prompt=system[1] if system else None,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # a missing file raises FileNotFoundError naming it
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_name(token: str | dict | None) -> str | None:
    """tokenizer_config writes a token as its string or as an AddedToken dict."""
    return token["content"] if isinstance(token, dict) else token


def _check_supported(tj: dict, path: Path) -> None:
    """Reject what this file can't reproduce: anything but plain byte-level BPE, NFC and
    added tokens without lstrip/rstrip/single_word (the pre_tokenizer: see _split_pattern)."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type {model.get('type')!r} is not supported, only 'BPE'")
    for key in ("dropout", "unk_token", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: model.{key}={model[key]!r} is not supported")
    if tj.get("normalizer") not in (None, {"type": "NFC"}):
        raise ValueError(f"{path}: normalizer {json.dumps(tj['normalizer'])} is not supported, only NFC")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: decoder {json.dumps(tj.get('decoder'))} is not supported, only ByteLevel")
    for t in tj.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise ValueError(f"{path}: added token {t['content']!r}: lstrip/rstrip/single_word are not supported")


def _mergeable_ranks(model: dict) -> tuple[dict[bytes, int], list[int]]:
    """tiktoken ranks (single bytes first, then each merge's result in merge order) and the
    vocab id of each rank. Ids often equal ranks plus an offset, but nothing requires it."""
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab, ranks, id_of_rank = model["vocab"], {}, []
    singles = sorted((tok for tok in vocab if len(tok) == 1 and tok in char_byte), key=vocab.get)
    merged = ((left + right) for left, right in (m.split(" ") if isinstance(m, str) else m for m in model["merges"]))
    for tok in (*singles, *merged):
        key = bytes(char_byte[c] for c in tok)
        if key not in ranks:  # a token made by two merges keeps the earlier one
            ranks[key] = len(id_of_rank)
            id_of_rank.append(vocab[tok])
    return ranks, id_of_rank


def _split_pattern(tj: dict, path: Path) -> str:
    """One regex doing what the pre_tokenizer does, for the structures GPT-2, SmolLM2 and Qwen2/3 use."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space", True):
        first, use_regex = steps[0], steps[-1].get("use_regex", True)  # HF's default: true
        if kinds == ["ByteLevel"] and use_regex:
            return GPT2_SPLIT
        if kinds == ["Digits", "ByteLevel"] and first.get("individual_digits") and use_regex:
            return DIGITS_GPT2_SPLIT
        if (kinds == ["Split", "ByteLevel"] and not use_regex and "Regex" in first.get("pattern", {})
                and first.get("behavior") == "Isolated" and not first.get("invert")):
            return first["pattern"]["Regex"]
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(pre)} is not supported")


def _byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": use_regex}


def _hf_sections(pre: str | None) -> dict:
    """The normalizer ... decoder sections of the HF tokenizer.json that llama.cpp names `pre`."""
    if pre == "smollm":
        digits = {"type": "Digits", "individual_digits": True}
        return {"normalizer": None,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, _byte_level(False, True, True)]},
                "post_processor": _byte_level(True, False, True),
                "decoder": _byte_level(True, True, True)}
    if pre == "qwen2":
        split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
        return {"normalizer": {"type": "NFC"},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, _byte_level(False, False, False)]},
                "post_processor": _byte_level(False, False, False),
                "decoder": _byte_level(False, False, False)}
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported, only 'smollm' and 'qwen2'")


def gguf_tokenizer_files(fields: dict) -> tuple[dict, dict]:
    """HF (tokenizer.json, tokenizer_config.json) dicts from GGUF `tokenizer.*` metadata given as
    plain Python values (gguf's GGUFReader: reader.fields[key].contents())."""
    if fields["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={fields['tokenizer.ggml.model']!r} is not supported, only 'gpt2'")
    tokens, sections = fields["tokenizer.ggml.tokens"], _hf_sections(fields.get("tokenizer.ggml.pre"))
    # GGUF token types: 3 = control (HF special added token), 4 = user-defined (added, not special).
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == 3}
             for i, (tok, kind) in enumerate(zip(tokens, fields["tokenizer.ggml.token_type"])) if kind in (3, 4)]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": list(fields["tokenizer.ggml.merges"])}
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, **sections, "model": model}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "chat_template": fields.get("tokenizer.chat_template")}
    for gguf_name, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        if (i := fields.get(f"tokenizer.ggml.{gguf_name}_token_id")) is not None:
            config[f"{name}_token"] = tokens[i]
    return tokenizer_json, config
