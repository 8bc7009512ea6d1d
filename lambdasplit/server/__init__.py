"""The body server: layers [X, Y) of a model (or a U-Net), a KV cache per session, over HTTP and WebSocket.

    main.py         load the body, bind the socket, run uvicorn (TLS, exposure checks)
    app.py          the LLM body's app, assembled from routes/ over one BodyContext (body.py, context.py)
    images.py       the text-to-image body's app (image_sessions.py holds its U-Net and sessions)
    routes/         the routers: health and metrics (shared), sessions, steps, image sessions and steps
    sessions.py     sessions and the rules a step obeys; scheduler.py: the compute thread and batching
    auth.py, logs.py, metrics.py     tokens (as hashes), JSON logs, Prometheus counters
    forward.py      a sharded body's forwarding to the next hop; privatelora.py: PrivateLoRA on the body
    cloud.py        the cloud-only baseline (the whole model, text in and out)
    ray_serve.py, ray_router.py      the same app as Ray Serve replicas, sessions kept on their replica
    process.py      a server as a subprocess on a free loopback port (demo, benches, tests)
"""
