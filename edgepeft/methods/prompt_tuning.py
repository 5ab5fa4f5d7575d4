"""Prompt tuning: learned soft tokens prepended to the input embeddings (Lester et al. 2021).

Works on any model that, like Hugging Face models and the built-in transformer, has `get_input_embeddings()` and
whose forward takes `inputs_embeds` and `attention_mask` by keyword. The method adds the prompt as
`model.soft_prompt.weight` ([num_virtual_tokens, hidden]) and a forward pre-hook that rewrites a call
`model(input_ids=..., attention_mask=...)` into `model(inputs_embeds=[prompt; embed(ids)], attention_mask=[1...; mask])`,
as huggingface/peft does. Position embeddings then count the prompt too, so the model accepts
`num_virtual_tokens` fewer real tokens: `model.max_len` shrinks by that much.

The outputs gain `num_virtual_tokens` positions at the front, which sequence-level heads (pooling, classifiers)
absorb; per-token outputs (token classification, causal LM) would need the labels padded by the same amount,
which is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, ModelError, check_positive_int
from .base import config_to_dict, register_method

__all__ = ["PromptTuningConfig", "SoftPrompt"]

_INITS = ("vocab", "random", "text", "tokens")


@register_method
@dataclass(frozen=True)
class PromptTuningConfig:
    """num_virtual_tokens: length of the soft prompt. init: "vocab" copies the embeddings of randomly drawn
    vocabulary tokens (Lester et al.'s sampled-vocabulary init, better than random), "random" draws N(0, 0.02),
    "text" copies the embeddings of `init_text` as the model's own tokenizer splits it (a task description such as
    "Classify the intent of this command:", PEFT's TEXT init; needs a model loaded from a directory with a
    tokenizer.json), "tokens" those of `init_token_ids`. Text or ids shorter than the prompt are repeated, longer
    ones cut, as PEFT does."""

    name: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int = 8
    init: str = "vocab"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "8 to 20 soft tokens are typical")
        if self.init not in _INITS:
            raise ConfigError(f"prompt_tuning init must be one of {list(_INITS)}, got {self.init!r}")
        text = self.init_text
        if (self.init == "text") != (text is not None) or (text is not None and not text.strip()):
            raise ConfigError('prompt_tuning: init="text" and a non-empty init_text go together, e.g. '
                              'PromptTuningConfig(init="text", init_text="Classify the intent of this command:")')
        ids = self.init_token_ids
        if (self.init == "tokens") != (ids is not None) or (ids is not None and (
                not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids))):
            raise ConfigError('prompt_tuning: init="tokens" and init_token_ids (a non-empty tuple of token ids >= 0) '
                              'go together, e.g. PromptTuningConfig(init="tokens", init_token_ids=(2023, 2003))')

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def apply_to(self, model: nn.Module) -> dict[str, Any]:
        """Add `soft_prompt` and the pre-hook that prepends it; shrink `model.max_len` by the prompt's length."""
        get_embeddings = getattr(model, "get_input_embeddings", None)
        if not callable(get_embeddings):
            raise ModelError(
                f"prompt_tuning: {type(model).__name__} has no get_input_embeddings(); prompt tuning needs a text "
                "model whose forward takes inputs_embeds and attention_mask (a Hugging Face model or the built-in "
                "transformer)"
            )
        if getattr(model, "soft_prompt", None) is not None:
            raise ConfigError("prompt_tuning: the model already has a soft prompt; apply prompt tuning once")
        table = get_embeddings().weight
        max_len = getattr(model, "max_len", None)
        if isinstance(max_len, int) and max_len <= self.num_virtual_tokens:
            raise ConfigError(f"prompt_tuning: num_virtual_tokens {self.num_virtual_tokens} leaves no room for real "
                              f"tokens within the model's max_len {max_len}; use fewer virtual tokens")
        rows = _initial_rows(self, model, table.shape[0])
        model.soft_prompt = SoftPrompt(self.num_virtual_tokens, table, rows)
        model.register_forward_pre_hook(_prepend_soft_prompt, with_kwargs=True)
        if isinstance(max_len, int):
            model.max_len = max_len - self.num_virtual_tokens
        return self.to_dict()


def _initial_rows(config: PromptTuningConfig, model: nn.Module, vocab_size: int) -> torch.Tensor | None:
    """The vocabulary rows the prompt starts from, cycled or cut to the prompt's length; None for "random"."""
    if config.init == "vocab":
        return torch.randint(0, vocab_size, (config.num_virtual_tokens,))
    if config.init == "tokens":
        ids = list(config.init_token_ids or ())
    elif config.init == "text":
        ids = _tokenize(model, config.init_text or "")
    else:
        return None
    too_big = [i for i in ids if i >= vocab_size]
    if too_big:
        raise ConfigError(f"prompt_tuning: token ids {too_big[:5]} are outside the model's vocabulary of {vocab_size}; "
                          "take them from this model's tokenizer")
    repeats = -(-config.num_virtual_tokens // len(ids))
    return torch.tensor((ids * repeats)[: config.num_virtual_tokens], dtype=torch.int64)


def _tokenize(model: nn.Module, text: str) -> list[int]:
    """`text` as the model's tokenizer.json splits it, without special tokens ([CLS], <s>, ...)."""
    path = getattr(model, "edgepeft_tokenizer", None)
    if path is None:
        raise ConfigError('prompt_tuning: init="text" needs the model\'s tokenizer, and this model has none (load it '
                          'with load_hf_model from a directory with tokenizer.json), or pass init="tokens" with '
                          "init_token_ids")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # a tokenizer.json may pad every text to a fixed length (MiniLM's pads to 128)
    tokenizer.no_truncation()
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ConfigError(f"prompt_tuning: init_text {text!r} gives no tokens; use a few words that describe the task")
    return ids


class SoftPrompt(nn.Module):
    """The learned prompt, `weight` [num_virtual_tokens, hidden], expanded over the batch when called."""

    def __init__(self, num_virtual_tokens: int, embedding_table: torch.Tensor, rows: torch.Tensor | None = None):
        """`rows`: the vocabulary rows to start from; None starts from N(0, 0.02)."""
        super().__init__()
        with torch.no_grad():
            if rows is not None:
                start = embedding_table[rows].detach().clone()
            else:
                start = 0.02 * torch.randn(num_virtual_tokens, embedding_table.shape[1])
        self.weight = nn.Parameter(start.to(embedding_table.dtype))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


def _prepend_soft_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: turn input_ids into inputs_embeds with the prompt in front, and extend the mask."""
    if args or "input_ids" not in kwargs:
        raise ModelError("prompt_tuning: call the model with keyword arguments input_ids=..., attention_mask=...")
    kwargs = dict(kwargs)
    input_ids = kwargs.pop("input_ids")
    embeds = model.get_input_embeddings()(input_ids)
    prompt = model.soft_prompt(embeds.shape[0]).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.int64, device=input_ids.device)
    ones = torch.ones(mask.shape[0], prompt.shape[1], dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:  # BERT-style segment ids: the prompt belongs to the first segment
        kwargs["token_type_ids"] = torch.cat([torch.zeros_like(ones, dtype=token_types.dtype), token_types], dim=1)
    return (), kwargs
