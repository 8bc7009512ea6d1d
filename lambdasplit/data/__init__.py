"""Text that ships with lambdasplit: calibration and held-out prose, the privacy probes' prompts, a small
private-notes sample for the fine-tuning tests and bench, and the demos' prompts."""

from pathlib import Path

PRIVATE_NOTES = Path(__file__).with_name("private_notes.txt")  # a fictional garden log, 40 days

PAPER_PROMPT = "What is the difference between AI, ML and DL?"  # the Λ-Split paper's prompt (Table I)
PRIVATE_PROMPT = "My bank PIN is 4721 and my doctor says I have diabetes. What should I eat?"  # eavesdrop's
IMAGE_PROMPT = "a handwritten digit 7"  # the text-to-image demo's prompt, for the embedded digits model
IMAGE_STEPS, IMAGE_GUIDANCE = 25, 5.0  # text to image: denoising steps and classifier-free guidance by default
AGREEMENT_PROMPTS = (PAPER_PROMPT, PRIVATE_PROMPT, "Write a short poem about the sea.", "Explain how a bicycle works.")
"""The four prompts whose greedy continuations measure a weight format's agreement with fp32 (bench decode)."""
