"""Write open_clip's CLIP BPE tokenizer into an engine folder as a ``clip-bpe/1`` file.

The tables are read from an ``open_clip.tokenizer.SimpleTokenizer`` built with its defaults (the
``bpe_simple_vocab_16e6.txt.gz`` shipped inside the package; nothing is downloaded), so the file holds
exactly what ``open_clip.tokenize`` uses. The format, the algorithm and the manifest entry are specified
in ``dalle2_rt/runtime/tokenizer.py``. After writing, the file is loaded by the runtime tokenizer and
checked against ``open_clip.tokenize`` on a few probe texts, so an open_clip release that changes its
tokenizer fails the export instead of producing a folder that tokenizes differently.
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import open_clip
import regex
from open_clip.tokenizer import SimpleTokenizer

from dalle2_rt.runtime import tokenizer as rt

FILE_NAME = "tokenizer.json"
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

# Short texts that go through every step: mojibake, entities, ligature, contraction, whitespace, a literal
# special token, and one long enough to be truncated.
_PROBES = [
    "a large red circle on the left, black background",
    "  Café&amp;crème\tIt's  ﬁne — “quoted” ſ 12,345 😀 ",
    "cafÃ© &lt;b&gt; <end_of_text> x",
    "word " * 100,
]


def _tables(ref: SimpleTokenizer) -> dict:
    """The ``clip-bpe/1`` JSON object from open_clip's in-memory tables."""
    vocab = sorted(ref.encoder, key=ref.encoder.__getitem__)
    if [ref.encoder[s] for s in vocab] != list(range(len(vocab))):
        raise RuntimeError("open_clip's encoder ids are not 0 … V-1 (duplicate symbols?)")
    merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.__getitem__)
    if [ref.bpe_ranks[m] for m in merges] != list(range(len(merges))):
        raise RuntimeError("open_clip's merge ranks are not 0 … M-1 (duplicate merges?)")
    flags = ["IGNORECASE"] if ref.pat.flags & regex.IGNORECASE else []
    return {
        "format": rt.FORMAT,
        "vocab": vocab,
        "merges": [list(m) for m in merges],
        "byte_alphabet": [ref.byte_encoder[b] for b in range(256)],
        "end_of_word_suffix": "</w>",
        "pattern": ref.pat.pattern,
        "pattern_flags": flags,
        "special_tokens": {s: ref.encoder[s] for s in SPECIAL_TOKENS},
    }


def write_tokenizer(out_dir: Path, *, context_length: int = 77) -> dict:
    """Write ``out_dir/tokenizer.json``; return its manifest entry (keys specified in the runtime module)."""
    ref = SimpleTokenizer(context_length=context_length)
    # `reduction_fn` set would mean a masking strategy instead of truncation, which we do not implement.
    if ref.reduction_fn is not None:
        raise RuntimeError("open_clip SimpleTokenizer default uses a reduction mask; expected plain truncation")
    data = json.dumps(_tables(ref), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FILE_NAME).write_bytes(data)
    entry = {
        "file": FILE_NAME,
        "format": rt.FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "vocab_size": ref.vocab_size,
        "context_length": context_length,
        "sot_id": ref.sot_token_id,
        "eot_id": ref.eot_token_id,
        "pad_id": 0,  # open_clip pads with zeros (also the id of "!"; the text encoder pools at eot)
        "preprocess": rt.PREPROCESS,
        "truncation": rt.TRUNCATION,
        "padding": rt.PADDING,
        # For diagnosis only: the versions whose behaviour the file reproduces (ftfy's fixes change
        # between releases; regex/Python decide what \p{L} covers).
        "reference": {name: version(name) for name in ("open_clip_torch", "ftfy", "regex")},
    }
    got = rt.Tokenizer.load(out_dir, entry)(_PROBES)
    want = open_clip.tokenize(_PROBES, context_length=context_length).numpy()
    if not (got == want).all():
        bad = [t for t, g, w in zip(_PROBES, got, want) if not (g == w).all()]
        raise RuntimeError(f"exported tokenizer disagrees with open_clip.tokenize on {bad!r}")
    return entry
