"""The testbed as a source of localisation items, and its ground truth for scoring patch maps.

The scores and references are generic (:mod:`interp.vlm`: pointing game, energy in box, random, all-objects and
occlusion maps, for any :class:`~interp.vlm.VQAItem`); this module gives them the testbed's (scene, question)
pairs. A *map* is a score per image patch, ``[64]`` (or ``[N, 64]``), in the patch order of
:mod:`interp.testbed.scenes` (``row * 8 + col``); the truth for a question is the patch set of the object it asks
about (``Question.obj``); questions about no object (count, exist-"no") are not scored.

Occlusion fills a patch with the scene's background colour: on the testbed's dark background a mid-grey fill
(``fill=0.5``) adds a new bright blob that the model reacts to wherever it is put, and the map then points at the
object only ~23% of the time instead of ~73% (measured on 60 held-out scenes of the AR testbed).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import vlm
from ..vlm import energy_in_box, localisation_table, pointing_game, score_maps  # noqa: F401  (the generic scores)
from .items import as_vqa_items, testbed_meta
from .scenes import BACKGROUND, GRID, N_PATCHES, PATCH, QUESTION_TYPES, Question, Scene, make_dataset, object_patch_mask


def localisation_items(n_scenes: int, *, seed: int = 0, split: str = "test",
                       qtypes: Iterable[str] = QUESTION_TYPES) -> list[tuple[Scene, Question]]:
    """(scene, question) pairs whose question is about one object, from ``n_scenes`` held-out scenes."""
    items = []
    for scene in make_dataset(n_scenes, seed=seed, split=split):
        items += [(scene, q) for q in scene.questions(qtypes=tuple(qtypes)) if q.obj is not None]
    return items


def target_masks(items: list[tuple[Scene, Question]]) -> torch.Tensor:
    """bool [N, 64]: the patches of each question's object."""
    return torch.stack([object_patch_mask(s, q.obj) for s, q in items])


def all_objects_maps(items: list) -> torch.Tensor:
    """float [N, 64]: 1 on the patches of every object in the scene, whatever the question."""
    return vlm.all_objects_maps(as_vqa_items(items), N_PATCHES)


def random_maps(n: int, seed: int = 0) -> torch.Tensor:
    return vlm.random_maps(n, N_PATCHES, seed)


def occlude(image: torch.Tensor, patches: Iterable[int], fill: float | None = None) -> torch.Tensor:
    """A copy of a [3, 32, 32] image (values in [0, 1]) with the given patches set to ``fill``
    (default: the background colour)."""
    out = image.clone()
    value = torch.tensor(BACKGROUND if fill is None else (fill,) * 3, dtype=image.dtype).view(3, 1, 1)
    for p in patches:
        r, c = divmod(int(p), GRID)
        out[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = value
    return out


def occlusion_maps(model, items: list, *, fill: float | None = None, progress: bool = False) -> torch.Tensor:
    """float [N, 64]: drop of the answer logit when each patch alone is blanked out (the background colour, or
    grey ``fill``), read where the model answers (:func:`interp.vlm.occlusion_maps`)."""
    vqa = as_vqa_items(items, testbed_meta(model))
    return vlm.occlusion_maps(model, vqa, fill=None if fill is None else (fill,) * 3, progress=progress)
