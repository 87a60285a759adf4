"""Independent float64 NumPy reference of the Llama forward pass (GGUF), used as a test oracle
for the C++ engine. See reference.llama_ref for the details and expected tolerances."""

from .llama_ref import LlamaRef, KVCache, dequantize, read_tensor, rms_norm, rope

__all__ = ["LlamaRef", "KVCache", "dequantize", "read_tensor", "rms_norm", "rope"]
