"""Trigger words with a weight: prepended to the prompt, emphasised in the text encoders' output.

diffusers pipelines take no ``(word:1.2)`` syntax, so the weight is applied where A1111 applies its
emphasis: to the text encoder's token embeddings. While ``weighted_segments`` is active, forward hooks
on the pipeline's text encoders (CLIP and T5 alike) find every encoded row that starts with the
trigger prefix, multiply those token positions by their weight in ``last_hidden_state`` and in every
``hidden_states`` entry (SDXL and SD3 read a penultimate layer), then rescale the row so its mean is
what it was. Rows without the prefix, such as the negative prompt's, are left bit for bit as they were.
Pooled outputs are left alone: they summarise the whole prompt, and A1111 does not weight them either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from schemas import LoraRequest, LoraSpec

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

# (text encoder, its tokenizer) as diffusers pipelines name them: SD, SDXL, SD3, Flux.
_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
# A row whose mean is this small next to its mean magnitude has no mean to keep (a layer-normed output
# without bias): dividing by it would amplify rounding noise, so such a row is only weighted.
_NEGLIGIBLE_MEAN = 1e-4


@dataclass(frozen=True)
class WeightedText:
    """A stretch of the prompt's prefix and the weight its tokens get."""

    text: str
    weight: float


def trigger_segments(loras_with_specs: Iterable[tuple[LoraRequest, LoraSpec]]) -> list[WeightedText]:
    """Each LoRA's trigger words (not yet named by an earlier LoRA) with that LoRA's ``trigger_weight``.

    Each segment ends in a comma, so it ends a word on its own: tokenizing the segments apart gives
    the same tokens as tokenizing the whole prompt (CLIP and T5 both split words at spaces first).
    """
    seen: set[str] = set()
    segments = []
    for request, spec in loras_with_specs:
        words = [word.strip() for word in spec.trigger_words if word.strip() and word.strip() not in seen]
        seen.update(words)
        if words:
            segments.append(WeightedText(", ".join(words) + ",", request.trigger_weight))
    return segments


def prompt_with_triggers(prompt: str, loras_with_specs: Iterable[tuple[LoraRequest, LoraSpec]]) -> tuple[str, str]:
    """The prompt with the LoRAs' trigger words in front, and that prefix ("" when there are none)."""
    prefix = " ".join(segment.text for segment in trigger_segments(loras_with_specs))
    return (f"{prefix} {prompt}" if prefix else prompt), prefix


@contextmanager
def weighted_prefix(pipeline: Any, prefix_text: str, weight: float) -> Iterator[None]:
    """Weight ``prefix_text`` (the start of the prompts about to be encoded) by ``weight``."""
    with weighted_segments(pipeline, [WeightedText(prefix_text, weight)] if prefix_text else []):
        yield


@contextmanager
def weighted_segments(pipeline: Any, segments: Sequence[WeightedText]) -> Iterator[None]:
    """Weight each segment of the prompts' prefix by its own weight; no hooks when every weight is 1."""
    for segment in segments:
        if not math.isfinite(segment.weight):
            raise ValueError(f"trigger weight {segment.weight} is not a finite number")
    if all(segment.weight == 1.0 for segment in segments):
        yield
        return
    handles = []
    try:
        for encoder_name, tokenizer_name in _ENCODERS:
            encoder = getattr(pipeline, encoder_name, None)
            tokenizer = getattr(pipeline, tokenizer_name, None)
            if encoder is None or tokenizer is None:
                continue
            emphasis = _PrefixEmphasis.for_tokenizer(tokenizer, segments, encoder_name)
            if emphasis is not None:
                handles.append(encoder.register_forward_hook(emphasis.hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class _PrefixEmphasis:
    """The token ids one encoder sees for the prefix, where they start, and each token's weight."""

    start: int
    token_ids: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, segments: Sequence[WeightedText], encoder: str) -> _PrefixEmphasis | None:
        token_ids: list[int] = []
        weights: list[float] = []
        for segment in segments:
            ids = list(tokenizer(segment.text, add_special_tokens=False)["input_ids"])
            token_ids += ids
            weights += [segment.weight] * len(ids)
        prefix_text = " ".join(segment.text for segment in segments)
        if list(tokenizer(prefix_text, add_special_tokens=False)["input_ids"]) != token_ids:
            log.warning("lora.trigger_weight_skipped", encoder=encoder, reason="segments tokenize differently joined")
            return None
        # Where the prefix starts in an encoded prompt: after BOS for CLIP, at 0 for T5 (no BOS).
        encoded = list(tokenizer(prefix_text)["input_ids"])
        start = next((i for i in range(len(encoded)) if encoded[i : i + len(token_ids)] == token_ids), None)
        context = getattr(tokenizer, "model_max_length", None)
        if start is None or (isinstance(context, int) and start + len(token_ids) >= context):
            log.warning("lora.trigger_weight_skipped", encoder=encoder, reason="trigger words exceed the context")
            return None
        return cls(start, tuple(token_ids), tuple(weights))

    def hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or input_ids.dim() != 2:
            return None
        import torch

        rows, length = input_ids.shape
        end = self.start + len(self.token_ids)
        if end > length:
            return None
        prefix = torch.tensor(self.token_ids, device=input_ids.device, dtype=input_ids.dtype)
        matches = (input_ids[:, self.start : end] == prefix).all(dim=1)
        if not bool(matches.any()):
            return None
        multipliers = torch.ones(rows, length, dtype=torch.float32, device=input_ids.device)
        multipliers[matches, self.start : end] = torch.tensor(self.weights, device=input_ids.device)
        return _map_token_states(output, (rows, length), lambda states: _emphasised(states, multipliers, matches))


def _emphasised(states: torch.Tensor, multipliers: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis on ``[rows, tokens, dim]``: weight the tokens, then restore each row's mean."""
    import torch

    original = states.float()
    weighted = original * multipliers.to(states.device)[..., None]
    old_mean = original.mean(dim=(1, 2))
    new_mean = weighted.mean(dim=(1, 2))
    magnitude = weighted.abs().mean(dim=(1, 2))
    has_mean = new_mean.abs() > _NEGLIGIBLE_MEAN * magnitude
    scale = torch.where(has_mean, old_mean / torch.where(has_mean, new_mean, 1.0), 1.0)
    rescaled = (weighted * scale[:, None, None]).to(states.dtype)
    # Rows without the prefix keep their exact values (no float round trip).
    return torch.where(matches.to(states.device)[:, None, None], rescaled, states)


def _map_token_states(output: Any, shape: tuple[int, int], change: Any) -> Any:
    """``output`` with every per-token tensor (``[rows, tokens, dim]``) replaced by ``change(tensor)``.

    Walks a transformers ModelOutput or a plain tuple alike. A tensor that appears twice (T5's last
    hidden state is also its last ``hidden_states`` entry) is changed once and shared again.
    """
    import torch

    # By id, holding the original too, so no freed tensor's id can be taken by another meanwhile.
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() != 3 or tuple(value.shape[:2]) != shape:
                return value
            if id(value) not in done:
                done[id(value)] = (value, change(value))
            return done[id(value)][1]
        if isinstance(value, tuple):
            return tuple(visit(item) for item in value)
        return value

    if isinstance(output, tuple):
        return visit(output)
    for key in list(output.keys()):
        # ModelOutput's item assignment sets the attribute too, so both views see the new tensor.
        output[key] = visit(output[key])
    return output
