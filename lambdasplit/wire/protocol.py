"""The session protocol shared by client and server: typed JSON messages over HTTP.

    GET    /v1/info                      -> ServerInfo
    POST   /v1/sessions    SessionRequest -> SessionOpened   (409 with the differences on mismatch)
    DELETE /v1/sessions/{id}                                  (frees the session's KV cache)
    WS     /v1/sessions/{id}/ws          binary frames in, binary frames out, one per step
    POST   /v1/sessions/{id}/step        one frame in the body, one frame back (fallback for WS)

Every request that names a session (its steps, its WebSocket, its DELETE) carries the session's key,
`X-Session-Key: <SessionOpened.key>`: a secret that only the session's opener was given. Without it the
session answers exactly as a session that does not exist (404 unknown_session).

A step frame whose header says `extra.rollback = true` may start before the session's end: the body
first forgets the positions from there on (speculative decoding's rejected drafts). A server says it
takes such steps in `SessionOpened.rollback`; a client does not speculate with one that does not.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

PROTOCOL = "lambdasplit/1"
FRAME_TYPE = "application/x-lambdasplit-frame"  # the media type of a frame in an HTTP POST step and its answer
SESSION_KEY_HEADER = "X-Session-Key"  # the session key, on every request that names a session
WS_PROTOCOL = "lambdasplit.v1"  # the WebSocket subprotocol a browser device asks for, and the server answers
WS_KEY_PROTOCOL = "lambdasplit.key."  # + the session key: how a page's WebSocket (no headers of its own) carries it
BROWSER_KEY_TTL_S = 60.0  # a key so carried opens its session's WebSocket once, within this of the session's opening


class WireFormat(BaseModel):
    up: str = Field("fp32", description="codec of device -> cloud frames (see lambdasplit.wire.spec)")
    down: str = Field("fp32", description="codec of cloud -> device frames")
    seed: int = Field(0, ge=0, lt=1 << 63, description="seed of the 'had' rotation, fresh per session")
    basis: str | None = Field(None, description="sha256 of the PCA basis file that 'pca:R' codecs use")


class PrivateLoraRequest(BaseModel):
    """PrivateLoRA on the body's attention projections: W x + B M A x, with A and B fixed random matrices
    drawn from `seed` on the server and M (rank x rank) on the device only."""
    rank: int = Field(8, ge=1, le=64)
    targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj"]] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                                                         min_length=1, max_length=4)
    seed: int = Field(0, ge=0, lt=2**62)


class ForwardHop(BaseModel):
    """The next hop of a sharded body, for a session whose server forwards its output there itself."""
    urls: list[str] = Field(min_length=1, max_length=16, description="the hop's replicas, tried in turn")
    x: int
    y: int
    model_fingerprint: str = Field(description="sha256 of the architecture and the weights of layers [x, y)")


class SessionRequest(BaseModel):
    protocol: str = PROTOCOL
    model_fingerprint: str = Field(description="sha256 of the architecture and the weights of layers [x, y)")
    x: int
    y: int
    weights: str | None = Field(None, description="the weight format the client expects the body in (fp32, bf16, "
                                "fp16, int8, int4); None takes the server's (ServerInfo.weights)")
    dtype: str | None = Field(None, description="older name of `weights`, as a dtype (float32, bfloat16, float16)")
    wire: WireFormat = WireFormat()
    cache: bool = Field(True, description="keep a KV cache (False: the paper's w/o-caching baseline)")
    max_positions: int | None = Field(None, ge=1, description="how long the session's sequence may grow (the "
                                      "server reserves KV-cache memory for this many positions)")
    private_lora: PrivateLoraRequest | None = Field(None, description="PrivateLoRA adapters on the body (needs the "
                                                    "WebSocket transport: the server asks the device mid-step)")
    train: bool = Field(False, description="split fine-tuning: keep each forward step's computation until its "
                        "gradient comes back (a 'grad' frame), and answer it with the gradient at the body's input; "
                        "needs cache false. The body's weights never change.")
    forward: list[ForwardHop] = Field(default_factory=list, max_length=8, description="a sharded body's later "
                                      "hops: this server runs [x, y), sends its output on to the first of these "
                                      "(which passes it on to the rest), and answers with the last hop's output, "
                                      "coded for the state leaving the last hop. Each URL must be one of the "
                                      "server's --peers.")


class SessionOpened(BaseModel):
    session_id: str
    key: str = Field("", repr=False, description="the session key: send it as X-Session-Key with every step, "
                     "the WebSocket and the DELETE. Only the opener gets it; the id alone opens nothing "
                     "(servers before it answer without the field)")
    x: int
    y: int
    hidden_size: int
    max_positions: int
    max_frame_bytes: int
    idle_ttl_s: float
    rollback: bool = Field(False, description="whether steps may roll the session back (speculative decoding); "
                           "servers before it answer without the field")
    train: bool = Field(False, description="whether the session answers gradients (split fine-tuning)")
    private_lora: bool = Field(False, description="whether the session adds the device's PrivateLoRA adapters")
    forwarded: int = Field(0, description="later hops this session's server forwards to (0: it answers itself)")
    weights: str = Field("fp32", description="the format of the weights this session's body runs (int8 and int4 "
                         "answers differ from fp32 ones by their quantization)")


class ServerInfo(BaseModel):
    protocol: str = PROTOCOL
    task: Literal["text-generation"] = "text-generation"
    model_name: str
    num_layers: int
    hidden_size: int
    x: int
    y: int
    dtype: str = Field(description="the dtype the body computes in (its activations)")
    weights: str = Field("fp32", description="the format the body's weights are held in (fp32, bf16, fp16, int8, "
                         "int4)")
    device: str = Field("cpu", description="where the body computes (cpu, cuda:0, mps)")
    codecs: list[str] = Field(description="the codec parts this server understands, joined by '+' in a codec name")
    basis: str | None = Field(None, description="sha256 of the PCA basis file this server loaded, if any")
    basis_points: list[int] = Field(default_factory=list, description="split points the basis covers")
    max_positions: int
    max_frame_bytes: int
    max_sessions: int
    sessions: int
    kv_budget_bytes: int = Field(0, description="memory for all sessions' KV caches (reserved at session open)")
    kv_reserved_bytes: int = Field(0, description="of which reserved by open sessions")
    kv_bytes_per_position: int = Field(0, description="KV-cache bytes one position takes over the served layers")
    auth: bool = Field(False, description="whether the server needs a bearer token")
    forwards: bool = Field(False, description="whether sessions may ask this server to forward their output to "
                           "the next hop of a sharded body (it has --peers)")
    parameters: int
    parameter_bytes: int
    rss_bytes: int
    holds: list[str] = Field(description="the checkpoint modules this process has loaded (never embeddings, norm or LM head)")


class ErrorBody(BaseModel):
    error: str
    message: str


# ---- text-to-image sessions (a server started with a diffusion model) ----------------------------------------
#   POST   /v1/images        ImageSessionRequest -> ImageSessionOpened
#   WS     /v1/images/{id}/ws  the device sends the session's `parts` (one 'hidden' frame each, extra.part naming
#                              it, the initial latent last); the server then streams one 'hidden' frame of
#                              predicted noise per step (rows: latent channels), and ends the session
#   DELETE /v1/images/{id}

class ImageSessionRequest(BaseModel):
    protocol: str = PROTOCOL
    model_fingerprint: str = Field(description="sha256 of the U-Net's config and weights")
    scheduler: str = Field("default", description="the deterministic scheduler both ends step (see `schedulers` "
                           "in the server's info)")
    steps: int = Field(25, ge=1, le=1000)
    guidance: float = Field(5.0, ge=0.0, le=50.0, description="classifier-free guidance scale (<= 1: none)")
    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)
    batch: int = Field(1, ge=1, le=8, description="images made together from the same prompt")
    wire: WireFormat = WireFormat()


class ImageSessionOpened(BaseModel):
    session_id: str
    key: str = Field("", repr=False, description="the session key: send it as X-Session-Key on the WebSocket and "
                     "the DELETE (servers before it answer without the field)")
    steps: int
    timesteps: list[float] = Field(description="the scheduler's timesteps, the same on both ends")
    latent_shape: list[int] = Field(description="(batch, channels, h, w) of the latent")
    parts: list[str] = Field(description="the uplink frames the server expects, in order")
    max_frame_bytes: int
    idle_ttl_s: float
    weights: str = Field("fp32", description="the format the U-Net computes this session's noise in (fp32, bf16, "
                         "fp16); servers before it answer without the field")


class ImageServerInfo(BaseModel):
    protocol: str = PROTOCOL
    task: Literal["text-to-image"] = "text-to-image"
    model_name: str
    kind: str = Field(description="sd (Stable Diffusion 1.x/2.x) or sdxl")
    latent_channels: int
    default_size: int = Field(description="the model's default image side, in pixels")
    vae_scale_factor: int
    schedulers: list[str]
    codecs: list[str]
    max_frame_bytes: int
    max_sessions: int
    sessions: int
    auth: bool = False
    parameters: int
    parameter_bytes: int
    rss_bytes: int
    holds: list[str] = Field(description="the pipeline components this process has loaded (only the U-Net)")
    weights: str = Field("fp32", description="the format the U-Net is held and run in (fp32, bf16, fp16)")
    device: str = Field("cpu", description="where the U-Net computes (cpu, cuda:0, mps)")
