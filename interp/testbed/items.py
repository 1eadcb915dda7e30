"""Testbed questions as interp batches with token roles, and the answer at the answer position.

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
import random
from pathlib import Path

import torch

from ..errors import InterpError
from ..roles import Batch, Roles
from .scenes import N_PATCHES, Question, Scene, make_scene

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


def encode_items(model, items: list[tuple[Scene, Question]], meta: dict | None = None) -> Batch:
    """A right-padded :class:`Batch` of the items' prompts, with ``pixel_values`` and the roles above."""
    from . import normalize_image, prompt_text
    meta = meta or testbed_meta(model)
    tok = model.tokenizer
    rows, roles, tokens = [], [], []
    for scene, q in items:
        ids = tok(prompt_text(meta, q.text), add_special_tokens=False)["input_ids"]
        if tok.unk_token_id in ids:
            raise InterpError(f"unknown word in the question {q.text!r}")
        P = len(ids)
        n_q = len(q.text.split())
        r = Roles({"bos": [0], "image": list(range(1, 1 + N_PATCHES)),
                   "question": list(range(P - 2 - n_q, P - 2))}, length=P)
        if meta["kind"] == "diffusion":
            g = int(meta["gen_len"])
            ids = ids + [int(meta["mask_token_id"])] * g
            r["answer"] = list(range(P, P + g))
            r["query"] = [P]
            r.length = P + g
        else:
            r["query"] = [P - 1]
        on_object = set(scene.objects[q.obj].patches) if q.obj is not None else set()
        free = sorted(set(range(N_PATCHES)) - {p for o in scene.objects for p in o.patches})
        r["object"] = [1 + p for p in sorted(on_object)]
        r["objects"] = sorted(1 + p for o in scene.objects for p in o.patches)
        n_bg = len(on_object) or 4
        r["background"] = [1 + p for p in sorted(random.Random(scene.seed).sample(free, min(n_bg, len(free))))]
        rows.append(ids)
        roles.append(r)
        tokens.append(tok.convert_ids_to_tokens(ids))
    T = max(map(len, rows))
    pad = tok.pad_token_id or 0
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    px = normalize_image(torch.stack([s.image for s, _ in items]), meta).to(next(model.hf.parameters()).dtype)
    return Batch(input_ids, mask, roles, tokens, [q.text for _, q in items], {"pixel_values": px})


def slice_batch(batch: Batch, i: int, j: int) -> Batch:
    """Rows ``i:j`` of a batch (per-row extras such as pixel_values are sliced too)."""
    extra = {k: (v[i:j] if torch.is_tensor(v) and v.shape[0] == len(batch) else v) for k, v in batch.extra.items()}
    n = int(batch.attention_mask[i:j].sum(1).max())
    return Batch(batch.input_ids[i:j, :n], batch.attention_mask[i:j, :n], batch.roles[i:j], batch.tokens[i:j],
                 batch.texts[i:j], extra)


@torch.no_grad()
def answer_logits(model, batch: Batch, chunk: int = 128) -> torch.Tensor:
    """float [n, V]: the logits at each item's ``query`` position, run with the batch's roles known to the
    engine (so active specs see ``role:image``, ``role:answer``, ``last`` per sequence)."""
    out = []
    for i in range(0, len(batch), chunk):
        b = slice_batch(batch, i, min(len(batch), i + chunk))
        with model.engine.running(b):
            logits = model.hf(**b.model_inputs()).logits
        pos = torch.tensor([r["query"][0] for r in b.roles])
        out.append(logits[torch.arange(len(b)), pos].float())
    return torch.cat(out)


def answer_ids(model, items: list[tuple[Scene, Question]]) -> torch.Tensor:
    """long [n]: the token id of each answer's first word."""
    return torch.tensor([model.tokenizer.convert_tokens_to_ids(q.answer.split()[0]) for _, q in items])


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
    ``"score": "logprob"``, log p(answer's first word)."""
    if model.adapter.image_token_id is None:
        raise InterpError("vqa items need a vision-language testbed model (no image token in this model)")
    pairs = [(make_scene(int(it["scene_seed"])), Question(it.get("qtype", "vqa"), it["question"], it["answer"], None))
             for it in items]
    batch = encode_items(model, pairs)
    logits = answer_logits(model, batch, batch_size)
    y = answer_ids(model, pairs)
    correct = (logits.argmax(-1) == y).float()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(y)), y]
    return [float(lp) if it.get("score") == "logprob" else float(c) for it, c, lp in zip(items, correct, logp)]
