"""The model layer: the frozen encoder, the GPT-2 decoder with the connectors' slots, the captioner
that joins them through a connector, the PEFT hook points, the decoding cache, attention probes and
checkpoints."""
