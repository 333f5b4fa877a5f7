"""The inference layer: the decoding-strategy interface and its shared mechanics, and captioning
a folder of images with a trained checkpoint."""
