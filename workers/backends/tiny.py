"""Tiny text-to-image pipelines with deterministic random weights, built offline.

They make noise, not pictures: they exist so that the worker, the tests and a laptop demo run the real
diffusers code path (tokenizer, text encoder, UNet, scheduler, VAE) in milliseconds without a download.
The shapes follow diffusers' own fast tests (``get_dummy_components``). Every module is built under a
fixed seed, so two builds hold identical weights and the same seed gives the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The defining modules, not the package root: under a type checker diffusers' root exports
    # placeholder classes, which would make every attribute an error.
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from transformers import CLIPTokenizer

_WEIGHT_SEED = 0
_TEXT_HIDDEN = 32
_TEXT_MAX_TOKENS = 77  # CLIP's context length; the pipeline pads and truncates prompts to it.
_TEXT_VOCAB_SIZE = 1000
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


@contextmanager
def _seeded() -> Iterator[None]:
    """Seed torch for one module's initialisation without disturbing anyone else's random stream."""
    import torch

    # fork_rng restores the global generator afterwards; devices=[] keeps CUDA out of it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        yield


def _for_inference(module: Any) -> Any:
    """Constructed modules start in training mode; from_pretrained would have left them in eval."""
    return module.eval()


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


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
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
    with _seeded():
        return _for_inference(CLIPTextModel(config))


def _tiny_vae(latent_channels: int = 4) -> Any:
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


# "builtin:<name>" sources in the catalog resolve here. SDXL- and Flux-shaped builders join later.
BUILTINS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": build_tiny_sd,
}
