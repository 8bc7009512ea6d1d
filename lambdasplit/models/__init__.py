"""How each model is cut into head, body and tail, and where its weights come from.

    llm.py          decoder-only LLMs: the stock transformers layers, split at X and Y, with their caches
    diffusion.py    text to image: text encoders and latent (head), U-Net (body), scheduler and VAE (tail)
    batch.py        one pass of a body's layers for several sessions
    source.py       the embedded default, a folder, a GGUF file or a Hub id; weights.py: only the tensors a
                    side needs, and their fingerprint
    lora.py, privatelora.py     the device's adapters (PEFT's LoRA format; PrivateLoRA's M matrices)
    calibrate.py, corpus.py     hidden states collected on shipped or public text
"""
