"""Write a ``transformers`` CLIP tokenizer (the one diffusers' UnCLIPPipeline / karlo uses) as a ``clip-bpe/1`` file.

The tables come from the tokenizer folder of the pipeline (``tokenizer.json``, or ``vocab.json`` +
``merges.txt`` as karlo ships them), loaded by ``transformers.CLIPTokenizer`` (no download) and read from
its ``tokenizers`` backend: that is the object the pipeline tokenizes with, so what it does is what the file
must reproduce. Every part of the backend is checked against the structure this converter understands
(BPE with the ``</w>`` suffix; normalizer NFC, ``\\s+`` -> space, lowercase; pre-tokenizer CLIP split
pattern then byte-level; RoBERTa-style ``[bos] ids [eos]``); anything else is refused rather than written
as a file that tokenizes differently. The runtime side (the ``preprocess`` steps and
``special_tokens_match: "raw_text"``) is specified in ``dalle2_rt/runtime/tokenizer.py``.

After writing, the runtime tokenizer is loaded from the file and compared with ``CLIPTokenizer`` on
``PROBES`` (ids and the attention mask the pipeline derives); a mismatch fails the export.
"""
from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import version
from pathlib import Path

import numpy as np

from dalle2_rt.runtime import tokenizer as rt

FILE_NAME = "tokenizer.json"
PREPROCESS = ["nfc", "whitespace_collapse", "lower_chars"]  # tokenizers' NFC + Replace(\s+, " ") + Lowercase
SUFFIX = "</w>"

# Texts that exercise every step: case, contractions, punctuation runs, digits, accents, scripts, emoji,
# whitespace kinds, curly quotes and HTML entities (which transformers, unlike open_clip, keeps), final
# sigma, the special tokens as typed text, and truncation.
PROBES = [
    "a horse", "A photo of an astronaut riding a horse on the moon.",
    "it's they're we've I'm you'll he'd DON'T", "“curly” ‘quotes’ it’s",
    "&amp; &lt;b&gt; Café crème ﬁne ＷＩＤＥ", "ΟΔΟΣ İstanbul Straße 東京 서울 😀👍🏽",
    "tabs\tand\nnewlines  \u00a0nbsp\u3000ideo", "3.14159 1,000,000 #1 $5 ((())) ...",
    "a<|endoftext|>b <|startoftext|> <|ENDOFTEXT|> <<|endoftext|>", "", "word " * 100,
]


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte alphabet: ``table[b]`` is the one-character spelling of byte b (the ByteLevel table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)  # bytes with no printable spelling, in order, from U+0100
            extra += 1
    return [table[b] for b in range(256)]


class UnsupportedTokenizer(ValueError):
    """The tokenizer does something the ``clip-bpe/1`` runtime does not implement."""


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise UnsupportedTokenizer(f"CLIP tokenizer: {what}")


def _backend_spec(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    _expect(backend is not None, f"{type(tok).__name__} has no `tokenizers` backend (transformers >= 5 needed)")
    return json.loads(backend.to_str())


def _without_specials(pattern: str, specials: list[str]) -> str:
    """The Split pattern less its leading special-token alternatives.

    Real special tokens never reach the pattern (tokenizers cuts them out of the raw text first); what
    those alternatives still match is a special string that appears only after normalisation
    (``<|ENDOFTEXT|>`` lower-cased), and ByteLevel's own GPT-2 regex (``use_regex``) then re-splits that
    piece into ``<|``, ``endoftext``, ``|>`` — the pieces the remaining alternatives give directly. On every
    other piece of the CLIP pattern (a contraction, a letter run, one digit, a run of other symbols) the
    GPT-2 regex finds the piece itself, so the remaining pattern alone reproduces both splits.
    """
    left, stripped = pattern, set()
    while True:
        s = next((s for s in specials if left.startswith(re.escape(s) + "|")), None)
        if s is None:
            break
        left, stripped = left[len(re.escape(s)) + 1:], stripped | {s}
    _expect(len(stripped) >= 2, f"Split pattern {pattern!r} does not begin with the special tokens' alternatives")
    return left


def tables_and_entry(tok) -> tuple[dict, dict]:
    """(``clip-bpe/1`` object, manifest entry without file/sha256) of a transformers ``CLIPTokenizer``."""
    spec = _backend_spec(tok)
    model = spec["model"]
    _expect(model.get("type") == "BPE", f"model {model.get('type')!r}, expected BPE")
    _expect(model.get("end_of_word_suffix") == SUFFIX and not model.get("continuing_subword_prefix")
            and not model.get("dropout") and not model.get("byte_fallback") and not model.get("ignore_merges"),
            "BPE options other than CLIP's (suffix </w>, no prefix, dropout, byte fallback or ignore_merges)")

    norm = spec.get("normalizer") or {}
    steps = [n.get("type") for n in norm.get("normalizers", [])] if norm.get("type") == "Sequence" else []
    _expect(steps == ["NFC", "Replace", "Lowercase"], f"normalizer {norm}, expected NFC, Replace, Lowercase")
    replace = norm["normalizers"][1]
    _expect(replace.get("pattern") == {"Regex": r"\s+"} and replace.get("content") == " ",
            f"normalizer Replace {replace}, expected \\s+ -> ' '")

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    _expect([p.get("type") for p in parts] == ["Split", "ByteLevel"], f"pre_tokenizer {pre}")
    split, byte_level = parts
    _expect("Regex" in split.get("pattern", {}) and split.get("behavior") == "Removed" and split.get("invert"),
            f"Split pre-tokenizer {split}, expected an inverted regex that removes the rest")
    _expect(not byte_level.get("add_prefix_space"), "ByteLevel pre-tokenizer adds a prefix space")
    pattern = _without_specials(split["pattern"]["Regex"], [a["content"] for a in spec.get("added_tokens", [])])

    vocab_map = model["vocab"]
    vocab = sorted(vocab_map, key=vocab_map.__getitem__)
    _expect([vocab_map[s] for s in vocab] == list(range(len(vocab))), "vocab ids are not 0 … V-1")
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    _expect(all(len(m) == 2 for m in merges), "a merge is not a pair")
    alphabet = bytes_to_unicode()
    _expect(all(a in vocab_map and a + SUFFIX in vocab_map for a in alphabet), "vocab lacks a byte symbol")

    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    post = spec.get("post_processor") or {}
    _expect(post.get("type") == "RobertaProcessing" and post["cls"][1] == bos and post["sep"][1] == eos,
            f"post_processor {post}, expected [bos] ids [eos]")
    added = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    _expect({bos, eos} <= set(added.values()), f"added tokens {added} lack bos or eos")
    _expect(all(not a.get("normalized") and not a.get("lstrip") and not a.get("rstrip") and not a.get("single_word")
                for a in spec["added_tokens"]), "added tokens with normalized/lstrip/rstrip/single_word set")
    context = int(tok.model_max_length)
    _expect(2 <= context <= 4096, f"model_max_length {context} (not set in tokenizer_config.json?)")
    _expect(tok.padding_side == "right" and tok.truncation_side == "right", "padding or truncation on the left")

    tables = {
        "format": rt.FORMAT,
        "vocab": vocab,
        "merges": merges,
        "byte_alphabet": alphabet,
        "end_of_word_suffix": SUFFIX,
        "pattern": pattern,
        "pattern_flags": [],
        "special_tokens": added,
    }
    entry = {
        "format": rt.FORMAT,
        "vocab_size": len(vocab),
        "context_length": context,
        "sot_id": int(bos),
        "eot_id": int(eos),
        "pad_id": int(pad),
        "preprocess": PREPROCESS,
        "special_tokens_match": "raw_text",
        "truncation": rt.TRUNCATION,
        "padding": rt.PADDING,
        "reference": {name: version(name) for name in ("transformers", "tokenizers", "regex")},
    }
    return tables, entry


def reference_tokens(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask) int64 (B, L) as UnCLIPPipeline._encode_prompt makes them."""
    enc = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def check_parity(runtime: rt.Tokenizer, tok, texts: list[str]) -> list[str]:
    """The texts on which the runtime's ids or text_mask differ from ``tok``'s ids or mask (empty = parity)."""
    ids, mask = reference_tokens(tok, texts)
    got, got_mask = runtime(texts), runtime.text_mask(texts)
    return [t for t, a, b, m, n in zip(texts, got, ids, got_mask, mask) if not ((a == b).all() and (m == n).all())]


def write_tokenizer(out_dir: Path, tok) -> dict:
    """Write ``out_dir/tokenizer.json`` from ``tok`` (a loaded CLIPTokenizer); return its manifest entry."""
    tables, entry = tables_and_entry(tok)
    data = json.dumps(tables, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FILE_NAME).write_bytes(data)
    entry = {"file": FILE_NAME, "sha256": hashlib.sha256(data).hexdigest(), **entry}
    bad = check_parity(rt.Tokenizer.load(out_dir, entry), tok, PROBES)
    if bad:
        raise RuntimeError(f"exported tokenizer disagrees with transformers' CLIPTokenizer on {bad!r}")
    return entry
