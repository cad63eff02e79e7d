"""quantkit: turn a Hugging Face fp16 checkpoint into a checked set of quantized models."""

__version__ = "0.1.0"
