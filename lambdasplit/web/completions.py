"""The legacy OpenAI text completions: POST /v1/completions.

The prompt is text (or a list of texts: one choice each, `index` in order), tokenized as it is, without
the chat template, and continued through the split. Honoured as in chat completions: temperature (default
1), top_p, max_tokens (default 16, as OpenAI's), stop, seed, stream (server-sent events in the completions
shape) and stream_options.include_usage; top_k as an extension. Refused in OpenAI's error shape: n or
best_of > 1, echo, suffix, logprobs, penalties, logit bias, and prompts given as token ids.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from pydantic import Field

from . import streaming
from .openai_api import Api, ApiError, SamplingRequest, collect, finish_of, sse_response, unsupported, usage_of

DEFAULT_MAX_TOKENS = 16  # OpenAI's, for text completions
MAX_PROMPTS = 16


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0)

    def refusals(self) -> list[tuple[str, bool, str]]:
        return super().refusals() + [
            ("echo", bool(self.echo), "echoing the prompt is not supported"),
            ("suffix", bool(self.suffix), "a suffix (insertion) is not supported"),
            ("best_of", self.best_of not in (None, 1), "only best_of = 1 is supported"),
            ("logprobs", self.logprobs is not None, "logprobs are not supported")]

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a text or a list of texts", param="prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise unsupported("prompt", "prompts as token ids are not supported (send text)")
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}",
                           param="prompt")
        return prompts


class TextCompletion:
    """Shapes generations as OpenAI text completions (whole, or as chunks), one choice per prompt."""

    def __init__(self, model: str, fingerprint: str):
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.model, self.fingerprint = model, fingerprint

    def base(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def choice(self, index: int, text: str, finish: str | None) -> dict:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def whole(self, answers: list[list[dict]]) -> dict:
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, events in enumerate(answers):
            done = next(e for e in events if e["type"] == "done")
            choices.append(self.choice(index, "".join(e["text"] for e in events if e["type"] == "text"),
                                       finish_of(done)))
            usage = {k: usage[k] + v for k, v in usage_of(done).items()}
        return {**self.base(), "choices": choices, "usage": usage}

    def chunk(self, index: int, event: dict) -> dict | None:
        if event["type"] == "text":
            return {**self.base(), "choices": [self.choice(index, event["text"], None)]}
        if event["type"] == "done":
            return {**self.base(), "choices": [self.choice(index, "", finish_of(event))]}
        return None


def completions_router(api: Api) -> APIRouter:
    routes = APIRouter(prefix="/v1")

    @routes.post("/completions")
    async def completions(request: Request):
        body = await api.body(request, CompletionRequest)
        prompts = body.prompts()
        options = body.options(api.device.defaults, body.max_tokens or DEFAULT_MAX_TOKENS)
        shape = TextCompletion(body.model, api.fingerprint(options))
        first, events = await api.start("completions", prompts[0], options)  # errors before any answer: HTTP ones
        if not body.stream:
            answers = [await collect(first, events)]
            for prompt in prompts[1:]:
                answers.append(await collect(*await api.start("completions", prompt, options)))
            return shape.whole(answers)
        current = [events]

        async def chunks():
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            for index, prompt in enumerate(prompts):
                try:
                    if index:
                        _, current[0] = await api.start("completions", prompt, options)
                except ApiError as exc:
                    yield exc.body()
                    return
                async for event in current[0].rest():
                    if isinstance(event, streaming.Failed):
                        yield ApiError.of(event.error).body()
                        return
                    if event["type"] == "done":
                        usage = {k: usage[k] + v for k, v in usage_of(event).items()}
                    if (chunk := shape.chunk(index, event)) is not None:
                        yield chunk
            if body.usage():
                yield {**shape.base(), "choices": [], "usage": usage}

        return sse_response(chunks(), lambda: current[0].stop())

    return routes
