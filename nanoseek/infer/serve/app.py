"""`nanoseek serve --model PATH`: an OpenAI-compatible HTTP server with a web chat page.

    GET  /                      the chat page (one static HTML file; the server serves no other file)
    GET  /health                {"status": "ok", ...} or 503 when the engine thread died
    GET  /v1/models
    POST /v1/chat/completions   stream or not; n, temperature, top_p, max_tokens, stop, seed, ...;
                                the reasoning comes back as `reasoning_content` (DeepSeek's API);
                                extensions: thinking (bool), verify (N chains), routing (experts per token);
                                images (a VL checkpoint): `image_url` content parts in user messages
    POST /v1/completions        plain text completion
    POST /v1/feedback           thumbs up/down + comment, stored in SQLite (`nanoseek feedback export`)
    POST /v1/moderations        OpenAI's moderation API over the curation classifiers (toxicity, PII)
    POST /admin/reload          serve another checkpoint ({"model": PATH}; needs --api-key)

Moderation (`--moderation flag|block|off`, default flag) screens each prompt's last user turn and each answer:
flag serves and records the event in the feedback store; block answers a flagged prompt or answer with an
OpenAI-style refusal (HTTP 200, `finish_reason: "content_filter"`) and redacts PII from answers. Access
(`Access`): with --api-key every /v1/* and /admin/* route needs `Authorization: Bearer KEY` (401); POST bodies
must be application/json (415) and come from the server's own page or an --allowed-origins origin (403), which
also gets CORS answers (a browser's preflight) so that a page served elsewhere can call the API.

Images. A user message's content parts may hold `{"type": "image_url", "image_url": {"url": "data:image/png;
base64,..."}}` (`file://` URLs only under --allow-local-images DIR; http(s) is never fetched). Each image part
becomes an `<image>` placeholder (and a newline) at its place in the message, expanded to the model's image tokens,
and the decoded pixels ride with the engine request, whose prefill writes their features over the placeholders
(`nanoseek.infer.engine`). Images are decoded off the event loop and checked before anything is queued
(`nanoseek.infer.images`: format, --max-image-pixels, truncation, data URL syntax, at most --max-images); a bad one
is a 400 naming its `messages[i].content[j]`, and a text-only model refuses any image with a 400.

Concurrent requests share forward passes (continuous batching, `worker.EngineWorker`). Limits: body size (413),
prompt length, max_tokens cap, n <= the engine's batch, a bounded queue (429 when full, 503 when the engine died).
Every invalid request gets a 400 with an OpenAI-style error body that says which field is wrong and why (the
ranges: `protocol`); a request that fails inside the engine gets a 500 (or, streaming, an error event) and fails
alone. A client that goes away stops its generation, streaming or not. Prompts are tokenised off the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.data.curate.images import MAX_PIXELS
from nanoseek.data.curate.pii import redact
from nanoseek.data.tokenizer import IMAGE_TOKEN
from nanoseek.infer.engine import Backend, TokenEvent
from nanoseek.infer.engine import Request as EngineRequest
from nanoseek.infer.images import ImageError, load_image_url
from nanoseek.infer.moderation import MODES, Moderator
from nanoseek.infer.reasoning import ReasoningSplitter, split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.serve.feedback import FeedbackStore
from nanoseek.infer.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    ModerationRequest,
    ReloadRequest,
    SamplingFields,
    validation_message,
)
from nanoseek.infer.serve.worker import EngineWorker, GenerationFailed, QueueFull, WorkerDead
from nanoseek.infer.verify import judge
from nanoseek.model.vision import to_pixels


@dataclass
class Limits:
    max_body_bytes: int = 2**20  # larger request bodies get 413 before they are read
    max_prompt_tokens: int = 2048
    max_tokens_cap: int = 1024  # largest max_tokens a request may ask for (and the default)
    max_queue: int = 64  # samples waiting beyond the running batch before 429
    verify_threshold: float = 0.5
    max_images: int = 8  # image parts per chat request
    max_image_pixels: int = MAX_PIXELS  # width x height, read from the header before decoding
    local_images_dir: Path | None = None  # file:// image URLs are read under this directory only (None: refused)


@dataclass
class Access:
    """Who may call. With an API key every /v1/* and /admin/* route needs `Authorization: Bearer KEY` (401
    otherwise, as OpenAI and vLLM answer); admin routes exist only on a server that has a key. Write routes
    (POST) take only `application/json` bodies (415 otherwise): a form or `text/plain` POST, which any web page
    may send to any server without a CORS preflight, cannot write a rating. A POST that carries an `Origin`
    header (browsers send one) must come from the server's own page or from an origin in `allowed_origins`
    ("*": any)."""

    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()

    def check(self, request: Request) -> ApiError | None:
        path = request.url.path
        if path.startswith("/admin/") and not self.api_key:
            return ApiError("admin routes need a server started with --api-key (or NANOSEEK_API_KEY)", status=403,
                            kind="permission_error", code="admin_disabled")
        if self.api_key and path.startswith(("/v1/", "/admin/")):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return ApiError("missing or incorrect API key: send the header Authorization: Bearer KEY",
                                status=401, code="invalid_api_key")
        if request.method == "POST":
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return ApiError(f"request bodies must be application/json, not {media or 'untyped'}", status=415,
                                code="unsupported_media_type")
            origin = request.headers.get("origin")
            if origin is not None and not self.origin_allowed(origin, request.headers.get("host", "")):
                return ApiError(f"requests from the web origin {origin!r} are not allowed (start the server with "
                                f"--allowed-origins {origin} to allow them)", status=403, kind="permission_error",
                                code="origin_not_allowed")
        return None

    def origin_allowed(self, origin: str, host: str) -> bool:
        return urlsplit(origin).netloc == host or origin in self.allowed_origins or "*" in self.allowed_origins


class Guard:
    """ASGI middleware answering what `Access` refuses before any route runs. Plain ASGI, not Starlette's
    BaseHTTPMiddleware, which would hide a client's disconnect from the routes that watch for it."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refused = self.access.check(Request(scope))
            if refused is not None:
                await JSONResponse(refused.body(), status_code=refused.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


DISCONNECT_POLL_S = 0.25  # how often a non-streaming call checks that its client is still there
REFUSAL = "I can't help with that."  # what a blocked prompt or answer gets (`finish_reason: "content_filter"`)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _with_error_event(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events that end, if generation fails after the response began (its 200 is already sent), with
    an OpenAI-style {"error": ...} event rather than a connection cut without a word."""
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk
        except ApiError as e:
            yield _sse(e.body())
        except Exception as e:
            yield _sse(ApiError(f"internal error: {e!r}", status=500, kind="server_error").body())


class Server:
    """The routes' shared state: backend + worker thread, limits, feedback store."""

    def __init__(self, backend: Backend, model_name: str, limits: Limits, feedback: FeedbackStore | None,
                 moderation: str = "flag", loader: Callable[[str | None], Backend] | None = None):
        if moderation not in MODES:
            raise ValueError(f"--moderation {moderation!r}: expected one of {', '.join(MODES)}")
        self.backend, self.tokenizer, self.model_name = backend, backend.tokenizer, model_name
        self.limits, self.feedback, self.moderation = limits, feedback, moderation
        self.moderator = Moderator()
        self.worker = EngineWorker(backend, limits.max_queue)
        self.retiring: list[EngineWorker] = []  # replaced by a reload, finishing the requests they hold
        self.loader = loader
        self.created = int(time.time())

    # --- moderation -------------------------------------------------------------------------------
    async def screen(self, stage: str, messages: list[dict], text: str) -> dict | None:
        """With moderation on: the moderation result of a prompt or completion text when it is flagged (or holds
        PII), recorded in the feedback store with the action taken; None when it is clean. Scored off the event
        loop (a long text takes the classifier a while)."""
        if self.moderation == "off" or not text:
            return None
        result = await asyncio.to_thread(self.moderator, text)
        if not (result["flagged"] or result["categories"]["pii"]):
            return None
        action = "block" if self.moderation == "block" and result["flagged"] else "flag"
        if self.feedback is not None:
            self.feedback.add_feedback("moderation", messages, text if stage == "completion" else "",
                                       meta={"stage": stage, "action": action, **result})
        return result

    def blocks(self, result: dict | None) -> bool:
        return self.moderation == "block" and result is not None and result["flagged"]

    def clean(self, text: str, result: dict | None) -> str:
        """A completion as served: PII redacted when the server blocks and the text holds some."""
        if self.moderation == "block" and result is not None and result["categories"]["pii"]:
            return redact(text)[0]
        return text

    # --- request checking ------------------------------------------------------------------------
    async def parse(self, request: Request, model: type[BaseModel]):
        body = await self.read_body(request)
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            message, param = validation_message(e.errors(include_url=False))
            raise ApiError(message, param) from None

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past `max_body_bytes`: by its Content-Length before reading a byte, and
        while reading (a chunked body declares no length)."""
        limit = self.limits.max_body_bytes
        too_large = ApiError(f"the request body is larger than this server's limit of {limit} bytes", status=413,
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdecimal() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def params(self, req: SamplingFields, prompt_len: int, max_tokens: int | None, n: int,
               n_field: str = "n") -> SamplingParams:
        lim = self.limits
        if prompt_len > lim.max_prompt_tokens:
            raise ApiError(f"the prompt has {prompt_len} tokens; this server accepts at most "
                           f"{lim.max_prompt_tokens}", "messages" if isinstance(req, ChatRequest) else "prompt")
        room = self.backend.max_len - prompt_len
        if max_tokens is not None and max_tokens > lim.max_tokens_cap:
            raise ApiError(f"max_tokens={max_tokens} exceeds this server's cap of {lim.max_tokens_cap}",
                           "max_tokens")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(f"the model's context is {self.backend.max_len} tokens: {prompt_len} in the prompt "
                           f"leave room for {room}, not max_tokens={max_tokens}", "max_tokens")
        if room < 1:
            raise ApiError(f"the prompt fills the model's context ({self.backend.max_len} tokens)", "messages")
        if n > self.backend.max_batch:
            raise ApiError(f"{n_field}={n} exceeds this server's batch of {self.backend.max_batch}", n_field)
        try:
            return SamplingParams(max_tokens=max_tokens or min(lim.max_tokens_cap, room),
                                  temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                  repetition_penalty=req.repetition_penalty, seed=req.seed, n=n, stop=req.stop,
                                  ignore_eos=req.ignore_eos)
        except ValueError as e:
            raise ApiError(str(e)) from None

    def submit(self, requests: list[EngineRequest]) -> asyncio.Queue:
        try:
            return self.worker.submit(requests)
        except QueueFull as e:
            raise ApiError(str(e), status=429, kind="rate_limit_error", code="queue_full") from None
        except WorkerDead as e:
            raise ApiError(str(e), status=503, kind="server_error", code="engine_unavailable") from None

    async def events(self, queue: asyncio.Queue, requests: list[EngineRequest],
                     client: Request | None = None) -> AsyncIterator[TokenEvent]:
        """Yield the events of submitted requests until all are finished; the requests are aborted if the caller
        stops early (a streaming client that disconnects: the response's writes fail). A non-streaming call
        writes nothing until the end, so it passes its `client` to be watched while it waits."""
        done = False
        watcher = asyncio.create_task(self.watch(client, queue)) if client is not None else None
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, ApiError):
                    raise item
                if isinstance(item, ValueError):
                    raise ApiError(str(item))
                if isinstance(item, GenerationFailed):
                    raise ApiError(f"generation failed: {item}", status=500, kind="server_error")
                if isinstance(item, BaseException):
                    raise ApiError(f"generation failed: {item!r}", status=500, kind="server_error")
                yield item
            done = True
        finally:
            if watcher is not None:
                watcher.cancel()
            if not done:
                for worker in (self.worker, *self.retiring):  # whichever holds them (a reload may have come)
                    worker.cancel(requests)

    @staticmethod
    async def watch(client: Request, queue: asyncio.Queue) -> None:
        """Check every DISCONNECT_POLL_S that the client is still connected; when it is not, end its call with a
        499 (nginx's "client closed request"; nobody reads it)."""
        while not await client.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        queue.put_nowait(ApiError("the client closed the connection", status=499, code="client_closed"))

    # --- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, request: Request):
        req: ChatRequest = await self.parse(request, ChatRequest)
        pixels = await self.images(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:  # in a thread: a long prompt takes the tokenizer a while, and the event loop serves every client
            if pixels is None:
                prompt = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages,
                                                 add_generation_prompt=True, thinking=req.thinking)
            else:  # each <image> expands to the model's image tokens
                prompt = (await asyncio.to_thread(self.tokenizer.encode_chat, messages, True, req.thinking,
                                                  self.backend.image_tokens))[0]
        except ValueError as e:
            raise ApiError(str(e), "messages") from None
        if req.verify and (req.stream or req.n > 1):
            raise ApiError("verify returns one consensus answer: it cannot be combined with stream or n > 1",
                           "verify")
        n = req.verify or req.n
        params = self.params(req, len(prompt), req.max_completion_tokens or req.max_tokens, n,
                             "verify" if req.verify else "n")
        engine_req = EngineRequest(prompt, params, routing=req.routing, images=pixels)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if self.blocks(await self.screen("prompt", messages, last_user)):
            return self.refusal(cid, n, req.stream)
        queue = self.submit([engine_req])  # before any response byte: a full queue is a 429, not a broken stream
        if req.stream:
            return StreamingResponse(_with_error_event(self.chat_stream(req, engine_req, queue, cid, messages)),
                                     media_type="text/event-stream")
        texts, reasons, routing, generated = [""] * n, ["stop"] * n, [[] for _ in range(n)], 0
        async for ev in self.events(queue, [engine_req], request):
            texts[ev.index] += ev.text
            generated += ev.token is not None
            if ev.finish_reason:
                reasons[ev.index] = ev.finish_reason
            if req.routing and ev.token is not None:
                routing[ev.index].append(self.route_entry(ev))
        opened = "<think>\n" if req.thinking else ""
        raw = [opened + t for t in texts]
        usage = {"prompt_tokens": len(prompt), "completion_tokens": generated,
                 "total_tokens": len(prompt) + generated}
        body = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "usage": usage}
        if req.verify:
            verdict = judge(raw, self.limits.verify_threshold)
            reasoning = split_reasoning(raw[verdict.chosen], thinking=False)[0] if verdict.sure else ""
            body["choices"] = [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                "message": {"role": "assistant", "content": verdict.reply,
                                            "reasoning_content": reasoning}}]
            body["verification"] = verdict.to_dict()
            if not verdict.sure and self.feedback is not None:
                self.feedback.add_feedback("low_confidence", messages, verdict.completions[verdict.chosen or 0],
                                           meta=verdict.to_dict())
        else:
            choices = []
            for i in range(n):
                verdict = await self.screen("completion", messages, raw[i])
                if self.blocks(verdict):
                    choices.append(self.refused_choice(i))
                    continue
                raw[i] = self.clean(raw[i], verdict)
                reasoning, content = split_reasoning(raw[i], thinking=False)
                choice = {"index": i, "finish_reason": reasons[i], "logprobs": None,
                          "message": {"role": "assistant", "content": content, "reasoning_content": reasoning}}
                if req.routing:
                    choice["routing"] = routing[i]
                choices.append(choice)
                self.remember(cid, i, messages, raw[i])
            body["choices"] = choices
        return JSONResponse(body)

    async def images(self, req: ChatRequest):
        """The pixels [k, 3, S, S] of the request's image parts in reading order (None without images), or a 400:
        a text-only model, an image outside a user message, too many, or one that does not decode
        (`nanoseek.infer.images`). Decoded in a thread: a large image takes a while, the event loop serves all."""
        found = [(i, j, url) for i, m in enumerate(req.messages) for j, url in m.images()]
        vl = self.backend.image_tokens > 0
        for i, m in enumerate(req.messages):  # a VL tokenizer reads "<image>" as the placeholder id
            if vl and m.text().count(IMAGE_TOKEN) != len(m.images()):
                raise ApiError(f"messages[{i}]: the text holds {IMAGE_TOKEN!r}, which this model reserves for "
                               "images; send images as image_url content parts", "messages")
        if not found:
            return None
        if not vl:
            raise ApiError(f"this model takes no images: {self.model_name} is a text-only model (send text "
                           "content only)", "messages", code="images_not_supported")
        for i, j, _ in found:
            if req.messages[i].role != "user":
                raise ApiError(f"messages[{i}].content[{j}]: images go in user messages, not in a "
                               f"{req.messages[i].role} message", "messages")
        lim = self.limits
        if len(found) > lim.max_images:
            raise ApiError(f"the request holds {len(found)} images; this server accepts at most {lim.max_images}",
                           "messages")
        def decode():
            return to_pixels([load_image_url(url, f"messages[{i}].content[{j}]", lim.max_image_pixels,
                                             lim.local_images_dir) for i, j, url in found], self.backend.image_size)

        try:
            return await asyncio.to_thread(decode)
        except ImageError as e:
            raise ApiError(str(e), "messages", code="invalid_image") from None

    async def chat_stream(self, req: ChatRequest, engine_req: EngineRequest, queue: asyncio.Queue, cid: str,
                          messages: list[dict]) -> AsyncIterator[str]:
        n, created = engine_req.params.n, int(time.time())
        splitters = [ReasoningSplitter(bool(req.thinking)) for _ in range(n)]
        raw = ["<think>\n" if req.thinking else ""] * n
        tokens = 0

        def chunk(index: int, delta: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "choices": [choice]})

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        # block: a sample's text is held back and screened at every line end and at its end, so nothing the
        # filter would withhold is ever sent (streaming moves a line at a time); flag: screened at the end
        block = self.moderation == "block"
        held, held_routes, filtered = [""] * n, [[] for _ in range(n)], set()
        async for ev in self.events(queue, [engine_req]):
            i = ev.index
            if i in filtered:
                continue
            raw[i] += ev.text
            tokens += ev.token is not None
            routes = [self.route_entry(ev)] if req.routing and ev.token is not None else []
            text = ev.text
            if block:
                held[i] += ev.text
                held_routes[i] += routes
                if "\n" not in ev.text and not ev.finish_reason:
                    continue
                if self.blocks(await self.screen("completion", messages, raw[i])):
                    filtered.add(i)
                    yield chunk(i, {"refusal": REFUSAL})
                    yield chunk(i, {}, "content_filter")
                    if len(filtered) == n:
                        break  # the request is aborted when this loop stops
                    continue
                text, held[i], routes, held_routes[i] = held[i], "", held_routes[i], []
            elif ev.finish_reason:
                await self.screen("completion", messages, raw[i])
            reasoning, content = splitters[i].feed(text)
            if ev.finish_reason:
                r2, c2 = splitters[i].flush()
                reasoning, content = reasoning + r2, content + c2
            delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
            if delta or routes:
                yield chunk(i, delta, **({"routing": routes[0]} if routes else {}))
            for route in routes[1:]:
                yield chunk(i, {}, routing=route)
            if ev.finish_reason:
                yield chunk(i, {}, ev.finish_reason)
                self.remember(cid, i, messages, raw[i])
        if req.stream_options is not None and req.stream_options.include_usage:
            prompt_tokens = len(engine_req.prompt)
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                                 "total_tokens": prompt_tokens + tokens}})
        yield _sse("[DONE]")

    @staticmethod
    def refused_choice(index: int) -> dict:
        """OpenAI's shape for an answer the content filter withheld."""
        return {"index": index, "finish_reason": "content_filter", "logprobs": None,
                "message": {"role": "assistant", "content": None, "refusal": REFUSAL, "reasoning_content": ""}}

    def refusal(self, cid: str, n: int, stream: bool):
        """The whole answer to a blocked prompt: HTTP 200, every choice finished by the content filter."""
        created = int(time.time())
        if not stream:
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                                 "model": self.model_name, "choices": [self.refused_choice(i) for i in range(n)],
                                 "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events() -> AsyncIterator[str]:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "refusal": REFUSAL})
                yield chunk(i, {}, "content_filter")
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def route_entry(self, ev: TokenEvent) -> dict:
        return {"token": self.tokenizer.decode([ev.token]), "experts": ev.experts}

    def remember(self, cid: str, index: int, messages: list[dict], completion: str) -> None:
        if self.feedback is not None:
            self.feedback.add_completion(cid, index, self.model_name, messages, completion)

    # --- /v1/completions ------------------------------------------------------------------------
    async def completions(self, request: Request):
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        token_ids = not isinstance(req.prompt, str) and isinstance(req.prompt[0], int)
        texts = [] if token_ids else [req.prompt] if isinstance(req.prompt, str) else req.prompt
        count = 1 if token_ids else len(texts)
        if count * req.n > self.backend.max_batch + self.limits.max_queue:  # before tokenising thousands of them
            raise ApiError(f"{count} prompts x n={req.n} is more than this server queues", "prompt")
        if not token_ids:  # in a thread, as for chat: the event loop serves every client
            prompts = await asyncio.to_thread(lambda: [self.tokenizer.encode(t, bos=True) for t in texts])
        else:
            prompts = [list(req.prompt)]
            limit = self.tokenizer.vocab_size
            bad = [t for t in prompts[0] if not 0 <= t < limit]
            if bad:
                raise ApiError(f"prompt token id {bad[0]} is outside the vocabulary [0, {limit})", "prompt")
        reqs = [EngineRequest(p, self.params(req, len(p), req.max_tokens, req.n)) for p in prompts]
        order = {r.id: k for k, r in enumerate(reqs)}
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        for text in texts:
            if self.blocks(await self.screen("prompt", [{"role": "user", "content": text}], text)):
                total = len(prompts) * req.n
                return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                                     "model": self.model_name, "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                                         "total_tokens": 0},
                                     "choices": [{"index": i, "text": "", "finish_reason": "content_filter",
                                                  "logprobs": None} for i in range(total)]})

        def index(ev: TokenEvent) -> int:
            return order[ev.request_id] * req.n + ev.index

        queue = self.submit(reqs)

        if req.stream:
            async def stream() -> AsyncIterator[str]:
                def chunk(i: int, text: str, finish: str | None = None) -> str:
                    return _sse({"id": cid, "object": "text_completion", "created": created,
                                 "model": self.model_name,
                                 "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}]})

                # as in chat: block holds each sample's text back until it is screened at a line end or its end
                total = len(prompts) * req.n
                text, held, withheld = [""] * total, [""] * total, set()
                async for ev in self.events(queue, reqs):
                    i = index(ev)
                    if i in withheld:
                        continue
                    text[i] += ev.text
                    held[i] += ev.text
                    if self.moderation == "block" and "\n" not in ev.text and not ev.finish_reason:
                        continue
                    if ev.finish_reason or self.moderation == "block":
                        if self.blocks(await self.screen("completion", [], text[i])):
                            withheld.add(i)
                            yield chunk(i, "", "content_filter")
                            continue
                    if held[i] or ev.finish_reason:
                        yield chunk(i, held[i], ev.finish_reason)
                    held[i] = ""
                yield _sse("[DONE]")

            return StreamingResponse(_with_error_event(stream()), media_type="text/event-stream")
        total = len(prompts) * req.n
        outputs, reasons, counts = [""] * total, ["stop"] * total, 0
        async for ev in self.events(queue, reqs, request):
            outputs[index(ev)] += ev.text
            counts += ev.token is not None
            if ev.finish_reason:
                reasons[index(ev)] = ev.finish_reason
        prompt_tokens = sum(len(p) for p in prompts)
        for i in range(total):
            verdict = await self.screen("completion", [], outputs[i])
            if self.blocks(verdict):
                outputs[i], reasons[i] = "", "content_filter"
            else:
                outputs[i] = self.clean(outputs[i], verdict)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"index": i, "text": outputs[i], "finish_reason": reasons[i], "logprobs": None}
                        for i in range(total)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": counts,
                      "total_tokens": prompt_tokens + counts}})

    # --- /v1/moderations ------------------------------------------------------------------------
    async def moderations(self, request: Request):
        """OpenAI's moderation endpoint: `input` a string or a list of strings; one result per string."""
        req: ModerationRequest = await self.parse(request, ModerationRequest)
        texts = [req.input] if isinstance(req.input, str) else req.input
        results = await asyncio.to_thread(lambda: [self.moderator(t) for t in texts])
        return {"id": f"modr-{uuid.uuid4().hex}", "model": "nanoseek-moderation", "results": results}

    # --- /admin/reload --------------------------------------------------------------------------
    async def reload(self, request: Request):
        """Serve another checkpoint (`{"model": PATH}`; default: the --model path again, whose latest checkpoint
        may be new). New requests go to the new model at once; requests already running finish on the old one,
        whose worker stops when they are done."""
        if self.loader is None:
            raise ApiError("this server was not started with a checkpoint path to reload", status=404,
                           kind="not_found")
        req: ReloadRequest = await self.parse(request, ReloadRequest)
        try:
            backend = await asyncio.to_thread(self.loader, req.model)
        except (OSError, ValueError) as e:
            raise ApiError(f"cannot load {req.model or 'the model'}: {e}", "model") from None
        worker = EngineWorker(backend, self.limits.max_queue)
        worker.start()
        old, self.worker = self.worker, worker
        self.backend, self.tokenizer = backend, backend.tokenizer
        self.retiring.append(old)
        asyncio.get_running_loop().create_task(self.retire(old))
        return {"object": "reload", "model": self.model_name, "path": req.model or "(the --model path)"}

    async def retire(self, worker: EngineWorker) -> None:
        while worker.load and worker.error is None:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(worker.stop)
        self.retiring.remove(worker)

    # --- /v1/feedback ---------------------------------------------------------------------------
    async def add_feedback(self, request: Request):
        if self.feedback is None:
            raise ApiError("this server was started without a feedback database", status=404, kind="not_found")
        req: FeedbackRequest = await self.parse(request, FeedbackRequest)
        if req.completion_id is not None:
            found = self.feedback.completion(req.completion_id, req.choice)
            if found is None:
                raise ApiError(f"no completion {req.completion_id!r} (choice {req.choice}) on this server",
                               "completion_id")
            messages, completion = found
        elif req.messages is not None and req.response is not None:
            messages, completion = [{"role": m.role, "content": m.text()} for m in req.messages], req.response
        else:
            raise ApiError("give completion_id, or messages and response", "completion_id")
        # a rating of an answer this server gave is verified; one of a conversation the client sends could say
        # anything, so the export leaves it out unless asked (--include-unverified)
        verified = req.completion_id is not None
        fid = self.feedback.add_feedback("rating", messages, completion, req.rating, req.comment,
                                         req.completion_id, meta={"verified": verified})
        return {"id": fid, "object": "feedback", "verified": verified}


def create_app(backend: Backend, model_name: str = "nanoseek", limits: Limits | None = None,
               feedback: FeedbackStore | None = None, access: Access | None = None,
               moderation: str = "flag", loader: Callable[[str | None], Backend] | None = None) -> FastAPI:
    """The FastAPI app around a backend (its worker thread starts and stops with the app). `loader(path)` builds
    the backend of another checkpoint for /admin/reload (path None: the one served at start, reread)."""
    server = Server(backend, model_name, limits or Limits(), feedback, moderation, loader)
    access = access or Access()
    page = resources.files("nanoseek.infer.serve").joinpath("index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.worker.start()
        if server.moderation != "off":  # train the classifier now, not inside the first request
            await asyncio.to_thread(lambda: server.moderator.classifier)
        yield
        for worker in (server.worker, *server.retiring):
            worker.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    app.add_middleware(Guard, access=access)
    if access.allowed_origins:  # outermost: a browser's preflight for an allowed origin is answered before Guard
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(access.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(str(e.detail), status=e.status_code, kind=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_request: Request, e: Exception):
        return JSONResponse(ApiError(f"internal error: {e!r}", status=500, kind="server_error").body(),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        return JSONResponse(ApiError(message, param).body(), status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        worker = server.worker
        if worker.error is not None or not worker.thread.is_alive():
            return JSONResponse({"status": "error", "error": repr(worker.error)}, status_code=503)
        return {"status": "ok", "model": model_name, "load": worker.load, "max_batch": server.backend.max_batch,
                "cancelled": worker.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "nanoseek", "max_model_len": server.backend.max_len}]}

    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/feedback")(server.add_feedback)
    app.post("/v1/moderations")(server.moderations)
    app.post("/admin/reload")(server.reload)
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint, run directory (latest checkpoint) or HF dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None, help="model id reported by /v1/models (default: directory name)")
    parser.add_argument("--max-batch", type=int, default=8, help="samples decoded together (cache rows)")
    parser.add_argument("--max-len", type=int, default=None, help="context per sample (default: the model's)")
    parser.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="larger request bodies "
                        "get 413")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="default: context - 1")
    parser.add_argument("--max-tokens-cap", type=int, default=1024)
    parser.add_argument("--max-queue", type=int, default=64, help="waiting samples before 429")
    parser.add_argument("--verify-threshold", type=float, default=0.5, help="agreement below which verify says "
                        "it is not sure")
    parser.add_argument("--feedback-db", default="nanoseek-feedback.sqlite", help="SQLite file ('' disables)")
    parser.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    parser.add_argument("--moderation", choices=MODES, default="flag", help="screen prompts and answers for "
                        "toxicity and PII: flag (serve and record in the feedback store), block (refuse with "
                        "finish_reason content_filter, redact PII from answers) or off")
    parser.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1/* and /admin/* (default: $NANOSEEK_API_KEY)")
    parser.add_argument("--allowed-origins", default="", help="comma-separated web origins, besides the server's "
                        "own page, that may POST (e.g. http://localhost:3000; '*' for any)")
    parser.add_argument("--allow-local-images", default=None, metavar="DIR", help="a VL model may read images "
                        "from file:// URLs under DIR (default: file URLs are refused; data: URLs always work, "
                        "http(s) URLs never: the server makes no network requests)")
    parser.add_argument("--max-images", type=int, default=Limits.max_images, help="image parts per chat request")
    parser.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels, help="largest image "
                        "(width x height, from its header, before decoding); images travel inside the request "
                        "body, so large ones may also need a larger --max-body-bytes")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from nanoseek.infer.engine import load_engine

    def loader(path: str | None = None):
        return load_engine(path or args.model, max_batch=args.max_batch, max_len=args.max_len,
                           speculative=args.speculative)

    local = Path(args.allow_local_images) if args.allow_local_images else None
    for bad, why in ((local is not None and not local.is_dir(), f"--allow-local-images {local}: not a directory"),
                     (args.max_images < 0, f"--max-images {args.max_images}: must be 0 or more"),
                     (args.max_image_pixels < 1, f"--max-image-pixels {args.max_image_pixels}: must be positive")):
        if bad:
            print(f"nanoseek serve: error: {why}", file=sys.stderr)
            return 2
    engine = loader()
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens or engine.max_len - 1,
                    max_tokens_cap=args.max_tokens_cap, max_queue=args.max_queue,
                    verify_threshold=args.verify_threshold, max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, local_images_dir=local)
    feedback = FeedbackStore(args.feedback_db) if args.feedback_db else None
    name = args.name or Path(args.model).resolve().name
    print(f"nanoseek serve: {name} on http://{args.host}:{args.port}/ (feedback: {args.feedback_db or 'off'})",
          file=sys.stderr)
    access = Access(args.api_key or None, tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()))
    app = create_app(engine, name, limits, feedback, access, args.moderation, loader)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
