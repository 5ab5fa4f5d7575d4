"""`transformer`: a small BERT-like text classifier written out op by op (no nn.TransformerEncoderLayer).

Every projection is its own nn.Linear with a stable name (`layers.<i>.attn.query`, `.key`, `.value`, `.out`,
`layers.<i>.ffn.fc1`, `.fc2`) so LoRA patterns can target it, and every op is a plain one the ONNX exporter
traces into a readable graph. Layers are post-LN (x = LN(x + sublayer(x))) as in BERT.

Padding never leaks into the result: padded keys get a large negative, *finite* score bias, so their softmax weight
is exactly zero, and the pooled vector is a mean over real tokens only. A finite bias (not -inf) keeps a fully
padded row finite instead of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_positive_int, check_positive_number
from .registry import register_model

__all__ = ["TransformerConfig", "TextClassifier", "SelfAttention", "FeedForward", "EncoderLayer", "MASK_BIAS"]

# Added to the scores of padded keys. exp(-1e9 + s) underflows to exactly 0 in float32, and -1e9 is far from
# overflowing when added to real scores, unlike torch.finfo(float32).min.
MASK_BIAS = -1e9


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 1000
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 128
    max_len: int = 128
    num_classes: int = 4
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_positive_int("vocab_size", self.vocab_size, "1000 is the default")
        check_positive_int("d_model", self.d_model, "64 is the default, 256 a larger config")
        check_positive_int("n_layers", self.n_layers, "4 is the default")
        check_positive_int("n_heads", self.n_heads, "4 is the default")
        check_positive_int("d_ff", self.d_ff, "use 2-4x d_model, e.g. 128 for d_model=64")
        check_positive_int("max_len", self.max_len, "128 is the default")
        check_positive_int("num_classes", self.num_classes, "4 is the default")
        check_positive_number("layer_norm_eps", self.layer_norm_eps, "1e-5 is the default")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"e.g. n_heads={math.gcd(self.d_model, 4) or 1} or d_model={self.n_heads * 16}"
            )


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with separate query / key / value / out projections."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        # Prefix tuning's hook: None, or a module that prepends learned keys / values (methods/prefix_tuning.py).
        self.register_module("kv_prefix", None)

    def forward(self, x: torch.Tensor, score_bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], score_bias [B, 1, 1, T] (0 for tokens, MASK_BIAS for padding) -> [B, T, D]."""
        batch, seq, d_model = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, T', D] -> [B, H, T', D/H]
            return t.reshape(batch, t.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

        k, v = self.key(x), self.value(x)
        if self.kv_prefix is not None:
            k, v, score_bias = self.kv_prefix(k, v, score_bias)
        q, k, v = split_heads(self.query(x)), split_heads(k), split_heads(v)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim) + score_bias
        context = scores.softmax(dim=-1) @ v
        return self.out(context.transpose(1, 2).reshape(batch, seq, d_model))


class FeedForward(nn.Module):
    """fc1 -> GELU -> fc2, applied to each position."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Post-LN block: x = ln1(x + attn(x)); x = ln2(x + ffn(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn = SelfAttention(config.d_model, config.n_heads)
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config.d_model, config.d_ff)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, score_bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, score_bias))
        return self.ln2(x + self.ffn(x))


@register_model("transformer", TransformerConfig)
class TextClassifier(nn.Module):
    """input_ids, attention_mask [batch, seq] (int64, mask 1 = token, 0 = padding) -> logits [batch, num_classes].

    seq must be <= max_len (the position table's size); `make_example_batch` checks it, forward does not, so that
    the exported graph keeps `seq` symbolic.
    """

    default_lora_targets = ("query", "value")
    default_ia3_targets = ("key", "value", "fc2")
    default_ia3_feedforward_targets = ("fc2",)
    default_adapter_targets = ("out", "fc2")  # Houlsby: after attention and after the feed-forward block

    def __init__(self, config: TransformerConfig = TransformerConfig()):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_len, config.d_model)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))
        self.head = nn.Linear(config.d_model, config.num_classes)
        self.num_classes = config.num_classes
        self.vocab_size = config.vocab_size
        self.max_len = config.max_len
        self.input_specs = [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
        ]

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (the Hugging Face name), which prompt tuning reads."""
        return self.token_embedding

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pass input_ids, or inputs_embeds [batch, seq, d_model] already looked up (prompt tuning does)."""
        h = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        positions = torch.arange(h.shape[1], device=h.device)
        h = h + self.position_embedding(positions)
        mask = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device) if attention_mask is None else attention_mask.to(h.dtype)
        score_bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]
        for layer in self.layers:
            h = layer(h, score_bias)
        # Mean over real tokens; clamp so an all-padding row divides by 1 instead of 0.
        pooled = (h * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.head(pooled)
