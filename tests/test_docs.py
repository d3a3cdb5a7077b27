"""README agrees with the code: the bundled model's sampling defaults and the CLI's options, read from both."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dalle2_rt.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
MANIFEST = REPO / "engines" / "shapes-v2" / "manifest.json"


def _section(heading: str) -> str:
    """README's text from ``heading`` to the next heading of any level."""
    start = README.index(heading + "\n")
    rest = README[start + len(heading) + 1:]
    end = re.search(r"^#+ ", rest, flags=re.M)
    return rest[:end.start()] if end else rest


def _table(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in ``text``, header and separator dropped, cells stripped."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def readme_defaults() -> dict[str, dict]:
    """README "Sampling defaults" as {stage: {sampler, steps, guidance?, candidates?, operation_steps?}}; "—" means
    not set."""
    out = {}
    for stage, sampler, steps, guidance, candidates, operation_steps in _table(_section("### Sampling defaults")):
        entry = {"sampler": sampler, "steps": int(steps)}
        if guidance != "—":
            entry["guidance"] = float(guidance)
        if candidates != "—":
            entry["candidates"] = int(candidates)
        if operation_steps != "—":
            entry["operation_steps"] = int(operation_steps)
        out[stage] = entry
    return out


def test_readme_defaults_are_the_bundled_defaults_file():
    committed = json.loads((REPO / "checkpoints" / "shapes-v2" / "defaults.json").read_text())
    assert readme_defaults() == committed


@pytest.mark.skipif(not MANIFEST.exists(), reason="engines/shapes-v2 not built (make engines)")
def test_readme_defaults_are_the_built_manifests():
    stages = json.loads(MANIFEST.read_text())["stages"]
    got = {"prior": stages["prior"]["defaults"], "decoder": stages["decoder"]["defaults"],
           "sr": stages["sr"][0]["defaults"]}
    assert readme_defaults() == got


def test_readme_lists_exactly_the_cli_options():
    listed = set()
    for row in _table(_section("## The CLI")):
        listed |= set(re.findall(r"`(-{1,2}[a-z][a-z0-9+-]*)`", row[0]))
    parser = build_parser()
    actual = {opt for action in parser._actions for opt in action.option_strings} - {"-h", "--help"}
    assert listed == actual, f"in README only: {listed - actual}; in the parser only: {actual - listed}"


def test_readme_lists_the_cli_choices():
    parser = build_parser()
    rows = {tuple(re.findall(r"`(--[a-z-]+)`", r[0])): r[1] for r in _table(_section("## The CLI"))}
    for action in parser._actions:
        if action.choices and action.option_strings:
            text = next(v for k, v in rows.items() if action.option_strings[-1] in k)
            for choice in action.choices:
                assert f"`{choice}`" in text, (action.option_strings, choice)
