"""The device side: the head and the tail, the generation loop, and the connection to the body.

    prompt -> tokenizer -> head -> [wire up] -> body (a server, or local) -> [wire down] -> tail -> sample -> text

    generate.py     SplitClient: the head, the tail and the loop around a body (plain or speculative)
    chat.py         Conversation: a multi-turn history over a SplitClient, the chat template over all of it
    body.py         the body as the device sees it: a remote session (with replay on failure) or local layers
    transport.py    one body server: JSON sessions over HTTP, frames over a WebSocket or HTTP POST
    options.py      ConnectionOptions: transport, token, CA bundle, timeout, retries, hops, cross-checking
    route.py        which servers hold which layers; chain.py and verify.py: sharded and cross-checked bodies
    sampling.py     the next token from the logits; speculative.py, drafts.py, bridge.py: drafting
    images.py       text to image: text encoder and VAE here, the U-Net on a server
    cloud.py        the cloud-only baseline's client (text up, tokens down)
    sockstats.py    the bytes a socket really carried, from the kernel
"""
