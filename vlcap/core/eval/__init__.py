"""The evaluation layer: CIDEr and CLIPScore exactly as the course scores them, the metric
plugin interface, and OpenAI CLIP loading."""
