"""What is built on top of the core: zero-shot CLIP classification, attention-map figures, the
offline demo and its synthetic data."""
