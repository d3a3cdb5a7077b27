"""Small promises of the installed surface: the typing marker setup.py ships, the serve CLI's backends."""
from __future__ import annotations

from pathlib import Path

import dalle2_rt
from dalle2_rt.runtime.backends import BACKENDS
from dalle2_rt.serve.cli import build_parser

PACKAGE = Path(dalle2_rt.__file__).parent


def test_the_py_typed_marker_setup_py_ships_exists():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in (PACKAGE.parent / "setup.py").read_text()


def test_serve_offers_every_backend_and_the_triton_url():
    parser = build_parser()
    backend = next(a for a in parser._actions if "--backend" in a.option_strings)
    assert list(backend.choices) == list(BACKENDS)
    args = parser.parse_args(["--backend", "triton", "--url", "grpc://gpu-box:8001"])
    assert (args.backend, args.url) == ("triton", "grpc://gpu-box:8001")
