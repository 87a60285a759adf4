"""Independent float64 NumPy reference of the Llama forward pass (GGUF), used as a test oracle
for the C++ engine. See reference.llama_ref for the details and expected tolerances, and
reference.tiny_model for tiny random test models.

Names are imported lazily so that ``python3 -m reference.llama_ref`` runs without a runpy warning.
"""

__all__ = ["LlamaRef", "KVCache", "dequantize", "read_tensor", "rms_norm", "rope", "write_tiny_model"]


def __getattr__(name):
    if name == "write_tiny_model":
        from .tiny_model import write_tiny_model
        return write_tiny_model
    if name in __all__:
        from . import llama_ref
        return getattr(llama_ref, name)
    raise AttributeError(f"module 'reference' has no attribute {name!r}")
