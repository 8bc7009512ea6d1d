"""One copy of a tied embedding table for both exported parts (a model whose LM head is its embedding).

The exporter writes the table into each file: the head's lookup (Gather on the [V, D] table) and the tail's
LM head (MatMul on a transposed [D, V] copy). For SmolLM2-135M that is 113 MB twice, most of the page's
download. When the two are the same numbers, this moves the table out of both files into one external data
file, `embed.bin`, that the page fetches once and hands to both sessions; the tail gets a Transpose node in
front of its MatMul, which ONNX Runtime folds into a constant when it loads the session (the step itself
does not change). The int8 copies are made before this and keep their own tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHARED_FILE = "embed.bin"
SHARED_NAME = "shared.embed.weight"


def share_tied_table(out: Path, head_file: str, tail_file: str) -> dict | None:
    """Move the tied table of `out`/head_file and `out`/tail_file into `out`/embed.bin, when both hold it;
    returns {"file", "bytes", "shape"} of the shared file, or None (untied: the files are left as they are)."""
    import onnx
    from onnx import helper, numpy_helper

    head, tail = onnx.load(str(out / head_file)), onnx.load(str(out / tail_file))
    products = _weights(tail, "MatMul", 1)
    if not products:
        return None
    product = max(products, key=lambda t: t.dims[0] * t.dims[1])  # the LM head: the tail's largest product
    transposed = numpy_helper.to_array(product)
    for lookup in _weights(head, "Gather", 0):  # the token table, not a position table (GPT-2's wpe)
        table = numpy_helper.to_array(lookup)
        if table.dtype == np.float32 and table.shape == transposed.shape[::-1] and np.array_equal(table.T, transposed):
            break
    else:
        return None
    data = np.ascontiguousarray(table).astype("<f4").tobytes()
    (out / SHARED_FILE).write_bytes(data)

    _make_external(lookup, table.shape, len(data))
    tail.graph.initializer.remove(product)
    shared = onnx.TensorProto(name=SHARED_NAME, data_type=onnx.TensorProto.FLOAT)
    _make_external(shared, table.shape, len(data))
    tail.graph.initializer.append(shared)
    tail.graph.node.insert(0, helper.make_node("Transpose", [SHARED_NAME], [product.name], perm=[1, 0],
                                               name="shared_embed_transpose"))
    for model, file in ((head, head_file), (tail, tail_file)):
        onnx.save(model, str(out / file))
    return {"file": SHARED_FILE, "bytes": len(data), "shape": list(table.shape)}


def _weights(model, op: str, slot: int) -> list:
    """The 2-D initializers fed to `op` nodes at input `slot`."""
    inits = {t.name: t for t in model.graph.initializer}
    found = [inits[n.input[slot]] for n in model.graph.node
             if n.op_type == op and len(n.input) > slot and n.input[slot] in inits]
    return [t for t in found if len(t.dims) == 2]


def _make_external(tensor, shape, length: int) -> None:
    """Point `tensor` at the shared file instead of holding its bytes."""
    import onnx

    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    del tensor.dims[:]
    tensor.dims.extend(shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", SHARED_FILE), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
