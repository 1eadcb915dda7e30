"""Multimodal testbed: synthetic scenes with exact ground truth and two tiny trained
vision-language models built only from standard Hugging Face classes.

* ``llava_ar``        -- ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama text
  model), causal, answers by greedy next-token decoding.
* ``llada_diffusion`` -- the same class with ``text_config.is_causal=False`` (bidirectional
  attention) trained as a LLaDA-style masked-diffusion model; answers with
  :func:`interp.testbed.diffusion.diffusion_generate`.

Sequence format (one question per sequence)::

    <bos> <image>*64 user : <question> assistant : <answer> <eos>

Image token ``k`` (position ``1 + k`` of the sequence) is the patch at row ``k // 8``,
column ``k % 8`` of the 8x8 grid of 4x4-pixel patches.

Quick start::

    from interp.testbed import load_testbed, make_dataset, build_inputs
    model, tok, meta = load_testbed("llava_ar")
    scene = make_dataset(1, split="test")[0]
    q = scene.question("colour")
    inputs = build_inputs(tok, meta, scene, q)            # prompt only
    answer = predict_answers(model, tok, meta, [scene], [q])[0]
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from .diffusion import diffusion_generate
from .scenes import (
    GRID,
    IMAGE_SIZE,
    N_PATCHES,
    PATCH,
    QUESTION_TYPES,
    Question,
    Scene,
    SceneObject,
    make_dataset,
    make_scene,
    object_patch_mask,
    pixel_patch_mask,
    scene_seed,
)
from .vocab import COLOURS, SHAPES, VOCAB, build_tokenizer

from . import items as _items  # noqa: E402,F401  (registers the scene_seed item source with interp.vlm)

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
TESTBED_NAMES = ("llava_ar", "llada_diffusion", "smol_llava")

__all__ = [
    "CHECKPOINT_DIR",
    "COLOURS",
    "GRID",
    "IMAGE_SIZE",
    "N_PATCHES",
    "PATCH",
    "QUESTION_TYPES",
    "Question",
    "SHAPES",
    "Scene",
    "SceneObject",
    "TESTBED_NAMES",
    "VOCAB",
    "build_inputs",
    "build_tokenizer",
    "diffusion_generate",
    "evaluate_accuracy",
    "load_testbed",
    "make_dataset",
    "make_scene",
    "normalize_image",
    "object_patch_mask",
    "pixel_patch_mask",
    "predict_answers",
    "prompt_text",
    "scene_seed",
]


# ---------------------------------------------------------------------- loading
def load_testbed(name: str = "llava_ar", attn_implementation: str = "eager", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
    """Load a committed testbed model -> ``(model, tokenizer, meta)``.

    ``name`` is ``"llava_ar"`` / ``"llada_diffusion"`` / ``"smol_llava"`` (or a path to a checkpoint dir).
    A folder holding only ``vision.safetensors`` (``smol_llava``) is assembled with its base LM
    (:func:`interp.model.assemble_vlm`; the embedded SmolLM2, sha256-checked).
    The model is returned in eval mode.  ``meta`` is the parsed ``testbed.json``.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from ..model import VISION_WEIGHTS, _from_path_or_id

    path = Path(name)
    if not path.is_dir():
        if name not in TESTBED_NAMES:
            raise ValueError(f"unknown testbed {name!r}; expected one of {TESTBED_NAMES} or a directory")
        path = CHECKPOINT_DIR / name
    if (path / VISION_WEIGHTS).exists() and not (path / "model.safetensors").exists():
        model, tokenizer, _, _ = _from_path_or_id(str(path), dtype)
        model.set_attn_implementation(attn_implementation)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(
            str(path), attn_implementation=attn_implementation, dtype=dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.to(device).eval()
    meta = json.loads((path / "testbed.json").read_text())
    meta["path"] = str(path)
    if meta["kind"] == "diffusion" and getattr(model.config.text_config, "is_causal", True):
        raise RuntimeError("diffusion checkpoint lost text_config.is_causal=False")
    return model, tokenizer, meta


# ---------------------------------------------------------------------- inputs
def normalize_image(image: torch.Tensor, meta: dict) -> torch.Tensor:
    """[3,H,W] or [B,3,H,W] image in [0,1] -> normalised ``pixel_values`` (B,3,H,W)."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    mean = torch.tensor(meta["image_mean"], dtype=image.dtype).view(1, 3, 1, 1)
    std = torch.tensor(meta["image_std"], dtype=image.dtype).view(1, 3, 1, 1)
    return (image - mean) / std


def prompt_text(meta: dict, question: str, answer: str | None = None) -> str:
    """The textual sequence; ends with ``assistant :`` when ``answer`` is None.

    For the diffusion model the answer region is padded with ``<eos>`` to
    ``meta["gen_len"]`` tokens (as in training).  A ``meta`` with ``prompt_template`` /
    ``answer_template`` (``smol_llava``: SmolLM2's chat markup) fills those instead.
    """
    img = meta.get("image_token_join", " ").join([meta["image_token"]] * meta["n_image_tokens"])
    if "prompt_template" in meta:
        s = meta["prompt_template"].format(image=img, question=question)
        return s if answer is None else s + meta["answer_template"].format(answer=answer)
    s = f"<bos> {img} user : {question} assistant :"
    if answer is not None:
        words = answer.split()
        n_eos = max(1, meta.get("gen_len", 0) - len(words)) if meta["kind"] == "diffusion" else 1
        s += " " + " ".join(words + ["<eos>"] * n_eos)
    return s


def build_inputs(tokenizer, meta: dict, scene: Scene, question, answer: str | None = None) -> dict:
    """``dict(input_ids [1,L], pixel_values [1,3,32,32], attention_mask [1,L])``.

    ``question`` is a :class:`Question` or its text.  Without ``answer`` the sequence ends
    with ``assistant :`` (AR: next token is the answer; diffusion: append
    ``meta["gen_len"]`` mask tokens or call ``diffusion_generate``).
    """
    qtext = question.text if isinstance(question, Question) else str(question)
    ids = tokenizer(prompt_text(meta, qtext, answer), add_special_tokens=False, return_tensors="pt")["input_ids"]
    if tokenizer.unk_token_id is not None and (ids == tokenizer.unk_token_id).any():
        raise ValueError(f"unknown word in {qtext!r} / {answer!r}")
    return {
        "input_ids": ids,
        "pixel_values": normalize_image(scene.image, meta),
        "attention_mask": torch.ones_like(ids),
    }


# ---------------------------------------------------------------------- prediction
def _decode_answer(tokenizer, token_ids, meta: dict | None = None) -> str:
    eos = tokenizer.eos_token_id
    out = []
    for t in token_ids:
        t = int(t)
        if t == eos:
            break
        out.append(t)
    if meta is not None and meta.get("answer_decode") == "text":  # a subword tokenizer: decode, not join words
        return tokenizer.decode(out).strip()
    return " ".join(tokenizer.convert_ids_to_tokens(out))


@torch.no_grad()
def predict_answers(model, tokenizer, meta: dict, scenes: list[Scene], questions: list, kind: str | None = None,
                    batch_size: int = 256, max_new_tokens: int | None = None, steps: int | None = None,
                    block_len: int | None = None) -> list[str]:
    """Answer ``questions[i]`` about ``scenes[i]`` with the plain one-question format.

    AR: greedy next-token decoding (no cache) until ``<eos>``.  Diffusion:
    ``diffusion_generate`` with ``meta``'s gen_len / steps / block_len unless overridden.
    """
    kind = kind or meta["kind"]
    device = next(model.parameters()).device
    gen_len = meta.get("gen_len", 3)
    max_new_tokens = max_new_tokens or gen_len
    steps = steps or meta.get("diffusion_steps", gen_len)
    block_len = block_len or meta.get("diffusion_block_len", gen_len)
    encoded = [build_inputs(tokenizer, meta, s, q) for s, q in zip(scenes, questions)]
    groups = defaultdict(list)  # equal prompt lengths -> no padding needed
    for i, e in enumerate(encoded):
        groups[e["input_ids"].shape[1]].append(i)
    answers: list[str | None] = [None] * len(encoded)
    for _, idx in sorted(groups.items()):
        for b0 in range(0, len(idx), batch_size):
            bi = idx[b0 : b0 + batch_size]
            ids = torch.cat([encoded[i]["input_ids"] for i in bi]).to(device)
            px = torch.cat([encoded[i]["pixel_values"] for i in bi]).to(device, next(model.parameters()).dtype)
            L = ids.shape[1]
            if kind == "ar" and meta.get("decode_cache"):  # greedy with the KV cache (a large LM)
                x = ids
                done = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
                out = model(input_ids=x, pixel_values=px, use_cache=True, logits_to_keep=1)
                for _ in range(max_new_tokens):
                    nxt = out.logits[:, -1].argmax(-1)
                    x = torch.cat([x, nxt[:, None]], dim=1)
                    done |= nxt == tokenizer.eos_token_id
                    if done.all():
                        break
                    out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True,
                                logits_to_keep=1)
            elif kind == "ar":
                x = ids
                done = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
                for _ in range(max_new_tokens):
                    logits = model(input_ids=x, pixel_values=px, logits_to_keep=1).logits[:, -1]
                    nxt = logits.argmax(-1)
                    x = torch.cat([x, nxt[:, None]], dim=1)
                    done |= nxt == tokenizer.eos_token_id
                    if done.all():
                        break
            elif kind == "diffusion":
                x = diffusion_generate(model, ids, px, gen_len=gen_len, steps=steps, block_len=block_len,
                                       mask_id=meta["mask_token_id"])
            else:
                raise ValueError(kind)
            for j, i in enumerate(bi):
                answers[i] = _decode_answer(tokenizer, x[j, L:].tolist(), meta)
    return answers


def evaluate_accuracy(model, tokenizer, meta: dict, scenes: list[Scene], kind: str | None = None,
                      qtypes=QUESTION_TYPES, return_predictions: bool = False, **kw) -> dict:
    """Exact-match accuracy per question type (+ ``"overall"``) on ``scenes``.

    Each scene contributes one question per type (``scene.questions()``, deterministic;
    colour/where are skipped when no shape is unique).  Returns
    ``{"colour": acc, ..., "overall": acc, "n": {type: count}}`` (+ ``"predictions"``).
    """
    was_training = model.training
    model.eval()
    qs_all, sc_all = [], []
    for s in scenes:
        for q in s.questions(qtypes=qtypes):
            qs_all.append(q)
            sc_all.append(s)
    preds = predict_answers(model, tokenizer, meta, sc_all, qs_all, kind=kind, **kw)
    correct, total = defaultdict(int), defaultdict(int)
    for q, p in zip(qs_all, preds):
        total[q.qtype] += 1
        correct[q.qtype] += int(p == q.answer)
    res = {t: correct[t] / total[t] for t in qtypes if total[t]}
    res["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    res["n"] = dict(total)
    if return_predictions:
        res["predictions"] = list(zip(sc_all, qs_all, preds))
    model.train(was_training)
    return res
