"""Build a seeded example input batch from a model's `input_specs`, e.g. for export tracing or a smoke test.

Values follow the input's role: float inputs are standard normal, `attention_mask` marks a random-length prefix of
each row as real tokens (the first row is full, so both padded and unpadded rows appear), and other integer inputs
are token ids below the model's `vocab_size`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, ModelError, check_positive_int

__all__ = ["make_example_batch", "DEFAULT_SEQ_LEN"]

DEFAULT_SEQ_LEN = 16
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def _resolve_shape(name: str, shape: list, batch_size: int, seq_len: int) -> list[int]:
    dims = []
    for d in shape:
        if d == "batch":
            dims.append(batch_size)
        elif d == "seq":
            dims.append(seq_len)
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            dims.append(d)
        else:
            raise ModelError(f"input {name!r} has dim {d!r}; example batches know ints, 'batch' and 'seq'")
    return dims


def make_example_batch(
    model: nn.Module, batch_size: int, seq_len: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs (no labels) keyed by input name, shaped by `model.input_specs`; the same seed gives the same batch."""
    specs = getattr(model, "input_specs", None)
    if not specs:
        raise ModelError(
            f"{type(model).__name__} has no input_specs; set model.input_specs = "
            "[{'name': 'x', 'dtype': 'float32', 'shape': ['batch', 64]}]"
        )
    check_positive_int("batch_size", batch_size, "pass 1 or more")
    max_len = getattr(model, "max_len", None)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_len) if max_len else DEFAULT_SEQ_LEN
    check_positive_int("seq_len", seq_len, f"pass e.g. {DEFAULT_SEQ_LEN}")
    if max_len is not None and seq_len > max_len:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_len {max_len}; pass seq_len <= {max_len}")
    generator = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for spec in specs:
        name, dtype = spec["name"], spec["dtype"]
        if dtype not in _DTYPES:
            raise ModelError(f"input {name!r} has dtype {dtype!r}; example batches know {sorted(_DTYPES)}")
        shape = _resolve_shape(name, spec["shape"], batch_size, seq_len)
        torch_dtype = _DTYPES[dtype]
        if torch_dtype.is_floating_point:
            batch[name] = torch.randn(shape, generator=generator).to(torch_dtype)
        elif name == "attention_mask":
            lengths = torch.randint(1, shape[-1] + 1, shape[:-1], generator=generator)
            lengths.view(-1)[0] = shape[-1]
            batch[name] = (torch.arange(shape[-1]) < lengths[..., None]).to(torch_dtype)
        else:
            high = getattr(model, "vocab_size", 2)
            batch[name] = torch.randint(0, high, shape, generator=generator, dtype=torch_dtype)
    return batch
