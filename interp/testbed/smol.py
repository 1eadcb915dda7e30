"""``smol_llava``: a LLaVA-style VLM on the embedded SmolLM2-135M-Instruct, for the synthetic scenes.

* Language model: SmolLM2-135M-Instruct as ``interp.load("smollm2")`` gives it (the dequantised GGUF,
  sha256-checked), lightly tuned: its weights stay frozen and rank-8 LoRA factors on ``q_proj``/``v_proj`` of every
  layer are trained and merged at load time (``testbed.json``'s ``"lora"``).
* Vision: a 2-layer CLIP vision tower (32x32 image, 8x8-pixel patches -> a 4x4 grid of 16 patch tokens, CLS
  dropped) and LLaVA's 2-layer GELU projector to SmolLM2's 576-d input space. These and the LoRA factors are
  the trained, committed part (``vision.safetensors``); :func:`interp.model.assemble_vlm` puts the model together at load time.
* Image token: SmolLM2's existing special token ``<filename>`` (id 6, unused in chat) is ``image_token_index``;
  the vocabulary is not resized.
* Prompt: SmolLM2's ChatML markup without the chat template's default system turn (one user turn, then the
  assistant's answer closed by ``<|im_end|>``, SmolLM2's eos)::

      <|im_start|>user\\n<filename>*16\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

  Image token ``k`` (sequence position ``3 + k``) is the 8x8-pixel patch at row ``k // 4``, column ``k % 4``.
"""
from __future__ import annotations

IMAGE_TOKEN = "<filename>"
IMAGE_TOKEN_ID = 6
SMOL_GRID = 4
SMOL_PATCH = 8
N_SMOL_IMAGE_TOKENS = SMOL_GRID * SMOL_GRID
PROMPT_TEMPLATE = "<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n"
ANSWER_TEMPLATE = "{answer}<|im_end|>"
IMAGE_TOKEN_OFFSET = 3  # "<|im_start|>", "user", "\n"
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

VISION_DIMS = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)


def build_config(text_config):
    """The ``LlavaConfig`` of smol_llava around SmolLM2's ``LlamaConfig``."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(patch_size=SMOL_PATCH, image_size=32, num_channels=3,
                              projection_dim=VISION_DIMS["hidden_size"], **VISION_DIMS)
    return LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=N_SMOL_IMAGE_TOKENS, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=text_config.tie_word_embeddings,
    )


def build_meta() -> dict:
    from .scenes import QUESTION_TYPES
    from .vocab import COLOURS, SHAPES
    return {
        "name": "smol_llava",
        "kind": "ar",
        "model_class": "LlavaForConditionalGeneration",
        "language_model": "smollm2",
        "language_model_training": "frozen (no LM weight is trained; vision tower + projector only)",
        "image_size": 32,
        "patch_size": SMOL_PATCH,
        "grid": [SMOL_GRID, SMOL_GRID],
        "n_image_tokens": N_SMOL_IMAGE_TOKENS,
        "image_token": IMAGE_TOKEN,
        "image_token_id": IMAGE_TOKEN_ID,
        "image_token_join": "",
        "image_token_offset": IMAGE_TOKEN_OFFSET,
        "patch_index": "image token k is at sequence position image_token_offset + k; patch row = k // 4, col = k % 4",
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "normalization": "pixel_values = (image - mean) / std, image in [0,1], shape [B,3,32,32]",
        "prompt_template": PROMPT_TEMPLATE,
        "answer_template": ANSWER_TEMPLATE,
        "prompt_format": (PROMPT_TEMPLATE + ANSWER_TEMPLATE).replace("{image}", IMAGE_TOKEN + "*16"),
        "chat": "SmolLM2 ChatML markup, no system turn",
        "answer_decode": "text",
        "decode_cache": True,
        "bos_token_id": None,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "mask_token_id": None,
        "question_types": list(QUESTION_TYPES),
        "shapes": SHAPES,
        "colours": COLOURS,
        "gen_len": 5,
        "diffusion_steps": None,
        "diffusion_block_len": None,
        "answer_region": "answer + <|im_end|>; greedy next-token decoding",
        "attention": "causal",
    }
