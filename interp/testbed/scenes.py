"""Synthetic scenes with exact per-patch ground truth.

Each scene is a 32x32 RGB image (float, values in [0, 1]) on a dark background holding
1-3 objects.  The image is split into an 8x8 grid of 4x4-pixel patches (64 image tokens,
patch index ``row * 8 + col``).  The grid is further divided into four 4x4-patch
quadrants (top-left, top-right, bottom-left, bottom-right); every object lives entirely
inside its own quadrant, is snapped to the patch grid and is 2x2 patches (8x8 pixels;
``OBJECT_SIZES``), so each of its 4 patches holds one corner of the shape.  An object's
patch set is the exact set of patches that contain at least one of its pixels (with
2x2-patch objects: all 4 patches of its box).

Shapes: square, circle, triangle, cross.  Colours: red, green, blue, yellow, purple.

Question types (all answers are single words except ``caption``):

* ``colour``  -- "what color is the <shape> ?"         -> colour word
* ``exist``   -- "is there a <colour> <shape> ?"       -> yes / no (balanced; 70% of the
  "no" cases are hard negatives sharing the colour or the shape with an object)
* ``count``   -- "how many objects ?"                  -> one / two / three
* ``where``   -- "where is the <shape> ?"              -> top-left / top-right / ...
* ``caption`` -- "describe ."                          -> "<colour> <shape>" of the first
  object in reading order of the quadrants (top-left, top-right, bottom-left, bottom-right)

``colour`` and ``where`` questions are only asked about shapes that occur exactly once.
Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .vocab import COLOURS, COUNT_WORDS, SHAPES, WHERE_WORDS

IMAGE_SIZE = 32
PATCH = 4
GRID = IMAGE_SIZE // PATCH  # 8
N_PATCHES = GRID * GRID  # 64
QUADRANT_PATCHES = GRID // 2  # 4

QUESTION_TYPES = ("colour", "exist", "count", "where", "caption")

BACKGROUND = (0.08, 0.08, 0.08)
COLOUR_RGB = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "purple": (0.7, 0.2, 0.9),
}
NOISE_STD = 0.03
OBJECT_SIZES = (2,)  # object side in patches (2 -> 8x8 pixels; every patch holds one corner)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # pixels (x0, y0, x1, y1), x1/y1 exclusive
    patches: tuple[int, ...]  # flat patch indices (row * 8 + col), sorted
    quadrant: str  # one of WHERE_WORDS

    @property
    def size_patches(self) -> int:
        return (self.box[2] - self.box[0]) // PATCH


@dataclass(frozen=True)
class Question:
    qtype: str
    text: str  # e.g. "what color is the circle ?"
    answer: str  # e.g. "red" or "red circle" (caption)
    obj: int | None  # index into scene.objects of the object the question is about


@dataclass
class Scene:
    seed: int
    image: torch.Tensor  # [3, 32, 32] float in [0, 1]
    objects: list[SceneObject]
    clean_image: torch.Tensor = field(repr=False, default=None)  # render without noise

    # ------------------------------------------------------------------ questions
    def unique_shape_objects(self) -> list[int]:
        shapes = [o.shape for o in self.objects]
        return [i for i, o in enumerate(self.objects) if shapes.count(o.shape) == 1]

    def questions(self, rng: random.Random | None = None, qtypes=QUESTION_TYPES, all_objects=False) -> list[Question]:
        """Questions about this scene, at most one per type by default.

        With ``all_objects=True`` colour/where questions are produced for every uniquely
        identifiable object and two "yes" and two "no" exist questions (possibly repeated)
        are produced (used for packed training).
        ``rng`` defaults to a generator seeded from the scene seed (deterministic).
        """
        rng = rng if rng is not None else random.Random(self.seed * 7919 + 17)
        out: list[Question] = []
        uniq = self.unique_shape_objects()
        for qt in qtypes:
            if qt in ("colour", "where"):
                targets = uniq if all_objects else ([rng.choice(uniq)] if uniq else [])
                for i in targets:
                    o = self.objects[i]
                    if qt == "colour":
                        out.append(Question("colour", f"what color is the {o.shape} ?", o.colour, i))
                    else:
                        out.append(Question("where", f"where is the {o.shape} ?", o.quadrant, i))
            elif qt == "exist":
                flags = [True, True, False, False] if all_objects else [rng.random() < 0.5]
                for yes in flags:
                    out.append(self._exist_question(rng, yes))
            elif qt == "count":
                out.append(Question("count", "how many objects ?", COUNT_WORDS[len(self.objects) - 1], None))
            elif qt == "caption":
                o = self.objects[0]
                out.append(Question("caption", "describe .", f"{o.colour} {o.shape}", 0))
            else:
                raise ValueError(f"unknown question type {qt!r}")
        return out

    def _exist_question(self, rng: random.Random, yes: bool) -> Question:
        present = {(o.colour, o.shape) for o in self.objects}
        if yes:
            i = rng.randrange(len(self.objects))
            o = self.objects[i]
            return Question("exist", f"is there a {o.colour} {o.shape} ?", "yes", i)
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colours = {o.colour for o in self.objects}
        shapes = {o.shape for o in self.objects}
        hard = [(c, s) for (c, s) in absent if c in colours or s in shapes]
        pool = hard if (hard and rng.random() < 0.7) else absent
        c, s = rng.choice(pool)
        return Question("exist", f"is there a {c} {s} ?", "no", None)

    def question(self, qtype: str, rng: random.Random | None = None) -> Question | None:
        qs = self.questions(rng=rng, qtypes=(qtype,))
        return qs[0] if qs else None

    def question_object(self, q: Question) -> SceneObject | None:
        """The object a question is about (None for count and for exist-"no")."""
        return None if q.obj is None else self.objects[q.obj]


# ---------------------------------------------------------------------- rendering
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape filling a size x size pixel box."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    c = size / 2.0
    if shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        m = (xx - c) ** 2 + (yy - c) ** 2 <= (size / 2.0) ** 2 * 1.0
    elif shape == "triangle":  # apex at the top centre, base at the bottom
        half_width = (yy / size) * (size / 2.0) + 0.75
        m = np.abs(xx - c) <= half_width
    elif shape == "cross":  # plus sign, arm thickness = size / 4 (>= 2 px) centred
        t = max(2, size // 4) if size >= 8 else 2
        lo, hi = (size - t) / 2.0, (size + t) / 2.0
        m = ((xx >= lo) & (xx <= hi)) | ((yy >= lo) & (yy <= hi))
    else:
        raise ValueError(shape)
    return m


def _pixel_mask_patches(mask: np.ndarray) -> tuple[int, ...]:
    pm = mask.reshape(GRID, PATCH, GRID, PATCH).any(axis=(1, 3)).reshape(-1)
    return tuple(int(i) for i in np.nonzero(pm)[0])


def patches_of_box(box: tuple[int, int, int, int]) -> tuple[int, ...]:
    x0, y0, x1, y1 = box
    return tuple(
        r * GRID + c for r in range(y0 // PATCH, (y1 - 1) // PATCH + 1) for c in range(x0 // PATCH, (x1 - 1) // PATCH + 1)
    )


def make_scene(seed: int, noise: bool = True) -> Scene:
    """Deterministic scene from an integer seed."""
    rng = random.Random(int(seed))
    n = rng.randint(1, 3)
    quadrants = sorted(rng.sample(range(4), n))  # reading order
    img = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    img[:] = np.array(BACKGROUND, dtype=np.float32)[:, None, None]
    objects = []
    for q in quadrants:
        shape = rng.choice(SHAPES)
        colour = rng.choice(COLOURS)
        size_p = rng.choice(OBJECT_SIZES)
        qr, qc = divmod(q, 2)
        pr = qr * QUADRANT_PATCHES + rng.randint(0, QUADRANT_PATCHES - size_p)
        pc = qc * QUADRANT_PATCHES + rng.randint(0, QUADRANT_PATCHES - size_p)
        x0, y0 = pc * PATCH, pr * PATCH
        size = size_p * PATCH
        box = (x0, y0, x0 + size, y0 + size)
        m = _shape_mask(shape, size)
        rgb = np.array(COLOUR_RGB[colour], dtype=np.float32)
        region = img[:, y0 : y0 + size, x0 : x0 + size]
        region[:, m] = rgb[:, None]
        full = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        full[y0 : y0 + size, x0 : x0 + size] = m
        objects.append(SceneObject(shape, colour, box, _pixel_mask_patches(full), WHERE_WORDS[q]))
    clean = torch.from_numpy(img.copy())
    if noise:
        nrng = np.random.default_rng(int(seed) + 1_000_003)
        img = np.clip(img + nrng.normal(0.0, NOISE_STD, size=img.shape).astype(np.float32), 0.0, 1.0)
    return Scene(seed=int(seed), image=torch.from_numpy(img), objects=objects, clean_image=clean)


SPLIT_OFFSETS = {"train": 0, "val": 500_000_000, "test": 1_000_000_000}


def scene_seed(i: int, seed: int = 0, split: str = "train") -> int:
    """Seed of the i-th scene of a split; splits never share seeds (i < 1e6 per seed)."""
    return SPLIT_OFFSETS[split] + int(seed) * 1_000_000 + int(i)


def make_dataset(n: int, seed: int = 0, split: str = "train", noise: bool = True) -> list[Scene]:
    """``n`` deterministic scenes; the train/val/test splits use disjoint seed ranges."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {list(SPLIT_OFFSETS)}")
    if n > 1_000_000:
        raise ValueError("n must be <= 1e6")
    return [make_scene(scene_seed(i, seed, split), noise=noise) for i in range(n)]


def object_patch_mask(scene: Scene, obj: SceneObject | int) -> torch.Tensor:
    """bool[64] mask of the patches an object occupies (flat index row * 8 + col)."""
    if isinstance(obj, int):
        obj = scene.objects[obj]
    m = torch.zeros(N_PATCHES, dtype=torch.bool)
    m[list(obj.patches)] = True
    return m


def background_pixel_mask(scene: Scene) -> torch.Tensor:
    """bool[32, 32]: pixels whose clean colour is the background's."""
    return (scene.clean_image - torch.tensor(BACKGROUND).view(3, 1, 1)).abs().sum(0) <= 1e-6


def pixel_patch_mask(scene: Scene) -> torch.Tensor:
    """bool[64]: patches whose clean pixels differ from the background (for checks)."""
    diff = ~background_pixel_mask(scene)  # [32, 32]
    return diff.view(GRID, PATCH, GRID, PATCH).any(dim=3).any(dim=1).reshape(-1)
