"""``dalle2-rt serve``: the runtime behind an HTTP API with cross-request batching (FastAPI + uvicorn), and a
Ray Serve deployment of the same API for more than one machine (``ray_app.py``).

    dalle2-rt serve --port 8000                        # = python -m dalle2_rt.serve
    curl -s localhost:8000/v1/images -H 'content-type: application/json' -d '{"prompt": "a red circle", "seed": 0}'

Needs ``pip install 'dalle2-rt[serve]'`` (``[ray]`` for Ray Serve); the base runtime does not import this.
Modules: ``batch`` (one pass for images of many requests), ``service`` (queue, batching worker, limits),
``app`` (the FastAPI routes and the web page), ``metrics`` (Prometheus), ``cli`` (the command), ``ray_app``.
"""
