"""The training layer: the trainer, resume state and signals, multi-process training, the
frozen-encoder feature cache and the training datasets."""
