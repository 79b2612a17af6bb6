"""Tiny text-to-image pipelines with deterministic random weights, built offline.

They make noise, not pictures: they exist so that the worker, the tests and a laptop demo run the real
diffusers code path (tokenizers, text encoders, denoiser, scheduler, VAE) in milliseconds without a
download, for each latent family the backend treats differently: SD 1.x, SDXL (two text encoders,
size/crop conditioning) and Flux (T5 + CLIP, a transformer over packed 16-channel latents). The shapes
follow diffusers' own fast tests (``get_dummy_components``). Every module is built under a fixed seed,
so two builds hold identical weights and the same seed gives the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The defining modules, not the package root: under a type checker diffusers' root exports
    # placeholder classes, which would make every attribute an error.
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Tokenizer

_WEIGHT_SEED = 0
_TEXT_HIDDEN = 32
_TEXT_MAX_TOKENS = 77  # CLIP's context length; the pipeline pads and truncates prompts to it.
_TEXT_VOCAB_SIZE = 1000
# FluxPipeline pads every prompt to max_sequence_length, 512 unless the call asks for fewer.
_T5_MAX_TOKENS = 512
# SDXL's UNet takes six size/crop numbers, each embedded in this many dimensions, next to the pooled text.
_SDXL_TIME_EMBED_DIM = 8
_FLUX_LATENT_CHANNELS = 16
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# A handful of merges so the BPE model really merges; which ones hardly matters for random weights.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("a", "t</w>"),
    ("c", "at</w>"),
    ("d", "o"),
    ("do", "g</w>"),
)
# Whole-word pieces for the T5 tokenizer, so Unigram has real choices to make between pieces.
_T5_WORDS = ("the", "a", "of", "and", "in", "with", "cat", "dog", "fox", "red", "snow", "photo")


@contextmanager
def _seeded() -> Iterator[None]:
    """Seed torch for one module's initialisation without disturbing anyone else's random stream."""
    import torch

    # fork_rng restores the global generator afterwards; devices=[] keeps CUDA out of it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        yield


def _for_inference(module: Any) -> Any:
    """Eval mode (from_pretrained would have set it) and frozen weights.

    Frozen because loading a LoRA freezes the base weights (peft does), and on the CPU a matmul with a
    weight that requires grad takes another kernel path: without this, the first image before any LoRA
    differed in the 7th digit from the same image after a LoRA was loaded and unloaded.
    """
    return module.eval().requires_grad_(False)


def build_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer built in memory: every byte, its end-of-word form, a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # sorted() because alphabet() is a set: token ids must not depend on hash order.
    byte_chars = sorted(ByteLevel.alphabet())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *(a + b for a, b in _MERGES)]
    # The special tokens take the highest ids, as in the real CLIP vocabulary.
    tokens += [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) <= _TEXT_VOCAB_SIZE
    # tokenizers wants (left, right) tuples here, whatever transformers' list[str] annotation says.
    merges: list[Any] = list(_MERGES)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=_EOS,
        model_max_length=_TEXT_MAX_TOKENS,
    )


def build_t5_tokenizer() -> T5Tokenizer:
    """A SentencePiece-style Unigram T5 tokenizer built in memory: specials, characters, a few words."""
    from transformers import T5Tokenizer

    printable = [chr(code) for code in range(33, 127)]
    # T5's fixed layout: <pad>=0, </s>=1, <unk>=2. "▁" marks a word start (Metaspace adds it); the
    # scores are log-probabilities, so a whole word beats its letters and "▁x" beats "▁" + "x".
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + char, -2.0) for char in printable]
    pieces += [(char, -2.5) for char in printable]
    pieces += [("▁" + word, -1.0) for word in _T5_WORDS]
    # extra_ids=0: no sentinel tokens, which only span-corruption pretraining uses.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX_TOKENS)


def _clip_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=_TEXT_VOCAB_SIZE,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=_TEXT_MAX_TOKENS,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=_TEXT_HIDDEN,
        # The real ids, so the pooled output is read at the end-of-text token.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> Any:
    from transformers import CLIPTextModel

    with _seeded():
        return _for_inference(CLIPTextModel(_clip_text_config(tokenizer)))


def _clip_text_encoder_with_projection(tokenizer: CLIPTokenizer) -> Any:
    """SDXL's second encoder (OpenCLIP bigG in the real model): its projected pooled output conditions the UNet."""
    from transformers import CLIPTextModelWithProjection

    with _seeded():
        return _for_inference(CLIPTextModelWithProjection(_clip_text_config(tokenizer)))


def _t5_text_encoder(tokenizer: T5Tokenizer) -> Any:
    from transformers import T5Config, T5EncoderModel

    # The sizes of hf-internal-testing/tiny-random-t5, which diffusers' Flux tests use; gated-gelu as T5 v1.1.
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_TEXT_HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded():
        return _for_inference(T5EncoderModel(config))


def _tiny_vae(
    latent_channels: int = 4,
    *,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    quant_convs: bool = True,
) -> Any:
    """The family's latent statistics (scaling, shift, quant convs) as in the real VAE's config."""
    from diffusers import AutoencoderKL

    with _seeded():
        # Four blocks: the 8x latent downscale of real SD VAEs. With two, a 1024x1024 request
        # meant attention over 512x512 latents (minutes on a CPU); now it takes seconds, so seed
        # clients' 1024-pixel examples run as written. No mid-block attention, for the same reason.
        vae = AutoencoderKL(
            block_out_channels=(4, 8, 8, 8),
            layers_per_block=1,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=latent_channels,
            norm_num_groups=2,
            mid_block_add_attention=False,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=quant_convs,
            use_post_quant_conv=quant_convs,
        )
    return _for_inference(vae)


def build_tiny_sd() -> StableDiffusionPipeline:
    """A Stable-Diffusion-1.x-shaped pipeline (4 latent channels, CLIP text encoder, DDIM)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    with _seeded():
        unet = UNet2DConditionModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_HIDDEN,
            norm_num_groups=2,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = build_clip_tokenizer()
    # A dict, as diffusers' own tests do: the optional parts are None, which the annotations deny.
    components: dict[str, Any] = {
        "vae": _tiny_vae(),
        "text_encoder": _clip_text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "unet": _for_inference(unet),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: two CLIP encoders, a UNet with size/crop ("text_time") conditioning, Euler."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    with _seeded():
        unet = UNet2DConditionModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # Head counts (the legacy name): fewer, wider heads than diffusers' test's (2, 4) cut
            # the UNet's CPU time on a 1024-pixel image by about a third.
            attention_head_dim=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            transformer_layers_per_block=(1, 2),
            # Six size/crop numbers plus the second encoder's projected pooled output.
            projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _TEXT_HIDDEN,
            # Both encoders' penultimate hidden states, concatenated.
            cross_attention_dim=2 * _TEXT_HIDDEN,
            norm_num_groups=2,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    components: dict[str, Any] = {
        "vae": _tiny_vae(scaling_factor=0.13025),
        "text_encoder": _clip_text_encoder(tokenizer),
        "text_encoder_2": _clip_text_encoder_with_projection(tokenizer_2),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": _for_inference(unet),
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }
    # force_zeros_for_empty_prompt as SDXL base ships it (an empty negative prompt is zeros, not
    # encoded ""). No watermarker: it would make output depend on whether a package is installed.
    return StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)


def build_tiny_flux() -> FluxPipeline:
    """A FLUX.1-schnell-shaped pipeline: CLIP + T5, a transformer over packed 16-channel latents, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    with _seeded():
        transformer = FluxTransformer2DModel(
            patch_size=1,
            # The pipeline packs 2x2 patches of the latent grid into one token.
            in_channels=4 * _FLUX_LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_HIDDEN,  # T5's hidden size
            pooled_projection_dim=_TEXT_HIDDEN,  # CLIP's pooled output
            axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
            guidance_embeds=False,  # schnell: no distilled guidance input
        )
    components: dict[str, Any] = {
        # FLUX.1's VAE statistics; it has no quant convs.
        "vae": _tiny_vae(_FLUX_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False),
        "text_encoder": _clip_text_encoder(clip_tokenizer),
        "tokenizer": clip_tokenizer,
        "text_encoder_2": _t5_text_encoder(t5_tokenizer),
        "tokenizer_2": t5_tokenizer,
        "transformer": _for_inference(transformer),
        # schnell's scheduler config is the default: shift 1.0, no resolution-dependent shift.
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }
    return FluxPipeline(**components)


# "builtin:<name>" sources in the catalog resolve here.
BUILTINS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-flux": build_tiny_flux,
}
