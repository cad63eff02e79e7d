"""quantkit: turn a Hugging Face fp16 checkpoint into a checked set of quantized models."""

__version__ = "0.1.0"

# The profile a build uses when none is named (profiles/gguf-standard.yaml); here, so the CLI needs no heavy import.
DEFAULT_PROFILE = "gguf-standard"
