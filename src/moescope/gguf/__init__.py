"""GGUF files: what a model's experts weigh (`inspect_gguf`), read through a memory map."""

from moescope.gguf.inspect import GGUFModel, TensorInfo, inspect_gguf, open_gguf

__all__ = ["GGUFModel", "TensorInfo", "inspect_gguf", "open_gguf"]
