"""Runtime CLIP tokenizer vs ``open_clip.tokenize``: exact ids on a seeded corpus, truncation, import rule."""
from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import threading
from pathlib import Path

import ftfy
import numpy as np
import open_clip
import pytest

from dalle2_rt.runtime.tokenizer import Tokenizer, clean_text
from export.tokenizer import write_tokenizer

HAND = [
    "",
    " ",
    "\t\n\r ",
    "a large red circle on the left, black background",
    "A LARGE Red Circle On The LEFT, Black Background.",
    "two small blue squares above a green triangle",
    "it's a cat's toy; they're here, we've been, I'm sure you'll see, he'd go, don't, can't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T",
    "it'ſ x'ſ 'ſs",  # long s: the case-insensitive pattern matches it as 's
    "''s '' 's 's's ''t",
    "cafÃ© Ã¼ber naÃ¯ve â€™ â€œhiâ€\x9d",  # mojibake, fixed by ftfy
    "café crème brûlée naïve Ångström Øresund",
    "e\u0301 a\u0308 n\u0303 combining: o\u0302\u0323 q\u0307\u0323",
    "中文字符测试 日本語のテキスト 한국어 텍스트",
    "مرحبا بالعالم ١٢٣ שלום עולם",
    "नमस्ते दुनिया ภาษาไทย",
    "😀 🎉 👍🏽 👩‍💻 🇺🇸 ❤️ ✨🔥🐱",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp; &amp;amp;amp; &#39; &#x2019; &nbsp; &eacute; &copy; &bogus; &amp",
    "<b>&amp;</b> &lt;i&gt;",  # '<' turns ftfy's html unescaping off; html.unescape x2 still runs
    "first line &amp;\nsecond <line>\nthird &amp;",  # ftfy keeps unescape off after the '<' line
    "ﬁne ﬂow ＬＯＵＤ　ＮＯＩＳＥＳ ‘single’ “double” – — … ½ ² Ⅻ ① ٣",
    "İstanbul ΟΔΟΣ Σίσυφος ǅ Straße K Å",
    "tabs\tand\nnewlines\r\nand  runs   of    spaces\u00a0nbsp\u2003em\u3000ideo\u2028ls\u2029ps\x85nel",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "controls \x00\x01\x07\x1b[31mred\x1b[0m\x7f\x9c",
    "lone surrogate \ud800 and \udfff pair \ud83d\ude00",
    "private \ue000 unassigned \U000e0001 nonchar \uffff max \U0010ffff cjk-b \U00020000",
    "0 1 12 123 1234 3.14159 -42 1e10 0x1F 1,000,000 10% $5 #1 2nd 3rd 4th 1/2",
    "!!!??? ... --- ___ *** ((())) [[]] {{}} <<>> @@ ## $$ %% ^^ && || \\\\ // ~~ `` ''",
    "<start_of_text>",
    "<end_of_text>",
    "a<start_of_text>b<end_of_text>c",
    "<<start_of_text> <end_of_text>> <START_OF_TEXT> <ſtart_of_text>",
    "hello<|endoftext|>world </w> <w>",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "a " * 75,  # 75 tokens + sot + eot = 77: fits exactly
    "a " * 76,  # one too many: truncated
]

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring", "heart", "pentagon"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "gray"]
SIZES = ["tiny", "small", "medium", "large", "huge", "big"]
PLACES = [
    "on the left", "on the right", "at the top", "at the bottom", "in the center", "in the top left corner",
    "in the bottom right corner", "above a", "below a", "next to a", "to the left of a", "inside a",
]
UNICODE_WORDS = [
    "café", "naïve", "Ærø", "Straße", "İzmir", "ſtraße", "ΑΘΗΝΑ", "москва", "Ёлка", "東京", "北京市",
    "ひらがな", "カタカナ", "서울", "القاهرة", "مُحَمَّد", "ירושלים", "हिन्दी", "ภาษา", "ﬁsh", "ＷＩＤＥ",
    "“quote”", "‘it’s’", "—", "…", "😀", "👩‍👩‍👧", "🇫🇷", "✌🏿", "❤️", "½", "Ⅻ", "①", "٣٤", "e\u0301", "K",
]


def _codepoint_pool() -> list[str]:
    ranges = [
        (0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x5D0, 0x5EA),
        (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2190, 0x21FF),
        (0x3000, 0x30FF), (0x4E00, 0x4E80), (0xAC00, 0xAC80), (0xFB00, 0xFB06), (0xFF01, 0xFF5E),
        (0x1F300, 0x1F64F), (0x1F3FB, 0x1F3FF), (0x1F1E6, 0x1F1FF),
    ]
    return [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)] + ["\u200d", "\ufe0f", "\t", "\n", "\r"]


def _corpus() -> list[str]:
    rng = random.Random(20240601)
    out = list(HAND)

    def caption() -> str:
        words = [rng.choice(["a", "an", "one", "two", "three"]), rng.choice(SIZES), rng.choice(COLORS),
                 rng.choice(SHAPES) + rng.choice(["", "s"]), rng.choice(PLACES)]
        if words[-1].endswith(" a"):
            words += [rng.choice(COLORS), rng.choice(SHAPES)]
        text = " ".join(words) + rng.choice(["", ",", "."])
        if rng.random() < 0.7:
            text += " " + rng.choice(COLORS) + " background"
        return text if rng.random() < 0.8 else text.capitalize()

    out += [caption() for _ in range(300)]
    ascii_chars = string.ascii_letters + string.digits + string.punctuation + "      \t\n"
    out += ["".join(rng.choice(ascii_chars) for _ in range(rng.randint(1, 80))) for _ in range(250)]
    pool = _codepoint_pool()
    for _ in range(250):
        parts = [rng.choice(UNICODE_WORDS) if rng.random() < 0.4 else "".join(rng.choices(pool, k=rng.randint(1, 6)))
                 for _ in range(rng.randint(1, 12))]
        out.append(rng.choice(["", " ", "\u00a0", "-"]).join(parts))
    for _ in range(60):  # mojibake: UTF-8 bytes read back as Latin-1 / Windows-1252
        text = " ".join(rng.choices(UNICODE_WORDS, k=rng.randint(1, 5)))
        out.append(text.encode("utf-8").decode(rng.choice(["latin-1", "cp1252"]), errors="ignore"))
    entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x2019;", "&nbsp;", "&eacute;", "&amp;amp;",
                "&amp;lt;b&amp;gt;", "&copy", "&#128512;", "&unknown;", "<", ">", "&"]
    for _ in range(60):
        out.append(" ".join(rng.choice(entities + COLORS) for _ in range(rng.randint(1, 8))))
    spaces = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\x0b", "\x0c", "\x1c", "\u2028"]
    for _ in range(40):
        out.append("".join(rng.choice(spaces) + rng.choice(COLORS + SHAPES) for _ in range(rng.randint(0, 6))))
    for _ in range(40):
        out.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 12))) + rng.choice(["", ".5", "%", "px", "th"])
                            for _ in range(rng.randint(1, 6))))
    contractions = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'RE", "n't", "'", "''", "'x"]
    for _ in range(40):
        out.append(" ".join(rng.choice(["it", "they", "we", "I", "don", "cat", "x"]) + rng.choice(contractions)
                            for _ in range(rng.randint(1, 6))))
    for _ in range(30):  # >= 200 words, all truncated
        words = []
        while len(words) < 200:
            words += rng.choice([caption().split(), rng.choices(UNICODE_WORDS, k=5), ["word", "a", "1", ","]])
        out.append(" ".join(words))
    return out


CORPUS = _corpus()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("engine")
    return folder, write_tokenizer(folder)


@pytest.fixture(scope="module")
def tok(exported) -> Tokenizer:
    return Tokenizer.load(*exported)


def test_ids_identical_to_open_clip(tok):
    got = tok(CORPUS)
    want = open_clip.tokenize(CORPUS).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape == (len(CORPUS), 77)
    bad = [text for text, g, w in zip(CORPUS, got, want) if not np.array_equal(g, w)]
    assert not bad, f"{len(bad)} of {len(CORPUS)} texts differ, e.g. {bad[:5]!r}"
    assert len(CORPUS) >= 1000


def test_truncation_flags(tok):
    texts = ["a " * 75, "a " * 76, "", "a small red circle", " ".join(["word"] * 200)]
    ids, truncated = tok.encode(texts)
    assert truncated == [False, True, False, False, True]
    np.testing.assert_array_equal(ids, open_clip.tokenize(texts).numpy())
    assert ids[0, 76] == tok.eot_id and ids[1, 76] == tok.eot_id and ids[4, 76] == tok.eot_id
    assert list(ids[2, :3]) == [tok.sot_id, tok.eot_id, tok.pad_id]
    long_flags = tok.encode(CORPUS)[1]
    expected = [len(tok.text_ids(t)) > 75 for t in CORPUS]
    assert long_flags == expected and sum(expected) >= 30


def test_single_string_is_a_batch_of_one(tok):
    np.testing.assert_array_equal(tok("a red star"), tok(["a red star"]))
    assert tok([]).shape == (0, 77)


def test_manifest_entry_and_file(exported):
    folder, entry = exported
    assert entry["file"] == "tokenizer.json" and (folder / entry["file"]).is_file()
    assert (entry["vocab_size"], entry["context_length"]) == (49408, 77)
    assert (entry["sot_id"], entry["eot_id"], entry["pad_id"]) == (49406, 49407, 0)
    tables = json.loads((folder / entry["file"]).read_text(encoding="utf-8"))
    assert len(tables["vocab"]) == 49408 and len(tables["merges"]) == 48894
    assert tables["special_tokens"] == {"<start_of_text>": 49406, "<end_of_text>": 49407}
    json.dumps(entry)  # the entry goes into manifest.json as is


def test_load_refuses_mismatched_folder(exported, tmp_path):
    folder, entry = exported
    for key, value in [("format", "hf-tokenizers"), ("preprocess", ["lower", "stem"]), ("truncation", "random")]:
        with pytest.raises(ValueError, match=key):
            Tokenizer.load(folder, {**entry, key: value})
    data = (folder / entry["file"]).read_bytes()
    (tmp_path / entry["file"]).write_bytes(data.replace(b'"</w>"', b'"</W>"'))
    with pytest.raises(ValueError, match="sha256"):
        Tokenizer.load(tmp_path, entry)


def test_threads_agree(exported):
    texts = CORPUS[:400]
    fresh = Tokenizer.load(*exported)  # cold cache: the threads race to fill it
    want = open_clip.tokenize(texts).numpy()
    results = [None] * 4

    def work(k: int) -> None:
        results[k] = fresh(texts[k::2] + texts[: k + 1])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, got in enumerate(results):
        np.testing.assert_array_equal(got, np.concatenate([want[k::2], want[: k + 1]]))


def test_ftfy_is_identity_on_plain_ascii():
    """The shortcut the runtime docstring offers a C++ port: printable ASCII, tab, newline, no '&'."""
    rng = random.Random(7)
    chars = "".join(c for c in string.printable if c not in "&\r\x0b\x0c")
    for _ in range(300):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 60)))
        assert ftfy.fix_text(text) == text
    assert clean_text("  A\tB\n") == "a b"


def test_runtime_imports_neither_torch_nor_open_clip(exported):
    folder, entry = exported
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from dalle2_rt.runtime.tokenizer import Tokenizer\n"
        "tok = Tokenizer.load(Path(sys.argv[1]), json.loads(sys.argv[2]))\n"
        "print(tok(['a red circle']).tolist()[0][:5])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'open_clip', 'onnx', 'export'})\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(entry)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[49406, 320, 736, 7117, 49407]"
