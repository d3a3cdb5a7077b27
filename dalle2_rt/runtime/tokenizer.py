"""CLIP BPE tokenizer, torch-free, token-for-token identical to ``open_clip.tokenize``.

Why our own BPE over a JSON file rather than a Hugging Face ``tokenizers`` JSON
------------------------------------------------------------------------------
Exact parity comes by construction: the pre-tokenisation runs the same pattern through the same
``regex`` engine as open_clip, after the same ftfy/html cleaning, and the BPE loop makes the same merge
choices. A ``tokenizers`` pipeline (BPE with ``</w>`` suffix, Split on the same pattern, ByteLevel,
the two specials as added tokens, the same Python cleaning in front) was tried on the test corpus: it
differed on 1 text of 1,108, because its added-token matcher finds ``<start_of_text>`` inside
``<<start_of_text>``, where open_clip's pattern swallows ``<<`` as punctuation first; it ran at half
our speed (ftfy still runs in Python in front of it, and this module caches words), and it adds a runtime
dependency whose regex engine (Oniguruma) is not the one open_clip uses. The BPE below is ~60 lines
that a C++ stack can port from this docstring and the file alone (or load into tokenizers-cpp, the file
has the vocab and merges it needs, minding the special-token case above).

File format (``format: "clip-bpe/1"``): one UTF-8 JSON object
-------------------------------------------------------------
``vocab``           list of V strings; ``vocab[i]`` is the symbol with token id i (V = 49408 for CLIP).
                    Symbols are strings over the byte alphabet below; a word-final symbol ends in
                    ``end_of_word_suffix``. Every string is unique.
``merges``          list of ``[left, right]`` pairs, rank order (index = rank, lower merges first). For
                    every pair, ``left``, ``right`` and ``left + right`` are in ``vocab``.
``byte_alphabet``   list of 256 strings of one character each: ``byte_alphabet[b]`` spells byte b
                    (the GPT-2 ``bytes_to_unicode`` table: printable bytes spell themselves, the others
                    map to U+0100…); ``byte_alphabet[b]`` and ``byte_alphabet[b] + suffix`` are in vocab.
``end_of_word_suffix``  ``"</w>"``.
``pattern``         pre-tokenisation regex (Python ``regex`` syntax), ``pattern_flags`` its flags
                    (``["IGNORECASE"]``).
``special_tokens``  {string: id}: ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407).

The manifest entry that points at the file (written by ``export/tokenizer.py``) holds ``file``,
``format``, ``sha256`` (of the file's bytes), ``vocab_size``, ``context_length`` (77), ``sot_id``,
``eot_id``, ``pad_id`` (0), ``preprocess``, ``truncation`` and ``padding`` (and optionally
``special_tokens_match``, below); the last three name the steps below and are checked on load (every
``preprocess`` step must be one this module implements), so a folder asking for anything else is refused,
not mis-tokenised.
``reference`` records the open_clip, ftfy and regex versions the export was checked against: ftfy's fixes
and the Unicode tables behind ``str.lower``, NFC and ``\\p{L}`` change between releases.

Algorithm (what ``Tokenizer.encode`` does; open_clip ``SimpleTokenizer`` with ``clean="lower"``)
-------------------------------------------------------------------------------------------------
1. ``ftfy.fix_text(text)`` with ftfy's default config (mojibake, curly quotes, ligatures, fullwidth,
   control chars, NFC). For C++: as of ftfy 6.3 this is the identity on text made only of printable
   ASCII, ``\\t`` and ``\\n`` with no ``&`` (tested); any other text needs ftfy itself.
2. ``html.unescape`` twice (``&amp;lt;`` becomes ``<``).
3. Whitespace clean: split on Python ``str.isspace`` characters, join the pieces with one space
   (which also strips both ends).
4. Python ``str.lower()`` (full Unicode lower-casing: ``İ`` becomes ``i`` + U+0307).
5. Pre-tokenise: ``findall`` of ``pattern`` =
   ``<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``,
   case-insensitive (simple case folding; after step 4 the only effect is that ``ſ`` U+017F matches
   ``s``). Alternatives are tried in order at each position; the only whitespace left after step 3 is
   U+0020, which no alternative matches, so it is skipped.
6. Each pre-token equal to a special-token string becomes that id. Any other is UTF-8 encoded; its
   bytes spell the initial word ``byte_alphabet[b0] … byte_alphabet[bn-1] + suffix``. Then, while the
   word has two or more symbols: find the adjacent pair with the lowest merge rank (stop if none is a
   merge), and replace each occurrence of that pair, scanning left to right without overlap
   (``a a a`` → ``aa a``), with the concatenated symbol. The ids of the final symbols are appended.
7. ``ids = [sot] + ids[:context_length - 2] + [eot]``, right-padded with ``pad_id`` to
   ``context_length``. A text is *truncated* when step 6 gave more than ``context_length - 2`` ids.

A literal ``<end_of_text>`` in a prompt becomes id 49407 mid-sequence, exactly as in open_clip (whose
text tower then pools at that first eot, ignoring the rest of the prompt).

Other CLIP tokenizers (``preprocess`` and ``special_tokens_match`` in the manifest entry)
---------------------------------------------------------------------------------------
The same file format also carries the CLIP tokenizer of ``transformers`` (``CLIPTokenizer`` over the
``tokenizers`` library, what diffusers' UnCLIPPipeline / karlo use; written by
``export/hf_clip_tokenizer.py``). It differs from open_clip only in steps 1-5 and 6's special tokens,
and the entry names those steps instead of the list above:

- ``preprocess`` is a list of step names from ``PREPROCESS_STEPS``, applied in order. open_clip's is
  ``PREPROCESS``; transformers' is ``["nfc", "whitespace_collapse", "lower_chars"]`` (its normalizer:
  NFC, the regex ``\\s+`` replaced by one space, per-character lower-casing, which has no final-sigma
  rule: ``ΟΔΟΣ`` becomes ``οδοσ``). No ftfy and no HTML unescaping there.
- ``special_tokens_match``: ``"pretoken"`` (default, step 6 above) or ``"raw_text"``: the special
  strings are found in the *raw* text, exactly and case-sensitively (leftmost, longest first), before any
  preprocessing; the text between them goes through steps 1-6 on its own, and a pre-token that only
  spells a special string after preprocessing (``<|ENDOFTEXT|>`` lower-cased) is BPE-encoded as text.
  That is how ``tokenizers`` treats added tokens. In this mode ``special_tokens`` lists every added
  token of the source tokenizer, which may be more than sot and eot (a pad token ``"!"`` with id 0 makes
  every ``!`` of a prompt id 0, as in transformers).

Thread safety: a ``Tokenizer`` is immutable after construction; its word cache is a
``functools.lru_cache`` (safe to call from several threads), so one instance serves a whole Pipeline.
Memory: only pre-tokens of at most ``CACHED_PIECE_CHARS`` characters are cached (longer ones, rare in real
text, are merged afresh), so the cache is bounded in bytes, not only in entries: 32,768 entries of at most
32 characters and 32 ids each stay under ~20 MB whatever prompts a server is sent.
"""
from __future__ import annotations

import hashlib
import html
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from .untrusted import parse_json, read_bounded

FORMAT = "clip-bpe/1"
PREPROCESS = ["ftfy.fix_text", "html.unescape", "html.unescape", "whitespace_clean", "lower"]
TRUNCATION = "[sot] + ids[:context_length - 2] + [eot]"
PADDING = "right, pad_id"
SPECIAL_MATCHES = ("pretoken", "raw_text")
CACHED_PIECE_CHARS = 32  # longer pre-tokens are not cached (the module docstring's memory bound)
_FLAGS = {"IGNORECASE": regex.IGNORECASE}
_WHITESPACE_RUN = regex.compile(r"\s+")

# The preprocessing steps a tokenizer entry may name, in the order it lists them.
PREPROCESS_STEPS = {
    "ftfy.fix_text": ftfy.fix_text,  # ftfy's default config
    "html.unescape": html.unescape,
    "whitespace_clean": lambda t: " ".join(t.split()),  # str.isspace runs -> one space, ends stripped
    "lower": str.lower,  # full Unicode lower-casing, final sigma in context
    "nfc": lambda t: unicodedata.normalize("NFC", t),
    "whitespace_collapse": lambda t: _WHITESPACE_RUN.sub(" ", t),  # \s+ -> one space, ends kept
    "lower_chars": lambda t: "".join(c.lower() for c in t),  # per character: Σ -> σ everywhere
}


def clean_text(text: str, steps=PREPROCESS) -> str:
    """Steps 1-4 of the module docstring (open_clip's ``_clean_lower``), or the named ``steps``."""
    for step in steps:
        text = PREPROCESS_STEPS[step](text)
    return text


class Tokenizer:
    """Byte-level BPE over the ``clip-bpe/1`` file; ``tok(texts)`` -> int64 (B, context_length)."""

    def __init__(
        self,
        tables: dict,
        *,
        context_length: int,
        sot_id: int,
        eot_id: int,
        pad_id: int,
        preprocess=PREPROCESS,
        special_tokens_match: str = "pretoken",
        cache_size: int = 1 << 15,
    ):
        unknown = [step for step in preprocess if step not in PREPROCESS_STEPS]
        if unknown:
            raise ValueError(f"unknown preprocess steps {unknown}; known: {', '.join(PREPROCESS_STEPS)}")
        if special_tokens_match not in SPECIAL_MATCHES:
            raise ValueError(f"special_tokens_match {special_tokens_match!r}; known: {', '.join(SPECIAL_MATCHES)}")
        self.preprocess = tuple(preprocess)
        self.special_tokens_match = special_tokens_match
        vocab = tables["vocab"]
        ids = {symbol: i for i, symbol in enumerate(vocab)}
        if len(ids) != len(vocab):
            raise ValueError("tokenizer vocab has duplicate symbols")
        suffix = tables["end_of_word_suffix"]
        alphabet = tables["byte_alphabet"]
        if len(alphabet) != 256:
            raise ValueError(f"byte_alphabet has {len(alphabet)} entries, expected 256")
        self._byte_ids = [ids[s] for s in alphabet]  # byte -> id of its symbol inside a word
        self._final_byte_ids = [ids[s + suffix] for s in alphabet]  # byte -> id as the word's last symbol
        # (left id, right id) -> (rank, merged id)
        self._merges = {(ids[a], ids[b]): (rank, ids[a + b]) for rank, (a, b) in enumerate(tables["merges"])}
        self._special = {str(s): int(i) for s, i in tables["special_tokens"].items()}
        # Step 6 compares the raw pre-token with the special strings; open_clip compares its byte-spelled
        # form, which is the same string when every byte of the special spells itself.
        for s in self._special:
            if "".join(alphabet[b] for b in s.encode("utf-8")) != s:
                raise ValueError(f"special token {s!r} is not spelled by itself in the byte alphabet")
        flags = 0
        for name in tables["pattern_flags"]:
            flags |= _FLAGS[name]
        self._pattern = regex.compile(tables["pattern"], flags)
        if context_length < 2:
            raise ValueError(f"context_length {context_length} leaves no room for sot and eot")
        # open_clip: exactly sot and eot. transformers: every added token (e.g. a pad token "!" of its own).
        extra_ok = special_tokens_match == "raw_text"
        if not {sot_id, eot_id} <= set(self._special.values()) or (
                not extra_ok and sorted(self._special.values()) != sorted({sot_id, eot_id})):
            raise ValueError(f"special_tokens {self._special} do not match sot_id {sot_id}, eot_id {eot_id}")
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.sot_id, self.eot_id, self.pad_id = sot_id, eot_id, pad_id
        self._cached_ids = lru_cache(maxsize=cache_size)(self._bpe)
        # raw_text: one alternation of the escaped specials, longest first (leftmost-longest match).
        specials = sorted(self._special, key=len, reverse=True)
        self._raw_specials = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None

    @classmethod
    def load(cls, folder: Path, entry: dict) -> Tokenizer:
        """Read ``folder / entry["file"]`` after checking the manifest entry asks for what we implement."""
        expected = {"format": FORMAT, "truncation": TRUNCATION, "padding": PADDING}
        for key, value in expected.items():
            if entry.get(key) != value:
                raise ValueError(f"tokenizer entry {key}={entry.get(key)!r}; this runtime implements {value!r}")
        raw = read_bounded(Path(folder), Path(folder) / entry["file"])  # a regular file inside the folder
        digest = hashlib.sha256(raw).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"{entry['file']}: sha256 {digest} does not match the manifest's {entry['sha256']}")
        tables = parse_json(raw, Path(folder) / entry["file"])
        if not isinstance(tables, dict):
            raise ValueError(f"{entry['file']}: not a tokenizer table (a JSON object)")
        if tables.get("format") != FORMAT:
            raise ValueError(f"{entry['file']}: format {tables.get('format')!r}, expected {FORMAT!r}")
        tok = cls(
            tables,
            context_length=int(entry["context_length"]),
            sot_id=int(entry["sot_id"]),
            eot_id=int(entry["eot_id"]),
            pad_id=int(entry["pad_id"]),
            preprocess=list(entry["preprocess"]),
            special_tokens_match=entry.get("special_tokens_match", "pretoken"),
        )
        if tok.vocab_size != int(entry["vocab_size"]):
            raise ValueError(f"{entry['file']}: {tok.vocab_size} symbols, manifest says {entry['vocab_size']}")
        return tok

    def _word_ids(self, piece: str) -> tuple[int, ...]:
        return self._cached_ids(piece) if len(piece) <= CACHED_PIECE_CHARS else self._bpe(piece)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Step 6 for one pre-token (cached per instance)."""
        special = self._special.get(piece) if self.special_tokens_match == "pretoken" else None
        if special is not None:
            return (special,)
        data = piece.encode("utf-8")
        word = [self._byte_ids[b] for b in data[:-1]]
        word.append(self._final_byte_ids[data[-1]])
        merges = self._merges
        while len(word) > 1:
            best = None  # (rank, merged id) of the lowest-rank adjacent pair
            for pair in zip(word, word[1:]):
                merge = merges.get(pair)
                if merge is not None and (best is None or merge[0] < best[0]):
                    best, left, right = merge, pair[0], pair[1]
            if best is None:
                break
            merged, out, i, n = best[1], [], 0, len(word)
            while i < n:
                if word[i] == left and i + 1 < n and word[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return tuple(word)

    def text_ids(self, text: str) -> list[int]:
        """Steps 1-6: the ids of one text, without sot/eot and not truncated."""
        if self.special_tokens_match == "pretoken" or self._raw_specials is None:
            return self._segment_ids(text)
        ids: list[int] = []
        start = 0
        for m in self._raw_specials.finditer(text):
            ids += self._segment_ids(text[start:m.start()])
            ids.append(self._special[m.group()])
            start = m.end()
        return ids + self._segment_ids(text[start:])

    def _segment_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pattern.findall(clean_text(text, self.preprocess)):
            ids.extend(self._word_ids(piece))
        return ids

    def encode(self, texts: str | Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Token ids int64 (B, context_length) and, per text, whether it was truncated (step 7)."""
        if isinstance(texts, str):
            texts = [texts]
        keep = self.context_length - 2
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        truncated = []
        for row, text in enumerate(texts):
            ids = self.text_ids(text)
            truncated.append(len(ids) > keep)
            ids = [self.sot_id, *ids[:keep], self.eot_id]
            out[row, : len(ids)] = ids
        return out, truncated

    def text_mask(self, texts: str | Sequence[str]) -> np.ndarray:
        """float32 (B, context_length): 1.0 on the positions step 7 fills from the text (sot, its ids as
        truncated, eot), 0.0 on the padding; the ``attention_mask`` transformers returns with the ids."""
        if isinstance(texts, str):
            texts = [texts]
        counts = np.array([min(len(self.text_ids(t)), self.context_length - 2) + 2 for t in texts])
        return (np.arange(self.context_length)[None, :] < counts[:, None]).astype(np.float32)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids int64 (B, context_length), like ``open_clip.tokenize(texts).numpy()``."""
        return self.encode(texts)[0]
