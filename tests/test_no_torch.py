"""The runtime and the CLI never import torch, open_clip, onnx or the training/export code.

Checked in a fresh interpreter (this test process has torch loaded by other tests): import the package,
run a whole generation, a variation and the CLI on the tiny engines, then look at ``sys.modules``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

FORBIDDEN = ["torch", "open_clip", "onnx", "dalle2_rt.models", "dalle2_rt.training", "export"]

SCRIPT = textwrap.dedent("""
    import json, sys
    import dalle2_rt
    after_import = sorted(m for m in ("onnxruntime", "numpy", "PIL") if m in sys.modules)
    from dalle2_rt import Pipeline
    pipe = Pipeline.load(sys.argv[1], backend="onnxruntime", threads=1)
    images = pipe(["a red circle", "two blue squares"], seed=0, num_images=2,
                  prior_steps=2, decoder_steps=2, sr_steps=1)
    assert len(images) == 4 and images[0].mode == "RGB"
    more = pipe.variations(images[0], num_images=1, seed=1, decoder_steps=2, sr_steps=1)
    assert len(more) == 1
    from dalle2_rt import cli
    assert cli.main(["a green triangle", "--engines", sys.argv[1], "-o", sys.argv[2], "-q",
                     "--prior-steps", "2", "--decoder-steps", "2", "--sr-steps", "1", "--threads", "1"]) == 0
    print(json.dumps({"after_import": after_import, "modules": sorted(sys.modules)}))
""")


def test_generation_imports_no_torch_open_clip_or_onnx(tiny_engines, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DALLE2_RT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_engines), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["after_import"] == []  # `import dalle2_rt` loads nothing heavy, not even numpy
    modules = set(report["modules"])
    assert "onnxruntime" in modules  # the generation did run on it
    leaked = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert leaked == []
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
