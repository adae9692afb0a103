"""The HTTP side: OpenAI's chat/completions API over the engine, with FastAPI.

Every error a client can cause is answered with OpenAI's error object
({"error": {"message", "type", "param", "code"}}) and a 4xx status; a request never
reaches the engine unless it can be served to the end within the context.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from verlite.data.formatting import encode_prompt
from verlite.errors import VerliteError
from verlite.serve.engine import EngineStopped, Event, QueueFull, TooLarge
from verlite.serve.engine import Request as EngineRequest
from verlite.serve.loading import Served, load_served
from verlite.serve.sampling import SamplingParams
from verlite.serve.schemas import ChatRequest, CompletionRequest, Sampling

log = logging.getLogger("verlite.serve")

DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def create_app(checkpoint: Optional[str] = None, *, served: Optional[Served] = None, api_key: Optional[str] = None,
               **load_kwargs) -> FastAPI:
    """A FastAPI app serving `checkpoint` (and `loras={name: path}`, see `load_served` for the
    other keywords), or an already loaded `served`. Mount it in your own app or run it with
    uvicorn; the engine thread starts with the first request or the app's startup."""
    if served is None:
        if checkpoint is None:
            raise VerliteError("create_app needs a checkpoint (or served=)")
        served = load_served(checkpoint, **load_kwargs)
    engine = served.engine

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # in-flight requests have drained by now

    app = FastAPI(title="verlite serve", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    if api_key:
        app.add_middleware(KeyCheck, api_key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "verlite",
                                            "root": name} for name in served.models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await complete(request, body, messages, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give one prompt per request (a string)", param="prompt")
            prompt = prompt[0]
        return await complete(request, body, prompt, body.max_tokens, chat=False)

    async def complete(request: Request, body: Sampling, prompt, max_tokens: Optional[int], chat: bool):
        if body.model not in served.models:
            raise ApiError(404, f"the model '{body.model}' does not exist; served: {', '.join(served.models)}",
                           param="model", code="model_not_found")
        try:
            prompt_ids = encode_prompt(served.tokenizer, prompt)
        except VerliteError as e:
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        params = sampling_params(body, len(prompt_ids), max_tokens)
        loop = asyncio.get_running_loop()
        events = Inbox(loop)
        job = EngineRequest(prompt_ids, params, served.models[body.model], events.put, loop=loop)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"too many requests waiting: {e}; retry later", code="queue_full",
                           kind="rate_limit_error") from None
        except TooLarge as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), code="shutting_down", kind="server_error") from None
        stream = follow(request, job, events)
        reply = Reply(body.model, chat, len(prompt_ids), params.n)
        if body.stream:
            return StreamingResponse(reply.sse(stream), media_type="text/event-stream")
        return await reply.whole(stream)

    async def follow(request: Request, job: EngineRequest, events: "Inbox") -> AsyncIterator[Event]:
        """The request's events until all its choices finish; the engine drops it if the client leaves."""
        open_choices = job.params.n
        checked = time.monotonic()
        try:
            while open_choices > 0:
                arrived = await events.take(DISCONNECT_POLL_S)
                if time.monotonic() - checked > DISCONNECT_POLL_S:  # also while tokens keep coming
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                for event in merge(arrived):
                    open_choices -= event.finish_reason is not None
                    yield event
        finally:
            if open_choices > 0:
                engine.abort(job.id)

    def sampling_params(body: Sampling, prompt_len: int, max_tokens: Optional[int]) -> SamplingParams:
        room = served.max_model_len - prompt_len
        if room <= 0:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; the context (--max_model_len) is "
                                f"{served.max_model_len}", param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be at least 1 (got {max_tokens})", param="max_tokens")
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens exceed the context "
                                f"of {served.max_model_len}; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        if body.n > served.max_num_seqs:
            raise ApiError(400, f"n {body.n} is more than the server's --max_num_seqs {served.max_num_seqs}",
                           param="n")
        return SamplingParams(max_tokens=max_tokens or room, temperature=body.temperature or 0.0,
                              top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed,
                              stop=body.stop_strings(), n=body.n, ignore_eos=body.ignore_eos)

    return app


class Inbox:
    """A request's events, filled on the event loop by the engine's one hand-over per step.
    Lighter than asyncio.Queue + wait_for (which makes a task per wait): one future per wait."""

    def __init__(self, loop):
        self.loop, self.items, self.waiter = loop, [], None

    def put(self, event: Event) -> None:
        self.items.append(event)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self, timeout: float) -> list[Event]:
        """Everything that arrived, waiting up to `timeout` s for something (else [])."""
        if not self.items:
            self.waiter = waiter = self.loop.create_future()
            alarm = self.loop.call_later(timeout, lambda: waiter.done() or waiter.set_result(None))
            try:
                await waiter
            finally:
                alarm.cancel()
                self.waiter = None
        items, self.items = self.items, []
        return items


def merge(events: list[Event]) -> list[Event]:
    """Events that queued up while the loop was busy, as one per choice (text joined, the last
    count and finish reason): a server behind on sending catches up in fewer, larger chunks."""
    if len(events) < 2:
        return events
    merged: dict[int, Event] = {}
    for event in events:
        last = merged.get(event.index)
        if last is None or last.error:
            merged[event.index] = event if last is None else last
        elif event.error:
            merged[event.index] = event
        else:
            merged[event.index] = Event(event.index, last.text + event.text, event.finish_reason,
                                        event.completion_tokens)
    return list(merged.values())


class KeyCheck:
    """Every route but /health needs `Authorization: Bearer <key>`. Plain ASGI (not
    BaseHTTPMiddleware) so streamed responses and client disconnects pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].endswith("/health"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def parse(request: Request, schema):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']} (got {json.dumps(first.get('input'))[:80]})",
                       param=where) from None


class Reply:
    """Turns engine events into OpenAI's response objects (whole, or server-sent events)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, n: int):
        self.model, self.chat, self.prompt_tokens, self.n = model, chat, prompt_tokens, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = [0] * n

    def usage(self) -> dict:
        done = sum(self.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    async def whole(self, events: AsyncIterator[Event]) -> JSONResponse:
        texts, reasons = [""] * self.n, [None] * self.n
        async for event in events:
            if event.error:
                raise ApiError(500, f"generation failed: {event.error}", kind="server_error")
            texts[event.index] += event.text
            reasons[event.index] = event.finish_reason
            self.completion_tokens[event.index] = event.completion_tokens
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i],
                        "logprobs": None} for i in range(self.n)]
        else:
            choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None}
                       for i in range(self.n)]
        return JSONResponse({**self.envelope(choices, chunk=False), "usage": self.usage()})

    async def sse(self, events: AsyncIterator[Event]) -> AsyncIterator[str]:
        if self.chat:  # the role comes first, as OpenAI sends it
            yield _sse(self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None, "logprobs": None} for i in range(self.n)], True))
        async for event in events:
            if event.error:
                yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                      "param": None, "code": None}})
                return
            self.completion_tokens[event.index] = event.completion_tokens
            piece = {"delta": {"content": event.text}} if self.chat else {"text": event.text}
            yield _sse(self.envelope([{"index": event.index, **piece, "finish_reason": event.finish_reason,
                                       "logprobs": None}], True))
        # Usage closes every stream (OpenAI's include_usage chunk: no choices).
        yield _sse({**self.envelope([], True), "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
