"""Hostile input (issue 31): prompts that cannot become UTF-8, engine folders as a trust boundary, the Triton
exporter kept inside ``--out``, and the server's bounds. Each case asserts the contract: one line naming what
to fix (never a traceback), nothing written outside the target, and no request failing another's."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dalle2_rt.runtime.errors import InputError
from dalle2_rt.runtime.images import png_info
from dalle2_rt.runtime.settings import check_prompts

REPO = Path(__file__).resolve().parents[1]
MAIN = "import sys; from dalle2_rt.cli import main; sys.exit(main())"


# ------------------------------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("prompt", ["a red circle \ud800", "\udcff", ["ok", "x\udfff y"]])
def test_a_prompt_with_a_lone_surrogate_is_refused_in_one_line(prompt):
    with pytest.raises(InputError, match=r"not valid Unicode text \(a lone surrogate '\\ud[89a-f][0-9a-f]{2}'"):
        check_prompts(prompt)


def test_png_text_with_a_lone_surrogate_is_written_with_a_replacement_character():
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG", pnginfo=png_info({"prompt": "a \ud800 b", "x": "é"}))
    assert Image.open(io.BytesIO(buf.getvalue())).text == {"prompt": "a \ufffd b", "x": "é"}


def test_cli_prompt_argument_that_is_not_utf8_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8", "DALLE2_RT_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-c", MAIN, b"a red \xff circle", "-o", str(tmp_path / "o")],
                          capture_output=True, env=env, timeout=120, cwd=tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("dalle2-rt: error: the prompt is not valid Unicode text") and "'\\udcff'" in err
    assert not (tmp_path / "o").exists()
