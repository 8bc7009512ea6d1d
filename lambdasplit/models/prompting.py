"""A prompt as the device tokenizes it: through the model's chat template when it has one (instruct models),
as plain text otherwise (base models such as Gemma 3 270M)."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids of a prompt (a string, or a list of chat messages, which needs a chat template)."""
    if isinstance(prompt, list) or (chat and tokenizer.chat_template):
        if not tokenizer.chat_template:
            raise ValueError("this model has no chat template (a base model): give it plain text, not messages")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
