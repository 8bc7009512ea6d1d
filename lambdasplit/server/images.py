"""The body server of a text-to-image model: the U-Net with classifier-free guidance, and a mirror latent.

One session makes one image (or a small batch from one prompt):

    device ──prompt_embeds (+ pooled, time_ids for SDXL), then the initial latent──▶ server   (once)
    device ◀──predicted noise of step 0, 1, ..., steps-1, streamed────────────────── server

Per step the server predicts the guided noise, encodes it with the session's downlink codec, decodes
those very bytes, steps its own copy of the latent (the mirror) with the decoded noise, and sends the
frame. The device steps its latent with the same decoded noise, so the two never drift, however lossy
the codec. The server holds the U-Net only: never the text encoders, the tokenizers or the VAE, so it
never sees the prompt as text, nor the image as pixels (it could decode its mirror latent with a
public VAE: see docs/images.md on what this does and does not hide).

The U-Net runs on one compute thread (one OpenMP team), one step at a time; concurrent sessions take
turns step by step. A device that goes away stops its session at the next step.

The U-Net, a session and its checks, and the step on the compute thread are in image_sessions.py; the
routes in routes/images.py.
"""

from __future__ import annotations

from fastapi import FastAPI

from .context import ServerSettings
from .image_sessions import ImageContext, ImageRuntime
from .routes.common import server_app
from .routes.images import image_sessions_router, image_steps_router

__all__ = ["ImageRuntime", "create_image_app"]


def create_image_app(runtime: ImageRuntime, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The text-to-image server's app: health and metrics, image sessions, their WebSockets; over one
    ImageContext."""
    ctx = ImageContext(runtime, settings)
    return server_app("lambdasplit body server (text-to-image)", ctx, image_sessions_router(ctx),
                      image_steps_router(ctx))
