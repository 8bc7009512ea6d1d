"""The routes of the body servers, one router per concern; each router factory takes the app's context.

    common.py    every server: the JSON error of a refused request, GET /v1/health, /health, /healthz, /metrics
    sessions.py  the LLM body: GET /v1/info, POST /v1/sessions, DELETE /v1/sessions/{id}
    steps.py     the LLM body: WS /v1/sessions/{id}/ws, POST /v1/sessions/{id}/step (PrivateLoRA, forwarding)
    images.py    the U-Net: GET /v1/info, POST /v1/images, DELETE /v1/images/{id}, WS /v1/images/{id}/ws

The cloud-only baseline (server/cloud.py) runs the whole model and has routes of its own.
"""
