"""Testbed questions as :class:`interp.vlm.VQAItem` items (the testbed is one source of VLM items among others),
as interp batches with token roles, and the answer at the answer position.

One (scene, question) item becomes one sequence ``<bos> <image>*64 user : <question> assistant :``
(the diffusion testbed appends ``gen_len`` mask tokens: the answer region, fully masked). Roles:

* ``bos`` [0], ``image`` (the 64 image tokens, patch k at position 1 + k), ``question`` (the words of
  the question), ``answer`` (the masked answer region; diffusion only), ``query`` (the position whose
  logits predict the answer's first token: the last prompt token for AR, the first mask for diffusion);
* ``object`` — the image tokens of the question's object (from the ground-truth boxes), ``objects`` —
  those of every object in the scene, and
  ``background`` — as many image tokens drawn (seeded by the scene) from patches that hold no object.

Batches are right-padded; ``answer_logits`` runs them in chunks with the roles known to the engine,
so specs addressing ``role:image``, ``role:answer`` or ``last`` resolve per sequence.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import vlm
from ..errors import InterpError
from ..roles import Batch
from ..vlm import VQAItem, slice_batch  # noqa: F401  (slice_batch: kept importable from here)
from .scenes import BACKGROUND, N_PATCHES, Question, Scene, make_scene

_DEFAULT_META = {"image_token": "<image>", "n_image_tokens": N_PATCHES, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3, "gen_len": 3}


def testbed_meta(model) -> dict:
    """The testbed's ``testbed.json`` for an interp Model loaded from a testbed checkpoint (its kind follows
    the model: ``ar`` when it attends causally, else ``diffusion``)."""
    path = Path(str(getattr(model.hf.config, "_name_or_path", ""))) / "testbed.json"
    meta = json.loads(path.read_text()) if path.is_file() else dict(_DEFAULT_META)
    meta["kind"] = "ar" if model.adapter.causal else "diffusion"
    if meta["kind"] == "diffusion":
        meta["mask_token_id"] = model.adapter.mask_token_id if model.adapter.mask_token_id is not None \
            else meta.get("mask_token_id")
    return meta


def is_testbed(model) -> bool:
    """Whether ``model`` was loaded from a testbed checkpoint (its folder holds a ``testbed.json``)."""
    return (Path(str(getattr(model.hf.config, "_name_or_path", ""))) / "testbed.json").is_file()


def default_items(model, n_scenes: int = 20, *, seed: int = 0) -> list[VQAItem]:
    """The built-in inputs of the VLM analyses on a testbed model: the questions about one object of
    ``n_scenes`` held-out scenes; refused (with what to give instead) for any other model."""
    if not is_testbed(model):
        raise InterpError(f"{model.name} is not a testbed model, so there are no built-in items for it: give a "
                          "list of interp.vlm.VQAItem (the image, a prompt with the model's image token, the answer, "
                          "and boxes or a mask of the answer's object)")
    from .localize import localisation_items
    return as_vqa_items(localisation_items(n_scenes, seed=seed), testbed_meta(model))


def vqa_item(scene: Scene, q: Question, meta: dict | None = None) -> VQAItem:
    """One (scene, question) pair as a VQAItem: the testbed's prompt, the scene's image with the testbed's
    normalisation, the question's object as a patch mask (empty for questions about no object), every object's
    box, the background colour as the occlusion fill, and the scene seed."""
    from . import prompt_text
    meta = meta or _DEFAULT_META
    mask = torch.zeros(N_PATCHES, dtype=torch.bool)
    if q.obj is not None:
        mask[list(scene.objects[q.obj].patches)] = True
    if meta.get("n_image_tokens", N_PATCHES) != N_PATCHES:  # another patch grid (smol_llava: 4x4): the box in pixels
        mask = torch.zeros(scene.image.shape[-2:], dtype=torch.bool)
        if q.obj is not None:
            x0, y0, x1, y1 = scene.objects[q.obj].box
            mask[y0:y1, x0:x1] = True
    return VQAItem(prompt_text(meta, q.text), q.answer, image=scene.image, mean=meta["image_mean"],
                   std=meta["image_std"], mask=mask, objects=[o.box for o in scene.objects], question=q.text,
                   gen_len=int(meta.get("gen_len") or _DEFAULT_META["gen_len"]), fill=BACKGROUND, seed=scene.seed,
                   meta={"scene_seed": scene.seed, "qtype": q.qtype, "obj": q.obj})


def as_vqa_items(pairs, meta: dict | None = None) -> list[VQAItem]:
    """(scene, question) pairs as VQAItems (VQAItems pass through)."""
    return [p if isinstance(p, VQAItem) else vqa_item(p[0], p[1], meta) for p in pairs]


def _from_dict(d: dict, model=None) -> VQAItem:
    """A task item ``{"scene_seed", "question", "answer"[, "qtype"]}`` as a VQAItem (registered with interp.vlm),
    written in the prompt template and patch grid of ``model`` when it is a testbed (e.g. ``smol_llava``'s chat
    markup and 16 image tokens), else in the default testbed's."""
    q = Question(d.get("qtype", "vqa"), d["question"], d["answer"], None)
    meta = testbed_meta(model) if model is not None and is_testbed(model) else None
    item = vqa_item(make_scene(int(d["scene_seed"])), q, meta)
    item.meta["score"] = d.get("score")
    return item


vlm.register_item_source("scene_seed", _from_dict)


def encode_items(model, items: list, meta: dict | None = None) -> Batch:
    """A right-padded :class:`Batch` of (scene, question) pairs or VQAItems with ``pixel_values`` and the roles
    of :func:`interp.vlm.encode_vqa`."""
    meta = meta or testbed_meta(model)
    return vlm.encode_vqa(model, as_vqa_items(items, meta), gen_len=meta.get("gen_len"))


def answer_logits(model, batch: Batch, chunk: int = 128) -> torch.Tensor:
    """float [n, V]: the logits at each item's ``query`` position (:func:`interp.vlm.answer_logits`)."""
    return vlm.answer_logits(model, batch, chunk)


def answer_ids(model, items: list) -> torch.Tensor:
    """long [n]: the token id of each answer's first word."""
    return vlm.answer_ids(model, as_vqa_items(items, testbed_meta(model)))


def vqa_items(n_scenes: int, *, seed: int = 3, split: str = "test", qtypes=None) -> list[dict]:
    """Task items (kind ``vqa``) for the held-out scenes ``make_dataset(n_scenes, seed, split)``:
    ``{"kind": "vqa", "scene_seed", "qtype", "question", "answer"}``, one per question type per scene."""
    from .scenes import QUESTION_TYPES, make_dataset
    out = []
    for s in make_dataset(n_scenes, seed=seed, split=split):
        for q in s.questions(qtypes=qtypes or QUESTION_TYPES):
            out.append({"kind": "vqa", "scene_seed": s.seed, "qtype": q.qtype, "question": q.text, "answer": q.answer})
    return out


def score_vqa(items: list[dict], model, batch_size: int = 128) -> list[float]:
    """Per item, at the answer position (AR: the next token after the prompt; diffusion: the first of the
    fully masked answer positions): 1/0 whether the argmax is the answer's first word, or, for items with
    ``"score": "logprob"``, log p(answer's first word) (:func:`interp.vlm.score_vqa`)."""
    return vlm.score_vqa(model, [_from_dict(it) for it in items], logprob=[it.get("score") == "logprob" for it in items],
                         batch_size=batch_size)
