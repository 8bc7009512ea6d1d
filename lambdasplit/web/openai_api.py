"""An OpenAI-compatible chat API on the device: existing apps talk to the split model as to any local LLM.

    GET  /v1/models
    POST /v1/chat/completions      (stream: true answers with server-sent events)

The messages are tokenized and run through the head here; only hidden states leave the device.
Honoured: temperature (default 1, as OpenAI's; 0 is greedy), top_p, max_tokens (or
max_completion_tokens), stop (up to 4 strings), seed, stream and stream_options.include_usage; top_k
as an extension. Unknown fields are ignored; features the split model lacks (n > 1, tools, logprobs,
penalties, images) are refused with OpenAI's error shape, never silently dropped.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..client.transport import BodyError
from . import streaming
from .chat import run_chat
from .device import Device

MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 512  # when a request sets none (and never more than the context leaves)
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


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        checks = [("n", self.n not in (None, 1), "only n = 1 is supported"),
                  ("tools", bool(self.tools), "tool calls are not supported"),
                  ("logprobs", bool(self.logprobs), "logprobs are not supported"),
                  ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported"),
                  ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
                  ("response_format", (self.response_format or {}).get("type", "text") != "text",
                   "only the text response format is supported")]
        for param, bad, why in checks:
            if bad:
                raise ApiError(400, f"{param}: {why} by this server", param=param, code="unsupported_parameter")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)


def parse_request(payload: object) -> ChatCompletionRequest:
    try:
        request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"],
                       param=str(first["loc"][0]) if first["loc"] else None) from None
    request.refuse_unsupported()
    return request


def router(device: Device, api_key: str | None = None) -> APIRouter:
    api = APIRouter(prefix="/v1")
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", "invalid_request_error",
                           code="invalid_api_key")

    def model_card() -> dict:
        return {"id": device.name, "object": "model", "created": created, "owned_by": "lambdasplit"}

    @api.get("/models")
    def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{model:path}")
    def model(model: str, request: Request):
        check_key(request)
        if model != device.name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {device.name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        try:
            payload = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        body = parse_request(payload)
        if body.model != device.name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {device.name!r}",
                           param="model", code="model_not_found")
        defaults = device.defaults
        options = replace(defaults, max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                          seed=None if body.seed is None else body.seed % 2**63, stop=body.stops())
        messages = [m.chat() for m in body.messages]
        completion = Completion(device.name, f"chatcmpl-{secrets.token_hex(12)}",
                                f"lambdasplit-{options.x}:{options.y}-{options.up},{options.down}")
        cancel = threading.Event()
        events = streaming.start(lambda: run_chat(device, messages, options, cancel), cancel)
        first = await events.first()
        if isinstance(first, streaming.Failed) or first is None:
            raise ApiError.of(first.error if first else RuntimeError("the generation ended before it began"))
        if not body.stream:
            collected = [first]
            async for event in events.rest():
                if isinstance(event, streaming.Failed):
                    raise ApiError.of(event.error)
                collected.append(event)
            return completion.whole(collected)
        usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse():
            try:
                yield _sse(completion.chunk({"role": "assistant", "content": ""}))
                async for event in events.rest():
                    if isinstance(event, streaming.Failed):
                        yield _sse(ApiError.of(event.error).body())
                        return
                    for chunk in completion.chunks(event, usage):
                        yield _sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                events.stop()  # the client went away (or the answer is complete): stop generating

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return api


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Completion:
    """Shapes the generation's events as OpenAI chat completions (whole, or as chunks)."""

    def __init__(self, model: str, id: str, fingerprint: str):
        self.model, self.id, self.fingerprint = model, id, fingerprint
        self.created = int(time.time())

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    @staticmethod
    def _usage(done: dict) -> dict:
        prompt, completion = done["prompt_tokens"], done["completion_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _finish(done: dict) -> str:
        return "length" if done["finish_reason"] == "length" else "stop"

    def whole(self, events: list[dict]) -> dict:
        text = "".join(e["text"] for e in events if e["type"] == "text")
        done = next(e for e in events if e["type"] == "done")
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": self._finish(done)}],
                "usage": self._usage(done)}

    def chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def chunks(self, event: dict, usage: bool) -> Iterator[dict]:
        if event["type"] == "text":
            yield self.chunk({"content": event["text"]})
        elif event["type"] == "done":
            yield self.chunk({}, self._finish(event))
            if usage:
                yield {**self._base("chat.completion.chunk"), "choices": [], "usage": self._usage(event)}
