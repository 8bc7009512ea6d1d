"""Choosing the split points: device and cloud profiles, the link, and a privacy target."""
