"""Built-in models (`mlp`, `cnn`, `transformer`, `minilm`), Hugging Face models, and the helpers that describe and
feed them.

Importing this package registers every built-in, so `load_model("cnn")` works.
"""

from __future__ import annotations

from .cnn import CNNClassifier, CNNConfig
from .example_batch import make_example_batch
from .hf import MiniLMConfig, load_hf_model, minilm_path
from .mlp import MLPClassifier, MLPConfig
from .registry import MODEL_ATTR, load_model, model_names, register_model
from .transformer import TextClassifier, TransformerConfig

__all__ = [
    "MODEL_ATTR",
    "load_model",
    "model_names",
    "register_model",
    "make_example_batch",
    "load_hf_model",
    "minilm_path",
    "MiniLMConfig",
    "MLPClassifier",
    "MLPConfig",
    "CNNClassifier",
    "CNNConfig",
    "TextClassifier",
    "TransformerConfig",
]
