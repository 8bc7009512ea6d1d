"""What an attacker recovers from the hidden states on the wire: attacks, the per-layer assessment,
the eavesdropper's view, and the noise defence's cost."""
