"""The model layer: the frozen encoder, the GPT-2 decoder and its cross-attention, the captioner
that joins them, the PEFT hook points, the decoding cache, attention probes and checkpoints."""
