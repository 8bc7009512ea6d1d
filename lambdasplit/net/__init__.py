"""The network around the wire: emulated links, packet capture, and the passive observer.

    link.py         a loopback TCP proxy with a one-way delay and a rate limit, that records what it forwards
    capture.py      tcpdump on a loopback port, to cross-check the byte counts
    streams.py      HTTP, WebSocket and TLS records, as an observer parses raw bytes
    tap.py          what an observer reads from a recorded connection: sessions, frames, hidden states
    certs.py        throwaway TLS certificates for loopback servers
    ports.py        the servers' sockets: bound before a model loads, listening once it is ready
"""
