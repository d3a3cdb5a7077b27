"""``python -m bench.worker SIDE JSON``: one contender of a side-by-side, served on stdin/stdout.

SIDE is ``ours`` (kwargs of ``sides.build_ours``: engines, backend, threads) or ``diffusers`` (threads).
The protocol is in ``bench/timing.py``.
"""
from __future__ import annotations

import json
import sys

from . import sides
from .timing import serve

BUILDERS = {"ours": sides.build_ours, "diffusers": sides.build_diffusers}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in BUILDERS:
        print(f"usage: python -m bench.worker {{{','.join(BUILDERS)}}} JSON", file=sys.stderr)
        return 2
    kwargs = json.loads(argv[1])
    serve(lambda: BUILDERS[argv[0]](**kwargs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
