"""Trigger words and their weight, on the tiny offline pipelines (SD, and SDXL and Flux where built in)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from schemas import LoraRequest, LoraSpec
from workers.backends.prompt_weighting import (
    WeightedText,
    prompt_with_triggers,
    trigger_segments,
    weighted_prefix,
    weighted_segments,
)
from workers.backends.tiny import BUILTINS

PIXEL = LoraSpec(id="pixel", name="Pixel", source="/loras/pixel.safetensors", trigger_words=("pixel art", "neon"))
INK = LoraSpec(id="ink", name="Ink", source="/loras/ink.safetensors", trigger_words=("ink sketch", "neon"))
PROMPT = "a red fox in snow"
NEGATIVE = "blurry photo"
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _with(spec: LoraSpec, trigger_weight: float = 1.0) -> tuple[LoraRequest, LoraSpec]:
    return LoraRequest(id=spec.id, trigger_weight=trigger_weight), spec


def _hooks(pipeline: Any) -> int:
    return sum(len(getattr(pipeline, name)._forward_hooks) for name in ENCODERS if getattr(pipeline, name, None))


# --- the prompt -------------------------------------------------------------------------------


def test_trigger_words_go_in_front_once_each_with_their_loras_weight() -> None:
    loras = [_with(PIXEL, 1.4), _with(INK, 0.6)]
    prompt, prefix = prompt_with_triggers(PROMPT, loras)
    assert prefix == "pixel art, neon, ink sketch,"
    assert prompt == f"{prefix} {PROMPT}"
    assert trigger_segments(loras) == [WeightedText("pixel art, neon,", 1.4), WeightedText("ink sketch,", 0.6)]


def test_no_trigger_words_leave_the_prompt_alone() -> None:
    bare = LoraSpec(id="bare", name="Bare", source="/loras/bare.safetensors")
    assert prompt_with_triggers(PROMPT, [_with(bare, 2.0)]) == (PROMPT, "")
    assert prompt_with_triggers(PROMPT, []) == (PROMPT, "")


def test_a_weight_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match="not a finite number"), weighted_prefix(object(), "neon,", float("nan")):
        pass


# --- tiny SD: images and embeddings ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd() -> Any:
    return BUILTINS["tiny-sd"]()


def _image(pipeline: Any, prompt: str, **extra: Any) -> np.ndarray:
    result = pipeline(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        **extra,
    )
    return np.asarray(result.images)


def _weighted_image(pipeline: Any, weight: float, **extra: Any) -> np.ndarray:
    prompt, prefix = prompt_with_triggers(PROMPT, [_with(PIXEL, weight)])
    with weighted_prefix(pipeline, prefix, weight):
        return _image(pipeline, prompt, **extra)


def test_trigger_weight_changes_the_image_and_one_is_the_plain_prompt(tiny_sd: Any) -> None:
    images = {weight: _weighted_image(tiny_sd, weight, negative_prompt=NEGATIVE) for weight in (1.0, 0.5, 1.5)}
    assert not np.array_equal(images[1.0], images[0.5])
    assert not np.array_equal(images[1.0], images[1.5])
    assert not np.array_equal(images[0.5], images[1.5])
    prompt, _ = prompt_with_triggers(PROMPT, [_with(PIXEL)])
    assert np.array_equal(images[1.0], _image(tiny_sd, prompt, negative_prompt=NEGATIVE))
    # Same weight, same seed: the same image again, so the differences above are the weight's.
    assert np.array_equal(images[1.5], _weighted_image(tiny_sd, 1.5, negative_prompt=NEGATIVE))


def test_weight_one_registers_no_hooks(tiny_sd: Any) -> None:
    with weighted_prefix(tiny_sd, "pixel art, neon,", 1.0):
        assert _hooks(tiny_sd) == 0
    with weighted_prefix(tiny_sd, "", 1.7):
        assert _hooks(tiny_sd) == 0


def _encoded(pipeline: Any, prompt: str) -> tuple[Any, Any]:
    with torch.no_grad():
        positive, negative = pipeline.encode_prompt(prompt, "cpu", 1, True, negative_prompt=NEGATIVE)
    return positive, negative


def test_only_the_prompt_is_weighted_never_the_negative_prompt_and_hooks_go_away(tiny_sd: Any) -> None:
    prompt, prefix = prompt_with_triggers(PROMPT, [_with(PIXEL)])
    plain_positive, plain_negative = _encoded(tiny_sd, prompt)
    with weighted_prefix(tiny_sd, prefix, 1.5):
        assert _hooks(tiny_sd) == 1
        positive, negative = _encoded(tiny_sd, prompt)
    assert _hooks(tiny_sd) == 0
    assert torch.equal(negative, plain_negative)
    assert not torch.allclose(positive, plain_positive)
    # Afterwards the same prompt encodes exactly as before.
    assert torch.equal(_encoded(tiny_sd, prompt)[0], plain_positive)


def test_rows_without_the_prefix_in_one_batch_are_untouched(tiny_sd: Any) -> None:
    prompt, prefix = prompt_with_triggers(PROMPT, [_with(PIXEL)])
    ids = tiny_sd.tokenizer(
        [prompt, PROMPT], padding="max_length", max_length=tiny_sd.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        plain = tiny_sd.text_encoder(ids).last_hidden_state
        with weighted_prefix(tiny_sd, prefix, 0.5):
            weighted = tiny_sd.text_encoder(ids).last_hidden_state
    assert not torch.allclose(weighted[0], plain[0])
    assert torch.equal(weighted[1], plain[1])


def test_prefix_tokens_are_scaled_by_their_weight_and_the_row_mean_is_kept(tiny_sd: Any) -> None:
    """A1111's emphasis on every hidden state: prefix / rest ratio = weight, row mean unchanged."""
    first, second = WeightedText("pixel art, neon,", 1.6), WeightedText("ink sketch,", 0.7)
    prompt = f"{first.text} {second.text} {PROMPT}"
    ids = tiny_sd.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    spans = [len(tiny_sd.tokenizer(s.text, add_special_tokens=False).input_ids) for s in (first, second)]
    with torch.no_grad():
        plain = tiny_sd.text_encoder(ids, output_hidden_states=True)
        with weighted_segments(tiny_sd, [first, second]):
            weighted = tiny_sd.text_encoder(ids, output_hidden_states=True)
    pairs = [*zip(plain.hidden_states, weighted.hidden_states, strict=True)]
    pairs.append((plain.last_hidden_state, weighted.last_hidden_state))
    means_kept = 0
    for before, after in pairs:
        ratio = after[0] / before[0]
        rest = ratio[1 + sum(spans) :].median()  # every token after the prefix shares one rescale factor
        expected = [first.weight] * spans[0] + [second.weight] * spans[1]
        prefix_ratio = ratio[1 : 1 + sum(spans)].median(dim=1).values / rest
        assert torch.allclose(prefix_ratio, torch.tensor(expected), rtol=1e-3)
        assert torch.allclose(ratio[0].median() / rest, torch.tensor(1.0), rtol=1e-3)  # BOS keeps its weight
        if before.mean().abs() > 1e-3 * before.abs().mean():
            assert torch.allclose(after.mean(), before.mean(), rtol=1e-4)
            means_kept += 1
    # The residual stream has a mean to keep; only the layer-normed output (zero bias here) has none.
    assert means_kept >= len(pairs) - 1


# --- SDXL (two CLIPs) and Flux (CLIP + T5, no BOS) ---------------------------------------------


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-flux"])
def bigger_pipeline(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield BUILTINS[request.param]()


def test_trigger_weight_changes_sdxl_and_flux_images(bigger_pipeline: Any) -> None:
    images = {weight: _weighted_image(bigger_pipeline, weight) for weight in (1.0, 0.5, 1.5)}
    assert not np.array_equal(images[1.0], images[0.5])
    assert not np.array_equal(images[1.0], images[1.5])
    assert not np.array_equal(images[0.5], images[1.5])
    prompt, _ = prompt_with_triggers(PROMPT, [_with(PIXEL)])
    assert np.array_equal(images[1.0], _image(bigger_pipeline, prompt))
    assert _hooks(bigger_pipeline) == 0


def test_every_text_encoder_weights_the_prefix_and_spares_other_prompts(bigger_pipeline: Any) -> None:
    prompt, prefix = prompt_with_triggers(PROMPT, [_with(PIXEL)])
    encoders = [name for name in ENCODERS if getattr(bigger_pipeline, name, None) is not None]
    outputs: dict[str, list[Any]] = {name: [] for name in encoders}

    def record(name: str) -> Any:
        def token_states(_module: Any, _args: Any, output: Any) -> None:
            # What the pipelines read: SDXL a penultimate layer, Flux's T5 its last hidden state.
            states = output["hidden_states"][-2] if "hidden_states" in output else output["last_hidden_state"]
            outputs[name].append(states.detach().clone())

        return token_states

    def encode_all(weight: float) -> None:
        handles = []
        with weighted_prefix(bigger_pipeline, prefix, weight):
            # Registered after the weighting hooks, so they see what the pipeline gets.
            handles = [getattr(bigger_pipeline, n).register_forward_hook(record(n)) for n in encoders]
            try:
                with torch.no_grad():
                    bigger_pipeline.encode_prompt(prompt=prompt, prompt_2=None)
                    bigger_pipeline.encode_prompt(prompt=NEGATIVE, prompt_2=None)
            finally:
                for handle in handles:
                    handle.remove()

    encode_all(1.0)
    encode_all(1.5)
    for name in encoders:
        with_prefix_plain, negative_plain, with_prefix_weighted, negative_weighted = outputs[name]
        assert torch.equal(negative_weighted, negative_plain), name
        assert not torch.allclose(with_prefix_weighted, with_prefix_plain), name
