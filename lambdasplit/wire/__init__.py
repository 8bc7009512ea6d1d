"""What crosses the network, and how it is checked: frames, codecs and the session protocol.

    frame.py        a frame: a small versioned msgpack header, then raw little-endian bytes; checked
                    against limits before anything is allocated (never pickle)
    protocol.py     the typed JSON messages that open and describe sessions
    spec.py         codec names (int8+out:4, had+int4, ...) and wires ('UP,DOWN'): parse_codec, parse_wire
    codecs.py       a hidden state to payload bytes and back; quant.py, rotation.py, lowrank.py, noise.py
                    are its parts (integers, Hadamard rotation, PCA basis, the noise defence)
    hexdump.py      a frame's bytes as an observer of the link sees them
"""
