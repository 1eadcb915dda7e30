"""Items for vision-language analyses, their encoding with token roles, and localisation scores.

One plain item type, :class:`VQAItem`, serves every VLM entry point (localisation, attention to the image,
occlusion maps, the all-objects reference, ``interp.evaluate`` on VQA): an image (``image`` in 0..1 with its
normalisation, or the model's own ``pixel_values``), a prompt with the model's image token where the image
goes, the answer, and optionally where the answer's object is (``boxes`` in pixels or a ``mask``). The
testbed (:mod:`interp.testbed`) is one source of such items; any LLaVA-style model and any images are another.

:func:`encode_vqa` makes a right-padded :class:`~interp.roles.Batch` with roles ``bos``, ``image`` (the image
tokens in patch order), ``question`` (the item's ``question`` substring, where given), ``query`` (the position
whose logits give the answer's first token: the last prompt token of a causal model, the first of ``gen_len``
appended mask tokens of a masked-diffusion model), ``answer`` (that masked region), and, where the item says
where its object is, ``object`` (the image tokens of the target), ``objects`` (those of every object) and
``background`` (as many image tokens drawn, seeded by the item, from patches holding no object).

Image token k is patch (k // g, k % g) of a g × g grid over the image (g² = the number of image tokens, as in
LLaVA's CLIP tower without its class token). A pixel box or mask marks the patches it touches.

Localisation scores of a map M (one score per image patch) against a target patch set (Grad-CAM and
LLaVA-CAM literature): pointing game = |argmax set ∩ target| / |argmax set| (ties count fractionally), energy in
box = Σ_{p ∈ target} max(M_p, 0) / Σ_p max(M_p, 0) (|target| / n when M has no positive mass). References:
``random_maps`` (i.i.d. uniform), ``all_objects_maps`` (1 on every object: ignores the question) and
:func:`occlusion_maps` (the drop of the answer's logit when one patch alone is filled with ``fill``).
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from dataclasses import dataclass, field, replace

import pandas as pd
import torch

from .errors import InterpError
from .roles import Batch, Roles

Box = tuple[int, int, int, int]


@dataclass
class VQAItem:
    """One image, one prompt, one answer (and, optionally, where the answer's object is).

    * ``prompt``: text with the model's image token (e.g. ``"<image>"``) once, expanded to the model's number of
      image tokens, or already repeated that many times; the answer follows the prompt.
    * ``image`` [3, H, W] in 0..1 with ``mean``/``std`` (pixel_values = (image − mean) / std), or ``pixel_values``
      [3, H, W] as the model takes them (then ``image`` is only shown in figures).
    * ``boxes``: the target's boxes in pixels (x0, y0, x1, y1; x1, y1 exclusive); or ``mask``: bool [H, W] in
      pixels or [n_patches]. ``objects``: every object's box (the all-objects reference; default the targets).
    * ``question``: a substring of the prompt that becomes the ``question`` role; ``gen_len``: the masked answer
      region of a masked-diffusion model; ``fill``: the occlusion colour (image space if ``image`` and ``mean``
      are given, else pixel_values space; default the per-channel median, the background of most scenes);
      ``seed``: draws the ``background`` role; ``meta``: anything the source wants to keep.
    """

    prompt: str
    answer: str
    image: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    boxes: list[Box] | None = None
    mask: torch.Tensor | None = None
    objects: list[Box] | None = None
    question: str | None = None
    gen_len: int | None = None
    fill: Sequence[float] | None = None
    seed: int = 0
    meta: dict = field(default_factory=dict)

    def pixels(self) -> torch.Tensor:
        """pixel_values [3, H, W] as the model takes them."""
        if self.pixel_values is not None:
            px = torch.as_tensor(self.pixel_values)
            return px[0] if px.dim() == 4 else px
        if self.image is None or self.mean is None or self.std is None:
            raise InterpError("a VQAItem needs pixel_values, or an image in 0..1 with its normalisation mean and std")
        img = torch.as_tensor(self.image).float()
        return (img - torch.tensor(self.mean).view(-1, 1, 1)) / torch.tensor(self.std).view(-1, 1, 1)

    def shown_image(self) -> torch.Tensor:
        """The image for figures [3, H, W] in 0..1 (the pixel values rescaled when no image is given)."""
        if self.image is not None:
            return torch.as_tensor(self.image).float()
        px = self.pixels().float()
        return (px - px.min()) / (px.max() - px.min()).clamp_min(1e-12)

    @property
    def has_target(self) -> bool:
        return self.boxes is not None or self.mask is not None

    def occluded(self, patches: Iterable[int], grid: int, fill: Sequence[float] | None = None) -> "VQAItem":
        """A copy with the given patches of the g × g grid set to ``fill`` (see the class docstring)."""
        in_image = self.pixel_values is None
        x = torch.as_tensor(self.image).float().clone() if in_image else self.pixels().clone()
        fill = fill if fill is not None else self.fill
        value = (torch.as_tensor(fill, dtype=x.dtype).view(-1, 1, 1) if fill is not None
                 else x.flatten(1).median(1).values.view(-1, 1, 1))
        for p in patches:
            r, c = divmod(int(p), grid)
            (y0, y1), (x0, x1) = _span(r, grid, x.shape[1]), _span(c, grid, x.shape[2])
            x[:, y0:y1, x0:x1] = value
        return replace(self, image=x) if in_image else replace(self, pixel_values=x)


def _span(i: int, g: int, size: int) -> tuple[int, int]:
    return i * size // g, (i + 1) * size // g


def _grid(n: int) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise InterpError(f"{n} image tokens do not form a square patch grid: localisation needs g × g image tokens")
    return g


def _pixel_mask_to_patches(mask: torch.Tensor, g: int) -> torch.Tensor:
    H, W = mask.shape
    out = torch.zeros(g * g, dtype=torch.bool)
    for r in range(g):
        for c in range(g):
            (y0, y1), (x0, x1) = _span(r, g, H), _span(c, g, W)
            out[r * g + c] = bool(mask[y0:y1, x0:x1].any())
    return out


def _boxes_mask(boxes: Sequence[Box], H: int, W: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise InterpError(f"box {(x0, y0, x1, y1)} is not inside the {W}×{H} image (x0, y0, x1, y1 in pixels, "
                              "x1 and y1 exclusive)")
        m[y0:y1, x0:x1] = True
    return m


def target_patches(item: VQAItem, n_patches: int) -> torch.Tensor:
    """bool [n_patches]: the patches of the item's target (its ``mask`` or ``boxes``)."""
    g = _grid(n_patches)
    if item.mask is not None:
        m = torch.as_tensor(item.mask).bool()
        if m.dim() == 1:
            if m.numel() != n_patches:
                raise InterpError(f"a patch mask has {m.numel()} entries but the model has {n_patches} image tokens")
            return m.clone()
        return _pixel_mask_to_patches(m, g)
    if item.boxes is None:
        raise InterpError("this item says nowhere where its object is: give boxes (pixels) or a mask to score a map")
    H, W = item.pixels().shape[-2:]
    return _pixel_mask_to_patches(_boxes_mask(item.boxes, H, W), g)


def objects_patches(item: VQAItem, n_patches: int) -> torch.Tensor:
    """bool [n_patches]: the patches of every object of the item (``objects``, else its target)."""
    if item.objects is None:
        return target_patches(item, n_patches)
    H, W = item.pixels().shape[-2:]
    return _pixel_mask_to_patches(_boxes_mask(item.objects, H, W), _grid(n_patches))


# ------------------------------------------------------------------------------------------ encoding
def n_image_tokens(model) -> int | None:
    """Image tokens per image of a LLaVA-style model ((image_size / patch_size)², plus one with the class token)."""
    cfg = model.hf.config
    vc = getattr(cfg, "vision_config", None)
    if vc is None or not getattr(vc, "image_size", None) or not getattr(vc, "patch_size", None):
        return None
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else n


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def encode_vqa(model, items: Sequence[VQAItem], *, gen_len: int | None = None) -> Batch:
    """A right-padded Batch of the items' prompts with ``pixel_values`` and the roles of the module docstring.
    ``gen_len`` (masked-diffusion models) overrides each item's ``gen_len``."""
    items = as_items(items, model)
    ad, tok = model.adapter, model.tokenizer
    if ad.image_token_id is None:
        raise InterpError(f"{model.name} takes no images (no image token): VQA items need a vision-language model")
    if tok is None:
        raise InterpError("encoding VQA items needs the model's tokenizer: pass tokenizer= to interp.load")
    n_img = n_image_tokens(model)
    rows, roles, tokens = [], [], []
    for k, it in enumerate(items):
        ids = list(tok(it.prompt, add_special_tokens=True)["input_ids"])
        at = [i for i, t in enumerate(ids) if t == ad.image_token_id]
        if not at:
            raise InterpError(f"item {k}: its prompt has no image token ({tok.convert_ids_to_tokens(ad.image_token_id)!r})"
                              f": put it where the image goes: {it.prompt[:60]!r}")
        if len(at) == 1 and n_img and n_img > 1:
            ids = ids[:at[0]] + [ad.image_token_id] * n_img + ids[at[0] + 1:]
            at = list(range(at[0], at[0] + n_img))
        P = len(ids)
        r = Roles({"bos": [0], "image": at}, length=P)
        if it.question:
            q = list(tok(it.question, add_special_tokens=False)["input_ids"])
            s = _find(ids, q)
            if s < 0:
                raise InterpError(f"item {k}: its question {it.question!r} is not a token span of its prompt")
            r["question"] = list(range(s, s + len(q)))
        if ad.causal:
            r["query"] = [P - 1]
        else:
            g = gen_len or it.gen_len
            if not g:
                raise InterpError("a masked-diffusion model answers in a masked region: give gen_len (its length)")
            if ad.mask_token_id is None:
                raise InterpError("this model has no mask token id: set model.adapter.mask_token_id")
            ids = ids + [int(ad.mask_token_id)] * g
            r["answer"], r["query"], r.length = list(range(P, P + g)), [P], P + g
        if it.has_target:
            n = len(at)
            target, objs = target_patches(it, n), objects_patches(it, n) | target_patches(it, n)
            free = [p for p in range(n) if not objs[p]]
            n_bg = int(target.sum()) or 4
            r["object"] = [at[p] for p in torch.nonzero(target)[:, 0].tolist()]
            r["objects"] = [at[p] for p in torch.nonzero(objs)[:, 0].tolist()]
            r["background"] = [at[p] for p in sorted(random.Random(it.seed).sample(free, min(n_bg, len(free))))]
        rows.append(ids)
        roles.append(r)
        tokens.append(tok.convert_ids_to_tokens(ids))
    T = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    dtype = next(model.hf.parameters()).dtype
    px = torch.stack([it.pixels() for it in items]).to(dtype)
    return Batch(input_ids, mask, roles, tokens, [it.prompt for it in items], {"pixel_values": px})


ITEM_SOURCES: dict[str, Callable[[dict, Any], VQAItem]] = {}


def register_item_source(key: str, make: Callable[[dict, Any], VQAItem]) -> None:
    """Task items (dicts) that carry the field ``key`` are turned into VQAItems by ``make(item, model)`` (the
    testbed registers ``scene_seed`` when imported; ``model`` is the model the item is for, or None, so that the
    item is written in that model's prompt template and image size)."""
    ITEM_SOURCES[key] = make


def item_from_dict(d: dict, model=None) -> VQAItem:
    """A VQA task item (a JSON object) as a VQAItem for ``model``, by the registered source whose field it carries."""
    for key, make in ITEM_SOURCES.items():
        if key in d:
            return make(d, model)
    raise InterpError(f"a vqa item needs an image: none of the registered item sources' fields "
                      f"({', '.join(ITEM_SOURCES) or 'none registered'}) is in {sorted(d)}. Give the task VQAItem "
                      "objects (Task(name, 'vqa', [interp.vlm.VQAItem(...), ...])), or import the source (e.g. "
                      "interp.testbed for scene_seed items)")


def as_items(items, model=None) -> list[VQAItem]:
    """A list of VQAItems (task dicts made for ``model``); anything else is refused with what to give."""
    if isinstance(items, VQAItem):
        return [items]
    items = [item_from_dict(x, model) if isinstance(x, dict) else x for x in items]
    bad = [type(x).__name__ for x in items if not isinstance(x, VQAItem)]
    if bad or not items:
        raise InterpError(f"expected a non-empty list of interp.vlm.VQAItem, got {bad[:3] or 'nothing'}; the testbed "
                          "makes them with interp.testbed.items.as_vqa_items(pairs)")
    return items


def slice_batch(batch: Batch, i: int, j: int) -> Batch:
    """Rows ``i:j`` of a batch (per-row extras such as pixel_values are sliced too)."""
    extra = {k: (v[i:j] if torch.is_tensor(v) and v.shape[0] == len(batch) else v) for k, v in batch.extra.items()}
    n = int(batch.attention_mask[i:j].sum(1).max())
    return Batch(batch.input_ids[i:j, :n], batch.attention_mask[i:j, :n], batch.roles[i:j], batch.tokens[i:j],
                 batch.texts[i:j], extra)


@torch.no_grad()
def answer_logits(model, batch: Batch, chunk: int = 128) -> torch.Tensor:
    """float [n, V]: the logits at each row's ``query`` role (active specs see the batch's roles)."""
    return torch.cat([model.answer_logits(slice_batch(batch, i, min(len(batch), i + chunk))).float()
                      for i in range(0, len(batch), chunk)])


def answer_token_ids(model, items: Sequence[VQAItem]) -> list[list[int]]:
    """The tokens of each item's answer, as they follow its prompt."""
    tok = model.tokenizer
    out = []
    for it in as_items(items, model):
        sep = "" if it.prompt[-1:].isspace() or it.answer[:1].isspace() else " "
        p = list(tok(it.prompt, add_special_tokens=True)["input_ids"])
        full = list(tok(it.prompt + sep + it.answer, add_special_tokens=True)["input_ids"])
        k = 0
        while k < min(len(p), len(full)) and p[k] == full[k]:
            k += 1
        if k >= len(full):
            raise InterpError(f"the answer {it.answer!r} adds no token after the prompt")
        out.append(full[k:])
    return out


def answer_ids(model, items: Sequence[VQAItem]) -> torch.Tensor:
    """long [n]: the first token of each item's answer, as it follows the prompt."""
    return torch.tensor([a[0] for a in answer_token_ids(model, items)])


def score_vqa(model, items: Sequence[VQAItem], *, logprob: bool | Sequence[bool] = False, gen_len: int | None = None,
              batch_size: int = 128) -> list[float]:
    """Per item: 1/0 whether the argmax at the ``query`` position is the answer's first token, or (``logprob``)
    log p(answer's first token) there."""
    items = as_items(items, model)
    logits = answer_logits(model, encode_vqa(model, items, gen_len=gen_len), batch_size)
    y = answer_ids(model, items)
    correct = (logits.argmax(-1) == y).float()
    lp = torch.log_softmax(logits, -1)[torch.arange(len(y)), y]
    want = [logprob] * len(items) if isinstance(logprob, bool) else list(logprob)
    return [float(l) if w else float(c) for w, c, l in zip(want, correct, lp)]


# ------------------------------------------------------------------------------------------ references
def _n_patches(model, items: Sequence[VQAItem], gen_len: int | None = None) -> int:
    return len(encode_vqa(model, items[:1], gen_len=gen_len).roles[0]["image"])


def target_masks(items: Sequence[VQAItem], n_patches: int) -> torch.Tensor:
    """bool [N, n_patches]: each item's target patches."""
    return torch.stack([target_patches(it, n_patches) for it in as_items(items)])


def all_objects_maps(items: Sequence[VQAItem], n_patches: int) -> torch.Tensor:
    """float [N, n_patches]: 1 on every object's patches, whatever the question."""
    return torch.stack([objects_patches(it, n_patches).float() for it in as_items(items)])


def random_maps(n: int, n_patches: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, n_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def occlusion_maps(model, items: Sequence[VQAItem], *, fill: Sequence[float] | None = None,
                   gen_len: int | None = None, progress: bool = False) -> torch.Tensor:
    """float [N, n]: the drop of the answer's first-token logit at the ``query`` position when each patch alone
    is filled (:meth:`VQAItem.occluded`); n + 1 forwards per item."""
    from tqdm.auto import tqdm
    items = as_items(items, model)
    n = _n_patches(model, items, gen_len)
    g = _grid(n)
    y = answer_ids(model, items)
    maps = torch.empty(len(items), n)
    for i, it in enumerate(tqdm(items, desc="occlusion", disable=not progress)):
        variants = [it] + [it.occluded([p], g, fill) for p in range(n)]
        logit = answer_logits(model, encode_vqa(model, variants, gen_len=gen_len), chunk=n + 1)[:, y[i]]
        maps[i] = logit[0] - logit[1:]
    return maps


# ------------------------------------------------------------------------------------------ scores
def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[N] fraction of the argmax patches that lie in the target (1/0 unless there are ties)."""
    maps = maps.float().reshape(len(maps), -1)
    top = maps == maps.max(dim=1, keepdim=True).values
    return (top & masks).sum(1) / top.sum(1)


def energy_in_box(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[N] share of the map's positive mass inside the target."""
    pos = maps.float().reshape(len(maps), -1).clamp(min=0)
    total = pos.sum(1)
    inside = (pos * masks).sum(1)
    uniform = masks.sum(1) / masks.shape[1]
    return torch.where(total > 0, inside / total.clamp(min=1e-30), uniform)


def _bootstrap_ci(x: torch.Tensor, n_boot: int, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (n_boot, len(x)), generator=g)
    means = x[idx].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def score_maps(maps: torch.Tensor, masks: torch.Tensor, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean pointing game and energy in box with 95% bootstrap intervals."""
    if maps.shape[0] != masks.shape[0] or maps.reshape(len(maps), -1).shape[1] != masks.shape[1]:
        raise InterpError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} do not match: one "
                          f"{masks.shape[1]}-patch map per item is expected")
    pg, en = pointing_game(maps, masks), energy_in_box(maps, masks)
    return {"pointing": pg.mean().item(), "pointing_ci": _bootstrap_ci(pg, n_boot, seed),
            "energy": en.mean().item(), "energy_ci": _bootstrap_ci(en, n_boot, seed), "n": len(maps)}


def localisation_table(maps: Mapping[str, torch.Tensor], masks: torch.Tensor, **kw) -> pd.DataFrame:
    """One row per method: pointing game and energy in box, each with its 95% interval."""
    rows = []
    for name, m in maps.items():
        s = score_maps(m, masks, **kw)
        rows.append({"method": name, "pointing": s["pointing"], "pointing_lo": s["pointing_ci"][0],
                     "pointing_hi": s["pointing_ci"][1], "energy": s["energy"], "energy_lo": s["energy_ci"][0],
                     "energy_hi": s["energy_ci"][1], "n": s["n"]})
    return pd.DataFrame(rows)


def reference_maps(model, items: Sequence[VQAItem], *, occlusion: bool = True, seed: int = 0,
                   gen_len: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(target masks [N, n], {"random", "all_objects"[, "occlusion"]: [N, n]}) for scoring maps of ``items``."""
    items = as_items(items, model)
    n = _n_patches(model, items, gen_len)
    refs = {"random": random_maps(len(items), n, seed), "all_objects": all_objects_maps(items, n)}
    if occlusion:
        refs["occlusion"] = occlusion_maps(model, items, gen_len=gen_len)
    return target_masks(items, n), refs
