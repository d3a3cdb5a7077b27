"""The HTTP API (FastAPI) over a ``Service``: images, variations, health, readiness, metrics, the web page.

    POST /v1/images       JSON {prompt | [prompts], n, seed, <every sampling option>, response_format, stream}
    POST /v1/variations   multipart: image file, n, seed, the sampling options a variation takes, response_format
    POST /v1/edits        multipart: image file, source and target captions, amount (repeatable: a sweep), seed,
                          decoder_steps, decoder_guidance, refine, text, response_format (runtime/operations.py)
    POST /v1/interpolations  multipart: each end an image file (image_a, image_b) or a prompt (prompt_a, prompt_b),
                          frames, latent, seed, decoder_steps, decoder_guidance, refine
    GET  /healthz         the process answers
    GET  /readyz          engines loaded and not draining (503 otherwise)
    GET  /metrics         Prometheus text (metrics.py)
    GET  /                the web page (page.html);  /docs, /openapi.json: the API

Every user mistake is a 4xx whose body is one line of JSON, ``{"error": "<what to fix>"}``; nothing a client
sends produces a 500 or a traceback. Names and limits are the CLI's and ``Pipeline``'s (``n`` is also accepted
as ``num_images``), checked by ``Pipeline.settings`` itself; the sampling options are ``settings.OPTIONS`` (the
fields of ``Settings``: the JSON schema and the variations form are built from it). Images come back as base64
PNGs in JSON (``response_format: "b64_json"``), as one ``image/png`` body (``"png"``, one image only), or
streamed as NDJSON events with the stage progress (``stream: true``, what the page uses). Each PNG carries the CLI's
text metadata (prompt, seed, index, sampler, steps, guidance, backend, manifest sha256).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import io
import json
import logging
import secrets
import time
from importlib import resources
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime import operations as ops
from ..runtime.errors import Dalle2RTError, InputError
from ..runtime.settings import OPTIONS, VARIATION_OPTIONS, Option, check_prompts
from .service import Cancelled, Draining, Job, QueueFull, Service

log = logging.getLogger("dalle2_rt.serve")
MAX_SEED = 2**64 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        self.status, self.message, self.headers = status, message, headers
        super().__init__(message)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


STRICT = {int: StrictInt, float: StrictFloat, str: StrictStr}  # an option's type as a JSON field (no coercion)


def _option_help(option: Option) -> str:
    return option.help + (f" ({' | '.join(option.choices)})" if option.choices else "")


class _ImagesRequest(BaseModel):
    """A text-to-image request. Unset sampling options take the engine folder's defaults."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr | list[StrictStr] = Field(validation_alias=AliasChoices("prompt", "prompts"),
                                                description="a prompt, or a list of prompts (n images each)")
    n: StrictInt = Field(1, validation_alias=AliasChoices("n", "num_images"), description="images per prompt")
    seed: StrictInt | None = Field(None, description="noise seed, 0 … 2^64-1 (default: drawn, and returned)")
    response_format: Literal["b64_json", "png"] = "b64_json"
    stream: StrictBool = Field(False, description="NDJSON events: queued, progress, image…, done | error")


# ... and one optional field per sampling option (None: the folder's default)
ImagesRequest = create_model(
    "ImagesRequest", __base__=_ImagesRequest, __doc__=_ImagesRequest.__doc__,
    **{o.name: (STRICT[o.kind] | None, Field(None, description=_option_help(o))) for o in OPTIONS})


def _variations_form() -> inspect.Signature:
    """The variations endpoint's parameters: the upload, n, seed, response_format and one optional form field
    per sampling option a variation takes (``settings.VARIATION_OPTIONS``; None: the folder's default)."""
    def form(name, annotation, default=inspect.Parameter.empty):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    return inspect.Signature([
        form("request", Request),
        form("image", Annotated[UploadFile, File(description="PNG, JPEG, …")]),
        form("n", Annotated[int, Form()], 1),
        form("seed", Annotated[int | None, Form()], None),
        form("response_format", Annotated[Literal["b64_json", "png"], Form()], "b64_json"),
        *(form(o.name, Annotated[o.kind | None, Form(description=_option_help(o))], None) for o in VARIATION_OPTIONS),
    ])


class Guard:
    """ASGI middleware: at most ``max_requests`` requests in progress (503 beyond; the probes /healthz, /readyz
    and /metrics are never refused, so a full server still reports itself alive), request-size limits (413;
    bodies buffered up to the limit, JSON bodies to the smaller ``max_json_bytes``, so parsing one holds the
    event loop a few ms at most), a deadline for receiving the body (408: a slow client holds no slot), and
    request metrics."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.active = 0  # requests in progress (the probes not counted)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {"code": 500}
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        limits = self.service.limits
        probe = scope["path"] in _PROBES
        if not probe and self.active >= limits.max_requests:  # the probes still answer when the rest is full
            self.service.metrics.requests.labels(endpoint, "503").inc()
            return await _error(503, f"over {limits.max_requests} requests in progress; retry shortly",
                                {"Retry-After": "1"})(scope, receive, send)
        self.active += not probe
        try:
            return await self._guarded(scope, receive, send, start, status, endpoint, limits)
        finally:
            self.active -= not probe

    async def _guarded(self, scope, receive, send, start, status, endpoint, limits):
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/")
        limit = limits.max_body_bytes if multipart else min(limits.max_body_bytes, limits.max_json_bytes)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await _error(413, f"request body over {limit} bytes")(scope, receive, send_status)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, more = [], True
                size = 0
                deadline = time.monotonic() + limits.body_timeout_s
                while more:
                    try:
                        message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        return await _error(408, f"request body not received within {limits.body_timeout_s:g} s")(
                            scope, receive, send_status)
                    if message["type"] == "http.disconnect":
                        return
                    body.append(message.get("body", b""))
                    size += len(body[-1])
                    more = message.get("more_body", False)
                    if size > limit:
                        return await _error(413, f"request body over {limit} bytes")(scope, receive, send_status)
                data = b"".join(body)
                if not multipart:
                    problem = json_shape_problem(data)
                    if problem:
                        return await _error(422, problem)(scope, receive, send_status)
                replay = [{"type": "http.request", "body": data, "more_body": False}]

                async def buffered():
                    return replay.pop() if replay else await receive()

                return await self.app(scope, buffered, send_status)
            return await self.app(scope, receive, send_status)
        finally:
            m = self.service.metrics
            m.requests.labels(endpoint, str(status["code"])).inc()
            m.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


_PROBES = {"/healthz", "/readyz", "/metrics"}
_ENDPOINTS = {"/v1/images", "/v1/variations", "/v1/edits", "/v1/interpolations", "/healthz", "/readyz", "/metrics",
              "/"}

# the most keys a JSON object of a request may have (ImagesRequest has about 20 fields): a body of thousands of
# unknown keys would otherwise cost the event loop one validation error each (20,000: ~140 ms, bench.abuse)
MAX_JSON_KEYS = 64


class _TooManyKeys(Exception):
    pass


def _count_keys(pairs: list) -> dict:
    if len(pairs) > MAX_JSON_KEYS:
        raise _TooManyKeys(len(pairs))
    return dict(pairs)


def json_shape_problem(data: bytes) -> str | None:
    """What is wrong with a JSON body's shape before any validation (an object of too many keys), or None; a
    body that does not parse is left to the route (its own 400)."""
    if not data:
        return None
    try:
        json.loads(data, object_pairs_hook=_count_keys)
    except _TooManyKeys as e:
        return f"the request body has an object of {e.args[0]} keys; at most {MAX_JSON_KEYS}"
    except (ValueError, RecursionError):
        pass  # not JSON: the route answers it
    return None


def _checked_prompts(prompt, limits) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InputError("no prompt given")
    if len(prompts) > limits.max_prompts:
        raise InputError(f"at most {limits.max_prompts} prompts per request, got {len(prompts)}")
    for p in prompts:
        if len(p) > limits.max_prompt_chars:
            raise InputError(f"a prompt may have at most {limits.max_prompt_chars} characters, got {len(p)}")
    return check_prompts(prompts)  # blank, or not encodable as UTF-8 (a lone surrogate): refused before any work


def _checked_count(n: int, prompts: int, limits) -> int:
    if not 1 <= n <= limits.max_images:
        raise InputError(f"n must be between 1 and {limits.max_images}, got {n}")
    if n * prompts > limits.max_images:
        raise InputError(f"at most {limits.max_images} images per request, got {prompts} prompts × {n}")
    return n


def _checked_seed(seed) -> int:
    if seed is None:
        return secrets.randbelow(2**32)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and 2^64-1, got {seed}")
    return seed


def _item(result) -> dict:
    info = result.info
    return {"b64_json": base64.b64encode(result.png).decode("ascii"), "prompt": info.get("prompt", ""),
            "seed": int(info["seed"]), "index": int(info["index"]), "metadata": info}


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over ``service``; closing the app (lifespan end) drains and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = FastAPI(title="dalle2-rt", version="0.1.0", lifespan=lifespan,
                  description="DALL-E 2 (unCLIP) images from text over an exported engine folder.")
    app.add_middleware(Guard, service=service)
    pipe, limits, metrics = service.pipe, service.limits, service.metrics
    decoding = asyncio.Semaphore(limits.max_decodes)
    encoder_side = _encoder_side(pipe)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or "body"
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        if first.get("type") == "model_attributes_type":
            return _error(422, "the request body must be a JSON object")
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error", exc.headers)

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a bug: logged with its traceback, answered in one line
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal error (see the server log)")

    def _submit(job: Job) -> Job:
        try:
            return service.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), {"Retry-After": str(e.retry_after)}) from None
        except Draining as e:
            raise ApiError(503, str(e), {"Retry-After": "5"}) from None

    def _admit(size: int) -> None:
        """429/503 before an upload is decoded, for a request the queue would refuse anyway."""
        try:
            service.admit(size)
        except QueueFull as e:
            raise ApiError(429, str(e), {"Retry-After": str(e.retry_after)}) from None
        except Draining as e:
            raise ApiError(503, str(e), {"Retry-After": "5"}) from None

    async def _only_fields(request: Request, allowed) -> None:
        """A multipart form's fields must all be the endpoint's: a misspelt or inapplicable one (an option this
        endpoint does not take, e.g. negative_prompt on an operation) is a 400, as JSON bodies refuse it."""
        unknown = sorted({k for k in (await request.form()).keys()} - set(allowed))
        if unknown:
            raise ApiError(400, f"unknown form field{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(repr(k[:40]) for k in unknown[:5])}; this endpoint takes "
                                f"{', '.join(sorted(allowed))}")

    async def _wait(request: Request, job: Job):
        """The job's results; cancels it when the client leaves or the request's time runs out."""
        fut = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + limits.timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    metrics.rejected.labels("timeout").inc()
                    raise ApiError(504, f"not finished within the {limits.timeout_s:g} s request timeout")
                done, _ = await asyncio.wait({fut}, timeout=min(0.1, left))
                if done:
                    return _outcome(fut)
                if await request.is_disconnected():
                    metrics.rejected.labels("client_gone").inc()
                    raise ApiError(499, "client disconnected")
        finally:
            if not job.future.done():
                job.cancel()

    def _outcome(fut):
        if fut.cancelled():
            raise ApiError(503, "cancelled: the service is stopping")
        try:
            return fut.result()
        except Cancelled:
            raise ApiError(503, "cancelled: the service is stopping") from None
        except InputError as e:
            raise ApiError(400, str(e)) from None
        except Dalle2RTError as e:  # a non-finite stage, a broken engine: not the client's fault, still one line
            raise ApiError(500, str(e)) from None

    def _respond(results, fmt: str, seed: int, warnings: list[str]):
        if fmt == "png":
            return Response(results[0].png, media_type="image/png", headers={"X-Seed": str(seed)})
        return {"created": int(time.time()), "seed": seed, "data": [_item(r) for r in results],
                "warnings": warnings}

    def _stream(request: Request, job: Job, seed: int, warnings: list[str]) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.listener = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        _submit(job)

        def line(obj) -> bytes:
            return (json.dumps(obj) + "\n").encode()

        async def body():
            fut = asyncio.wrap_future(job.future)
            deadline = time.monotonic() + limits.timeout_s
            try:
                yield line({"event": "queued", "seed": seed, "images": job.size, "warnings": warnings})
                while not fut.done():
                    get = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({get, fut}, timeout=max(0.0, deadline - time.monotonic()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if get in done:
                        yield line(get.result())
                    else:
                        get.cancel()
                    if not done:
                        metrics.rejected.labels("timeout").inc()
                        raise ApiError(504, f"not finished within the {limits.timeout_s:g} s request timeout")
                # The worker thread queues each event before it settles the future (both through the loop's FIFO
                # call_soon_threadsafe), so events still waiting here were sent before the result: send them too.
                while not events.empty():
                    yield line(events.get_nowait())
                for r in _outcome(fut):
                    yield line({"event": "image", **_item(r)})
                yield line({"event": "done", "seed": seed})
            except ApiError as e:
                yield line({"event": "error", "status": e.status, "error": e.message})
            finally:  # also reached when the client disconnects (the generator is closed)
                if not job.future.done():
                    job.cancel()
                    metrics.rejected.labels("client_gone").inc()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/v1/images", summary="Images from text",
              responses={200: {"content": {"image/png": {}, "application/x-ndjson": {}}}})
    async def images(req: ImagesRequest, request: Request):
        options = {o.name: getattr(req, o.name) for o in OPTIONS}

        def checked():  # lengths first, then tokenising (up to ~0.1 s for 16 long prompts): off the event loop
            prompts = _checked_prompts(req.prompt, limits)
            negative = options["negative_prompt"]
            if negative is not None and len(negative) > limits.max_prompt_chars:
                raise InputError(f"the negative prompt may have at most {limits.max_prompt_chars} characters, "
                                 f"got {len(negative)}")
            run = pipe.settings(**options)
            texts = prompts + ([run["negative_prompt"]] if run["negative_prompt"] else [])
            return (prompts, _checked_count(req.n, len(prompts), limits), _checked_seed(req.seed), run,
                    dict(zip(texts, pipe.truncated(texts))))

        try:
            prompts, n, seed, run, cut = await asyncio.to_thread(checked)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        if req.response_format == "png" and n * len(prompts) != 1:
            raise ApiError(400, "response_format png returns one image: ask for n = 1 and one prompt, or use b64_json")
        warnings = [f"{'negative ' if p == run['negative_prompt'] and p not in prompts else ''}prompt truncated to "
                    f"{pipe.tokenizer.context_length - 2} tokens: {p[:60]!r}" for p, c in cut.items() if c]
        job = Job("images", run, options, seed, n, prompts=prompts)
        if req.stream:
            return _stream(request, job, seed, warnings)
        _submit(job)
        return _respond(await _wait(request, job), req.response_format, seed, warnings)

    async def variations(request: Request, image: UploadFile, n: int = 1, seed: int | None = None,
                         response_format: str = "b64_json", **options):
        await _only_fields(request, [p for p in _variations_form().parameters if p != "request"])
        if "image_encoder" not in pipe.manifest.stages:
            raise ApiError(400, f"engine folder {pipe.manifest.name} has no image_encoder; variations need one")
        try:
            n = _checked_count(n, 1, limits)
            seed = _checked_seed(seed)
            run = pipe.settings(**options)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        if response_format == "png" and n != 1:
            raise ApiError(400, "response_format png returns one image: ask for n = 1, or use b64_json")
        _admit(n)
        async with decoding:  # at most max_decodes uploads decoded at once, each on a thread
            source = await asyncio.to_thread(_open_upload, await image.read(), limits.max_image_pixels, encoder_side)
        name = _file_name(image)
        job = Job("variations", run, options, seed, n, source=source, source_name=name)
        _submit(job)
        return _respond(await _wait(request, job), response_format, seed, [])

    variations.__signature__ = _variations_form()  # the form's fields: FastAPI reads this signature
    app.post("/v1/variations", summary="Variations of an uploaded image")(variations)

    upload_side = max(encoder_side or 0, pipe.decoder_plan.x_shape[-1]) or None

    async def _upload(file: UploadFile | None, name: str) -> Image.Image:
        """An uploaded image reduced to what the stages read: a centre square at the larger of the image encoder's
        and the decoder's sides (the CLI's image at that size gives the same pixels)."""
        if file is None:
            raise ApiError(422, f"{name}: Field required")
        async with decoding:
            return await asyncio.to_thread(_open_upload, await file.read(), limits.max_image_pixels, upload_side)

    def _operation_common(seed, decoder_steps, decoder_guidance, refine) -> tuple[int, dict]:
        """The seed and the settings every operation takes, checked as the CLI checks them."""
        settings = ops.operation_settings(pipe, decoder_steps, decoder_guidance, refine)
        return _checked_seed(seed), settings

    def _captions(*texts) -> list[str]:
        for t in texts:
            if len(t) > limits.max_prompt_chars:
                raise InputError(f"a caption may have at most {limits.max_prompt_chars} characters, got {len(t)}")
        return check_prompts(list(texts))

    async def _run_operation(request: Request, job: Job, fmt: str):
        if fmt == "png" and job.size != 1:
            raise ApiError(400, "response_format png returns one image: ask for one, or use b64_json")
        _submit(job)
        return _respond(await _wait(request, job), fmt, job.seed, [])

    @app.post("/v1/edits", summary="A text diff of an uploaded image (unCLIP's edit)")
    async def edits(request: Request,
                    image: Annotated[UploadFile, File(description="the image to edit (PNG, JPEG, …)")],
                    source: Annotated[str, Form(description="a caption of the image as it is")],
                    target: Annotated[str, Form(description="the caption to move it towards")],
                    amount: Annotated[list[float] | None, Form(description="θ in 0 … 1; repeat the field for a "
                                                                           f"sweep (default {ops.DEFAULT_AMOUNT})")]
                    = None,
                    seed: Annotated[int | None, Form()] = None,
                    decoder_steps: Annotated[int | None, Form()] = None,
                    decoder_guidance: Annotated[float | None, Form(
                        description=f"default {ops.DEFAULT_GUIDANCE:g} (unguided: exact inversion)")] = None,
                    refine: Annotated[int | None, Form(description="fixed-point iterations per inversion step")]
                    = None,
                    edit_guidance: Annotated[float | None, Form(
                        description="decoder guidance of the edited frames (default: the folder's)")] = None,
                    text: Annotated[bool, Form(description="condition the decoder on the captions' text")] = True,
                    response_format: Annotated[Literal["b64_json", "png"], Form()] = "b64_json"):
        try:
            seed, settings = _operation_common(seed, decoder_steps, decoder_guidance, refine)
            amounts = ops.check_amounts([ops.DEFAULT_AMOUNT] if not amount else amount)
            if len(amounts) > limits.max_images:
                raise InputError(f"at most {limits.max_images} amounts per request, got {len(amounts)}")
            source, target = _captions(source, target)
            pipe.settings(decoder_guidance=edit_guidance)
        except InputError as e:
            raise ApiError(400, str(e)) from None
        await _only_fields(request, ["image", "source", "target", "amount", "seed", "decoder_steps",
                                     "decoder_guidance", "edit_guidance", "refine", "text", "response_format"])
        _admit(len(amounts))
        picture = await _upload(image, "image")
        name = _file_name(image)

        def work(progress):
            images = ops.edit(pipe, picture, source, target, amount=amounts, seed=seed, text=text, callback=progress,
                              edit_guidance=edit_guidance, **settings)
            for im in images:
                im.info["image"] = name
            return images

        job = Job("edits", {"edit": [source, target, amounts, text, edit_guidance], **settings}, {}, seed,
                  len(amounts), work=work)
        return await _run_operation(request, job, response_format)

    @app.post("/v1/interpolations", summary="Frames between two images or prompts (unCLIP's interpolation)")
    async def interpolations(request: Request,
                             image_a: Annotated[UploadFile | None, File(description="end a as an image")] = None,
                             image_b: Annotated[UploadFile | None, File(description="end b as an image")] = None,
                             prompt_a: Annotated[str | None, Form(description="end a as a prompt (prior)")] = None,
                             prompt_b: Annotated[str | None, Form(description="end b as a prompt (prior)")] = None,
                             frames: Annotated[int, Form(description="frames, both ends included")] = 5,
                             latent: Annotated[Literal["slerp", "fixed"], Form(
                                 description="slerp: the ends reconstruct the inputs; fixed: one latent")] = "slerp",
                             seed: Annotated[int | None, Form()] = None,
                             decoder_steps: Annotated[int | None, Form()] = None,
                             decoder_guidance: Annotated[float | None, Form(
                        description=f"default {ops.DEFAULT_GUIDANCE:g} (unguided: exact inversion)")] = None,
                             refine: Annotated[int | None, Form()] = None,
                             response_format: Annotated[Literal["b64_json"], Form()] = "b64_json"):
        try:
            seed, settings = _operation_common(seed, decoder_steps, decoder_guidance, refine)
            frames = ops.check_frames(frames)
            if frames > limits.max_images:
                raise InputError(f"at most {limits.max_images} frames per request, got {frames}")
            ends = []
            for label, file, prompt in (("a", image_a, prompt_a), ("b", image_b, prompt_b)):
                if (file is None) == (prompt is None):
                    raise InputError(f"give end {label} as either image_{label} or prompt_{label}, not "
                                     f"{'both' if file is not None else 'neither'}")
                ends.append(("prompt", _captions(prompt)[0]) if prompt is not None else ("image", file))
        except InputError as e:
            raise ApiError(400, str(e)) from None
        await _only_fields(request, ["image_a", "image_b", "prompt_a", "prompt_b", "frames", "latent", "seed",
                                     "decoder_steps", "decoder_guidance", "refine", "response_format"])
        _admit(frames)
        names = [v if kind == "prompt" else _file_name(v) for kind, v in ends]
        ends = [(kind, await _upload(v, f"image_{'ab'[j]}") if kind == "image" else v)
                for j, (kind, v) in enumerate(ends)]

        def work(progress):
            inputs = [v if kind == "image" else
                      ops.from_prompt(pipe, v, seed=seed, index=j, decoder_steps=settings["decoder_steps"],
                                      decoder_guidance=settings["decoder_guidance"], callback=progress)
                      for j, (kind, v) in enumerate(ends)]
            images = ops.interpolate(pipe, *inputs, frames=frames, latent=latent, seed=seed, callback=progress,
                                     **settings)
            for im in images:
                im.info.update({"a": names[0], "b": names[1]})
            return images

        job = Job("interpolations", {"interpolate": [prompt_a, prompt_b, frames, latent], **settings}, {}, seed,
                  frames, work=work)
        return await _run_operation(request, job, response_format)

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: engines loaded, not draining")
    async def readyz():
        if service.draining:
            return _error(503, "draining: the service is shutting down")
        return {"ready": True, "engines": pipe.manifest.name, "backend": pipe.backend.describe(),
                "queued_images": service.queued_images(),
                "limits": {"max_images": limits.max_images, "max_prompts": limits.max_prompts,
                           "max_batch": limits.max_batch, "max_queue": limits.max_queue,
                           "timeout_s": limits.timeout_s}}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        from .metrics import CONTENT_TYPE

        return Response(metrics.render(), media_type=CONTENT_TYPE)

    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    return app


def _file_name(upload: UploadFile) -> str:
    """An upload's file name as PNG text may carry it: one line, at most 200 characters, valid Unicode."""
    name = " ".join((upload.filename or "").split())[:200]
    return name.encode("utf-8", "replace").decode("utf-8")


def _encoder_side(pipe) -> int | None:
    """The image encoder's input side (what ``Pipeline.variations`` resizes an image to), None without one."""
    stage = pipe.manifest.stages.get("image_encoder")
    if stage is None:
        return None
    return int(stage.get("image_size") or pipe.engines[stage["graph"]].spec.inputs[0].shape[-1])


def _open_upload(data: bytes, max_pixels: int, side: int | None) -> Image.Image:
    """The uploaded image as the image encoder will see it; anything else is a 400 (a decompression bomb a 413).

    Only the encoder's input is kept: ``to_pixels``' own centre crop and bicubic resize to ``side``, done here,
    so a queued job holds side² RGB pixels (12 KB at 64) instead of the decoded upload. ``Pipeline.variations``
    repeats both steps on it as identities, so the pixels are those of the full image."""
    if not data:
        raise ApiError(400, "the uploaded image is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise ApiError(413, f"the uploaded image has {im.width}×{im.height} pixels, over {max_pixels}")
            im.load()
            rgb = im.convert("RGB")
    except Image.DecompressionBombError:  # PIL's own guard, before ours, for headers claiming > 179 M pixels
        raise ApiError(413, f"the uploaded image has over {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(400, "the upload is not an image PIL can read") from None
    if side is None:
        return rgb
    w, h = rgb.size
    edge = min(w, h)
    left, top = (w - edge) // 2, (h - edge) // 2
    return rgb.crop((left, top, left + edge, top + edge)).resize((side, side), Image.Resampling.BICUBIC)
