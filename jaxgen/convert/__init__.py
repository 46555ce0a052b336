"""Conversion to and from other checkpoint formats (Hugging Face safetensors)."""
