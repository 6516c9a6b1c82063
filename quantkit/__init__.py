"""quantkit: merge, quantize and benchmark fine-tuned LLMs."""

__version__ = "0.1.0"
