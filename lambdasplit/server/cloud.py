"""Cloud-only mode: the server runs the whole model and the client sends text (the paper's baseline).

This is what Λ-Split avoids: the prompt crosses the network in plain text, and the answer comes
back the same way. It exists so that benchmarks compare against a real mode of the same server,
not a figure.

    POST /v1/complete  {"prompt": ..., "max_new_tokens": ..., sampling fields}
        -> application/x-ndjson, one line per token {"token": id, "text": delta}, then {"done": ...}
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..client.generate import GenerationStats, SplitClient, TextStream
from ..client.sampling import SamplingParams
from ..models.llm import load_config
from ..models.source import model_name
from ..util.threads import take_over
from ..wire.protocol import PROTOCOL

NDJSON = "application/x-ndjson"


class CompleteRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=200_000)
    max_new_tokens: int = Field(256, ge=1, le=1 << 16)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    chat: bool = True
    stop_at_eos: bool = True


def create_cloud_app(folder: Path, device: str = "auto", weights: str | None = None) -> FastAPI:
    n = load_config(folder).num_hidden_layers
    client = SplitClient(folder, server=None, split=(0, n), wire="fp32", speculate="off", device=device,
                         weights=weights)  # every layer in this process
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lambdasplit-compute", initializer=take_over)
    app = FastAPI(title="lambdasplit cloud-only server", version=PROTOCOL, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info():
        return {"protocol": PROTOCOL, "mode": "cloud-only", "model_name": model_name(folder), "num_layers": n,
                "max_positions": client.model.max_positions}

    @app.post("/v1/sessions")
    async def no_sessions():
        return JSONResponse({"error": "cloud_only", "message": "this server runs the whole model (cloud-only "
                             "mode) and holds no split sessions; POST text to /v1/complete"}, status_code=409)

    @app.post("/v1/complete")
    async def complete(req: CompleteRequest):
        ids = client.encode_prompt(req.prompt, chat=req.chat)
        if len(ids) + req.max_new_tokens > client.model.max_positions:
            return JSONResponse({"error": "too_long", "message": f"{len(ids)} prompt tokens + {req.max_new_tokens} "
                                 f"new tokens exceed the model's {client.model.max_positions} positions"},
                                status_code=413)
        sampling = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def run():  # on the compute thread: tokens go to the event loop as they come
            stats, text = GenerationStats(), TextStream(client.tokenizer)
            try:
                for token in client.generate_ids(ids, max_new_tokens=req.max_new_tokens, sampling=sampling,
                                                 stop_at_eos=req.stop_at_eos, stats=stats):
                    loop.call_soon_threadsafe(queue.put_nowait, {"token": token, "text": text.push(token)})
                done = {"done": True, "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
                        "compute_s": round(stats.prefill_s + stats.decode_s, 6)}
            except Exception as exc:  # reported in the stream: the status line has gone out already
                done = {"done": True, "error": f"{type(exc).__name__}: {exc}"}
            loop.call_soon_threadsafe(queue.put_nowait, done)

        compute.submit(run)

        async def lines():
            while True:
                event = await queue.get()
                yield json.dumps(event) + "\n"
                if event.get("done"):
                    return

        return StreamingResponse(lines(), media_type=NDJSON)

    return app
