"""An OpenAI-compatible API on the device: existing apps talk to the split model as to any local LLM.

    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions      (stream: true answers with server-sent events)
    POST /v1/completions           the legacy text completions (completions.py)

The prompt is tokenized and run through the head here; only hidden states leave the device.
Honoured: temperature (default 1, as OpenAI's; 0 is greedy), top_p, max_tokens (or
max_completion_tokens), stop (up to 4 strings), seed, stream and stream_options.include_usage; top_k
as an extension. Unknown fields are ignored; features the split model lacks (n > 1, tools, logprobs,
penalties, logit bias, images) are refused with OpenAI's error shape, never silently dropped. The model
answers to each of its served names (`--served-model-name`; by default the model folder's name).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..client.transport import BodyError
from . import streaming
from .chat import run_chat
from .device import Device, Options
from .metrics import WebMetrics

MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 512  # when a chat request sets none (and never more than the context leaves)
OVERLOADED = {"busy", "too_many_sessions"}


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    @classmethod
    def of(cls, exc: BaseException) -> "ApiError":
        """The API's view of an error raised while generating."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, BodyError):
            status = 503 if exc.code in OVERLOADED else 502
            return cls(status, f"the body server: {exc}", "server_error", None, exc.code)
        if isinstance(exc, ValueError):
            return cls(400, str(exc))
        return cls(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def error_code(exc: BaseException) -> str | None:
    """The code an error is answered with (for the metrics)."""
    error = ApiError.of(exc)
    return error.code or ("invalid_request" if error.status < 500 else "server_error")


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why} by this server", param=param, code="unsupported_parameter")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"message content of type {part.type!r} is not supported: this model reads "
                                    "text only", param="messages")
        return "".join(part.text for part in self.content)

    def chat(self) -> dict:
        """The message for the chat template ('developer' is the newer name of 'system')."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What chat and text completions share: the model, sampling, stop strings, streaming, and what is refused."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None

    def refusals(self) -> list[tuple[str, bool, str]]:
        return [("n", self.n not in (None, 1), "only n = 1 is supported"),
                ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported"),
                ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
                ("logit_bias", bool(self.logit_bias), "logit bias is not supported")]

    def refuse_unsupported(self) -> None:
        for param, bad, why in self.refusals():
            if bad:
                raise unsupported(param, why)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)

    def options(self, defaults: Options, max_tokens: int) -> Options:
        """The device's defaults (split, codecs) with this request's sampling."""
        return replace(defaults, max_tokens=max_tokens,
                       temperature=1.0 if self.temperature is None else self.temperature,
                       top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                       seed=None if self.seed is None else self.seed % 2**63, stop=self.stops())

    def usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

    def refusals(self) -> list[tuple[str, bool, str]]:
        return super().refusals() + [
            ("tools", bool(self.tools), "tool calls are not supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
            ("response_format", (self.response_format or {}).get("type", "text") != "text",
             "only the text response format is supported")]


def parse_request(payload: object, model: type[SamplingRequest] = ChatCompletionRequest):
    try:
        request = model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"],
                       param=str(first["loc"][0]) if first["loc"] else None) from None
    request.refuse_unsupported()
    return request


class Api:
    """What every route of the API needs: the device, the names it answers to, the key, the counters."""

    def __init__(self, device: Device, api_key: str | None = None, names: tuple[str, ...] = (),
                 metrics: WebMetrics | None = None):
        self.device, self.api_key = device, api_key
        self.names = tuple(dict.fromkeys(names or (device.name,)))
        self.metrics = metrics or WebMetrics()
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", "invalid_request_error",
                           code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model not in self.names:
            raise ApiError(404, f"the model {model!r} does not exist; this server has "
                                f"{', '.join(repr(n) for n in self.names)}", param="model", code="model_not_found")

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "lambdasplit"}

    async def body(self, request: Request, model: type[SamplingRequest]):
        """The request, checked: its key, its JSON, its fields, its model."""
        self.check_key(request)
        try:
            payload = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        body = parse_request(payload, model)
        self.check_model(body.model)
        return body

    def fingerprint(self, options: Options) -> str:
        return f"lambdasplit-{options.x}:{options.y}-{options.up},{options.down}"

    async def start(self, entry: str, prompt: list[dict] | str, options: Options) -> tuple[dict, streaming.Events]:
        """A generation started on its own thread, counted under `entry`; its first event (an error before it
        is raised as ApiError) and the rest."""
        cancel = threading.Event()
        events = streaming.start(lambda: self.metrics.track(entry, run_chat(self.device, prompt, options, cancel),
                                                            error_code), cancel)
        first = await events.first()
        if isinstance(first, streaming.Failed) or first is None:
            raise ApiError.of(first.error if first else RuntimeError("the generation ended before it began"))
        return first, events


def router(api: Api) -> APIRouter:
    """GET /v1/models, /v1/models/{id}, POST /v1/chat/completions."""
    routes = APIRouter(prefix="/v1")

    @routes.get("/models")
    def models(request: Request):
        api.check_key(request)
        return {"object": "list", "data": [api.model_card(name) for name in api.names]}

    @routes.get("/models/{model:path}")
    def model(model: str, request: Request):
        api.check_key(request)
        api.check_model(model)
        return api.model_card(model)

    @routes.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await api.body(request, ChatCompletionRequest)
        options = body.options(api.device.defaults,
                               body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS)
        completion = Completion(body.model, f"chatcmpl-{secrets.token_hex(12)}", api.fingerprint(options))
        first, events = await api.start("chat_completions", [m.chat() for m in body.messages], options)
        if not body.stream:
            return completion.whole(await collect(first, events))
        usage = body.usage()

        async def chunks():
            yield completion.chunk({"role": "assistant", "content": ""})
            async for event in events.rest():
                if isinstance(event, streaming.Failed):
                    yield ApiError.of(event.error).body()
                    return
                for chunk in completion.chunks(event, usage):
                    yield chunk

        return sse_response(chunks(), events.stop)

    return routes


async def collect(first: dict, events: streaming.Events) -> list[dict]:
    """Every event of a generation (an error raised as ApiError)."""
    collected = [first]
    async for event in events.rest():
        if isinstance(event, streaming.Failed):
            raise ApiError.of(event.error)
        collected.append(event)
    return collected


def sse_response(chunks, stop: Callable[[], None]) -> StreamingResponse:
    """Server-sent events of `chunks` (dicts), then [DONE]; `stop()` when the client goes away or it ends."""

    async def sse():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                if "error" in chunk:
                    return
            yield "data: [DONE]\n\n"
        finally:
            stop()  # the client went away (or the answer is complete): stop generating

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def usage_of(done: dict) -> dict:
    prompt, completion = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_of(done: dict) -> str:
    return "length" if done["finish_reason"] == "length" else "stop"


class Completion:
    """Shapes the generation's events as OpenAI chat completions (whole, or as chunks)."""

    def __init__(self, model: str, id: str, fingerprint: str):
        self.model, self.id, self.fingerprint = model, id, fingerprint
        self.created = int(time.time())

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def whole(self, events: list[dict]) -> dict:
        text = "".join(e["text"] for e in events if e["type"] == "text")
        done = next(e for e in events if e["type"] == "done")
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish_of(done)}],
                "usage": usage_of(done)}

    def chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def chunks(self, event: dict, usage: bool) -> Iterator[dict]:
        if event["type"] == "text":
            yield self.chunk({"content": event["text"]})
        elif event["type"] == "done":
            yield self.chunk({}, finish_of(event))
            if usage:
                yield {**self._base("chat.completion.chunk"), "choices": [], "usage": usage_of(event)}
