"""The local apps on the device: a web UI that shows what the network sees, and an OpenAI-compatible API.

Both run in one FastAPI process bound to loopback (other hosts and origins only when named: guard.py). The
prompt is tokenized and run through the head here; only hidden states go to the body server, as with
`lambdasplit generate`.

    browser / openai client -> [loopback] -> device: head -> [wire] -> body server -> [wire] -> tail
"""
