"""Canonical captions (docs/world.md "Canonical captions"): the structured spec, its text, and a strict parser.

    one object:  a [SIZE ]COLOR SHAPE[ POSITION][, BACKGROUND background]
    two objects: a COLOR SHAPE RELATION a COLOR SHAPE[, BACKGROUND background]

`parse_caption` accepts exactly the strings `caption_text` can produce and nothing else, so a benchmark prompt
that drifted from the grammar fails loudly instead of being scored against a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from .palette import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES, article


class CaptionError(ValueError):
    """A caption that is not in the canonical grammar, or a spec that no canonical caption can express."""


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption names. `colours`/`shapes` have one entry per object (A then B for two objects).

    kind: "single" or "two". Optional parts are None when the caption does not name them: `size` and `position`
    (single only), `background`. `relation` is required for two objects and None for one.
    """

    kind: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    size: str | None = None
    position: str | None = None
    relation: str | None = None
    background: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        n = {"single": 1, "two": 2}.get(self.kind)
        if n is None:
            raise CaptionError(f"kind must be 'single' or 'two', got {self.kind!r}")
        if len(self.colours) != n or len(self.shapes) != n:
            raise CaptionError(f"a {self.kind}-object spec needs {n} colour(s) and {n} shape(s), "
                               f"got {self.colours} and {self.shapes}")
        for c in self.colours:
            _check_word(c, COLOURS, "colour")
        for s in self.shapes:
            _check_word(s, SHAPES, "shape")
        _check_word(self.size, SIZES, "size", optional=True)
        _check_word(self.position, POSITIONS, "position", optional=True)
        _check_word(self.relation, RELATIONS, "relation", optional=True)
        _check_word(self.background, BACKGROUNDS, "background", optional=True)
        if self.kind == "two":
            if self.size is not None or self.position is not None:
                raise CaptionError("two-object captions name neither a size nor a position (objects are small)")
            if self.relation is None:
                raise CaptionError("a two-object caption needs a relation")
            if self.colours[0] == self.colours[1]:
                raise CaptionError(f"the two objects must have different colours, got {self.colours[0]!r} twice")
        elif self.relation is not None:
            raise CaptionError("a one-object caption has no relation")

    @property
    def n_objects(self) -> int:
        return len(self.colours)


def _check_word(word, vocab, what: str, optional: bool = False) -> None:
    if word is None and optional:
        return
    if word not in vocab:
        raise CaptionError(f"unknown {what} {word!r}; expected one of: {', '.join(vocab)}")


def _noun_phrase(colour: str, shape: str, size: str | None = None) -> str:
    words = ([size] if size else []) + [colour, shape]
    return f"{article(words[0])} {' '.join(words)}"


def caption_text(spec: CaptionSpec) -> str:
    """The canonical caption of `spec`, e.g. 'a large red circle on the left, black background'."""
    if spec.kind == "single":
        text = _noun_phrase(spec.colours[0], spec.shapes[0], spec.size)
        if spec.position:
            text += f" {spec.position}"
    else:
        a = _noun_phrase(spec.colours[0], spec.shapes[0])
        b = _noun_phrase(spec.colours[1], spec.shapes[1])
        text = f"{a} {spec.relation} {b}"
    if spec.background:
        text += f", {spec.background} background"
    return text


class _Cursor:
    """Left-to-right matcher over the caption text that knows what it expected when it fails."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, expected: str):
        rest = self.text[self.pos:]
        got = repr(rest[:30]) if rest else "the end of the caption"
        raise CaptionError(f"not a canonical caption: {self.text!r}: at character {self.pos} expected {expected}, "
                           f"got {got}. Grammar: 'a [SIZE ]COLOR SHAPE[ POSITION][, BACKGROUND background]' or "
                           f"'a COLOR SHAPE RELATION a COLOR SHAPE[, BACKGROUND background]'")

    def peek(self, options) -> str | None:
        """The option (a word or phrase) at the cursor, ending at a space, a comma or the end; else None."""
        for opt in sorted(options, key=len, reverse=True):  # longest first: no option prefixes another, but be safe
            end = self.pos + len(opt)
            if self.text.startswith(opt, self.pos) and (end == len(self.text) or self.text[end] in " ,"):
                return opt
        return None

    def take(self, options, expected: str) -> str:
        word = self.peek(options)
        if word is None:
            self.fail(expected)
        self.pos += len(word)
        return word

    def take_literal(self, literal: str, expected: str) -> None:
        if not self.text.startswith(literal, self.pos):
            self.fail(expected)
        self.pos += len(literal)

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def done(self) -> bool:
        return self.pos == len(self.text)


def _one_of(what: str, vocab) -> str:
    return f"{what} ({' | '.join(vocab)})"


def _parse_noun_phrase(cur: _Cursor, allow_size: bool) -> tuple[str | None, str, str]:
    """ARTICLE [SIZE ]COLOR SHAPE -> (size, colour, shape), checking the a/an rule against the next word."""
    art_pos = cur.pos
    art = cur.take(("a", "an"), "the article 'a' or 'an'")
    cur.take_literal(" ", "a single space after the article")
    size = cur.peek(SIZES)
    if size is not None:
        if not allow_size:
            cur.fail(_one_of("a colour", COLOURS) + " (two-object captions never name a size)")
        cur.take(SIZES, "a size")
        cur.take_literal(" ", "a single space after the size")
    colour = cur.take(COLOURS, _one_of("a colour", COLOURS))
    first = size or colour
    if art != article(first):
        cur.pos = art_pos
        cur.fail(f"the article {article(first)!r} before {first!r}")
    cur.take_literal(" ", "a single space after the colour")
    shape = cur.take(SHAPES, _one_of("a shape", SHAPES))
    return size, colour, shape


def parse_caption(text: str) -> CaptionSpec:
    """Parse a canonical caption into its spec; raise CaptionError saying what was expected otherwise."""
    if not isinstance(text, str):
        raise CaptionError(f"a caption is a str, got {type(text).__name__}")
    # The commonest slips get a direct message before the grammar walk.
    for broken, rule in ((text != text.lower(), "canonical captions are lower case"),
                         (text.endswith("."), "canonical captions have no final full stop"),
                         (text != text.strip(), "canonical captions have no leading or trailing spaces")):
        if broken:
            raise CaptionError(f"not a canonical caption: {text!r}: {rule}")
    cur = _Cursor(text)
    size, colour, shape = _parse_noun_phrase(cur, allow_size=True)
    colours, shapes = [colour], [shape]
    position = relation = background = None
    if cur.at(" "):
        cur.pos += 1
        if size is None and cur.peek(RELATIONS):
            relation = cur.take(RELATIONS, "a relation")
            cur.take_literal(" ", "a single space after the relation")
            _, colour_b, shape_b = _parse_noun_phrase(cur, allow_size=False)
            colours.append(colour_b)
            shapes.append(shape_b)
        elif size is not None and cur.peek(RELATIONS):
            cur.fail(_one_of("a position", POSITIONS) + " (a caption that names a size has one object)")
        else:
            expected = _one_of("a position", POSITIONS)
            if size is None:
                expected += " or " + _one_of("a relation", RELATIONS)
            position = cur.take(POSITIONS, expected)
    if not cur.done():
        cur.take_literal(", ", "', BACKGROUND background' or the end of the caption")
        background = cur.take(BACKGROUNDS, _one_of("a background", BACKGROUNDS))
        cur.take_literal(" background", "' background'")
    if not cur.done():
        cur.fail("the end of the caption (no full stop, no trailing text)")
    try:
        spec = CaptionSpec(kind="two" if relation else "single", colours=tuple(colours), shapes=tuple(shapes),
                           size=size, position=position, relation=relation, background=background)
    except CaptionError as e:
        raise CaptionError(f"not a canonical caption: {text!r}: {e}") from None
    # Belt and braces: the grammar above and caption_text must agree on every accepted string.
    if caption_text(spec) != text:
        raise CaptionError(f"not a canonical caption: {text!r}; canonical form is {caption_text(spec)!r}")
    return spec
