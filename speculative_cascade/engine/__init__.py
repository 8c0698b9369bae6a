"""Native decoder, static KV cache, INT8 quantization and model loading."""

from .kv_cache import KVCache
from .loader import LoadedModel, load_model
from .transformer import ModelArgs, Transformer
from .quant import quantize_int8

__all__ = ["KVCache", "LoadedModel", "ModelArgs", "Transformer", "load_model", "quantize_int8"]
