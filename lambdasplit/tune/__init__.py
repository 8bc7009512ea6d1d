"""Private personalization: adapters trained and kept on the device.

Split fine-tuning (`lambdasplit tune`): LoRA adapters live only in the head's and the tail's layers.
The training text stays on the device; the body server sees hidden states going up and gradients
with respect to its output, and answers with the gradient at its input. It never holds or updates
the adapters.

    forward:  ids -> head(+LoRA) -> [wire] -> body -> [wire] -> tail(+LoRA) -> loss
    backward: head <- [wire] dL/d(body input) <- body <- [wire] dL/d(body output) <- tail
"""
