"""Text that ships with lambdasplit: calibration and held-out prose, the privacy probes' prompts, and a
small private-notes sample for the fine-tuning tests and bench."""

from pathlib import Path

PRIVATE_NOTES = Path(__file__).with_name("private_notes.txt")  # a fictional garden log, 40 days
