"""Sort-of-CLEVR: coloured shapes on a canvas and questions about them, generated in memory.

The relational-reasoning benchmark of Santoro et al. (*A simple neural network module for
relational reasoning*, NeurIPS 2017) in the form the shared-workspace paper (Goyal et al.
ICLR 2022) trains on: a white ``75 x 75`` canvas with six objects, one of each colour
(red, green, blue, orange, gray, yellow), each a square or a circle of half-size 5, no two
closer than 10 pixels; per image questions of three kinds, each with three subtypes:

=================  ====================================================================
kind               subtypes (answer)
=================  ====================================================================
non-relational     shape of the colour-c object (square/circle); is it on the left
                   (yes/no); is it in the top half (yes/no)
relational         shape of the object closest to c; shape of the object furthest from
                   c; how many *other* objects share c's shape (0-5)
ternary            how many other objects lie in the box spanned by c1 and c2 (0-4); is
                   any other object within 12 pixels (vertically) of the line through
                   c1 and c2 (yes/no); how many other objects make an obtuse or right
                   triangle with c1 and c2 (0-4)
=================  ====================================================================

Questions are 18-dimensional as in the authors' generator (``shared_workspace/
sort_of_clevr/sort_of_clevr_generator.py``, whose conventions this follows): one-hot
colour ``c1`` (0-5), one-hot colour ``c2`` (6-11, ternary only), one-hot kind (12-14),
one-hot subtype (15-17). Answers index :data:`ANSWERS`: yes, no, square, circle, then
counts 0-5 (classes 4-9). Centres are ``(x, y)`` = (column, row); "left" means
``x < size / 2`` and "top" ``y < size / 2``.

Differences from that generator, none of which changes a question's meaning: it is
written with numpy alone (no OpenCV), seeded with ``numpy.random.default_rng``; ternary
questions draw their two colours from all six (the reference draws from the first five
only); obtuse triangles are detected exactly from integer dot products instead of
``arccos`` of the law of cosines (the same set, without floating-point ties at 90 degrees).

>>> data = generate(100, seed=0)
>>> data.images.shape, data.questions.shape, data.answers.shape
((100, 3, 75, 75), (100, 30, 18), (100, 30))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ANSWERS",
    "COLORS",
    "KINDS",
    "QUESTION_DIM",
    "SUBTYPES",
    "SortOfClevr",
    "answer_question",
    "draw_scene",
    "encode_question",
    "generate",
    "random_scene",
]

#: colour name -> RGB, in the order of the question's one-hot colour
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
ANSWERS = ("yes", "no", "square", "circle", "0", "1", "2", "3", "4", "5")
KINDS = ("non_relational", "relational", "ternary")
SUBTYPES = {
    "non_relational": ("shape", "left", "top"),
    "relational": ("closest_shape", "furthest_shape", "count_same_shape"),
    "ternary": ("count_between", "on_line", "count_obtuse"),
}
QUESTION_DIM = 18
_YES, _NO, _SQUARE, _CIRCLE, _ZERO = 0, 1, 2, 3, 4
_BAND = 12  # half-width (pixels) of the band around the c1-c2 line, as the reference


@dataclass
class SortOfClevr:
    """A generated set: ``images`` uint8 ``(M, 3, S, S)``; per image ``Q`` questions.

    ``questions`` float32 ``(M, Q, 18)``, ``answers`` int64 ``(M, Q)``, ``kinds`` int64
    ``(M, Q)`` (index into :data:`KINDS`), ``subtypes`` int64 ``(M, Q)`` (0-2 within the
    kind). ``centers`` int64 ``(M, 6, 2)`` as ``(x, y)`` and ``squares`` bool ``(M, 6)``
    describe each scene.
    """

    images: Tensor
    questions: Tensor
    answers: Tensor
    kinds: Tensor
    subtypes: Tensor
    centers: Tensor
    squares: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def flat(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(image index, question, answer, kind)`` of every question, ``M * Q`` rows."""
        M, Q = self.answers.shape
        index = torch.arange(M).repeat_interleave(Q)
        return index, self.questions.reshape(M * Q, -1), self.answers.reshape(-1), (
            self.kinds.reshape(-1)
        )


def random_scene(
    rng: np.random.Generator, size: int = 75, object_size: int = 5, max_tries: int = 10_000
) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(6, 2)`` (x, y) at least ``2 * object_size`` apart, and square flags ``(6,)``."""
    centers: list[np.ndarray] = []
    for _ in range(max_tries):
        c = rng.integers(object_size, size - object_size, size=2)
        if all(((c - o) ** 2).sum() >= (2 * object_size) ** 2 for o in centers):
            centers.append(c)
            if len(centers) == len(COLORS):
                return np.stack(centers), rng.random(len(COLORS)) < 0.5
    raise ValueError(
        f"sort_of_clevr: could not place {len(COLORS)} objects of half-size {object_size} "
        f"on a {size}x{size} canvas"
    )


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.ogrid[0:size, 0:size]


def draw_scene(
    centers: np.ndarray, squares: np.ndarray, size: int = 75, object_size: int = 5
) -> np.ndarray:
    """A white ``(3, size, size)`` uint8 canvas with the six objects drawn filled.

    Squares cover ``[x - r, x + r] x [y - r, y + r]``; circles the pixels within ``r`` of
    the centre (``r = object_size``).
    """
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    rows, cols = _grid(size)
    for (x, y), square, rgb in zip(centers, squares, COLORS.values(), strict=True):
        if square:
            inside = (np.abs(cols - x) <= object_size) & (np.abs(rows - y) <= object_size)
        else:
            inside = (cols - x) ** 2 + (rows - y) ** 2 <= object_size**2
        image[inside] = rgb
    return image.transpose(2, 0, 1).copy()


def encode_question(kind: int, subtype: int, color: int, color2: int | None = None) -> np.ndarray:
    """The 18-dim question vector (see the module doc)."""
    q = np.zeros(QUESTION_DIM, dtype=np.float32)
    q[color] = 1.0
    if color2 is not None:
        q[6 + color2] = 1.0
    q[12 + kind] = 1.0
    q[15 + subtype] = 1.0
    return q


def answer_question(
    centers: np.ndarray,
    squares: np.ndarray,
    kind: int,
    subtype: int,
    color: int,
    color2: int | None = None,
    size: int = 75,
) -> int:
    """The answer index (into :data:`ANSWERS`) of one question about one scene."""
    pos = centers.astype(np.int64)
    me = pos[color]
    if kind == 0:
        if subtype == 0:
            return _SQUARE if squares[color] else _CIRCLE
        axis = 0 if subtype == 1 else 1  # left: x; top: y
        return _YES if me[axis] < size / 2 else _NO
    if kind == 1:
        dist = ((pos - me) ** 2).sum(1)
        if subtype == 2:
            return _ZERO + int((squares == squares[color]).sum()) - 1
        if subtype == 0:
            dist = dist.copy()
            dist[color] = np.iinfo(np.int64).max
            other = int(np.argmin(dist))
        else:
            other = int(np.argmax(dist))
        return _SQUARE if squares[other] else _CIRCLE
    if color2 is None or color2 == color:
        raise ValueError("sort_of_clevr: a ternary question needs two different colours")
    a, b = pos[color], pos[color2]
    others = np.array([i for i in range(len(pos)) if i not in (color, color2)])
    c = pos[others]
    if subtype == 0:
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return _ZERO + int(((c >= lo) & (c <= hi)).all(1).sum())
    if subtype == 1:
        slope = (b[1] - a[1]) / ((b[0] - a[0]) + 1e-10)
        line_y = slope * c[:, 0] + (a[1] - slope * a[0])
        on = (c[:, 1] >= line_y - _BAND) & (c[:, 1] <= line_y + _BAND)
        return _YES if on.any() else _NO
    # a triangle is obtuse or right iff some vertex has a non-positive dot product of its
    # two edges; collinear points (cross product 0) make no triangle
    ab, ac, bc = b - a, c - a, c - b
    at_a = ac @ ab
    at_b = -(bc @ ab)
    at_c = (ac * bc).sum(1)
    cross = ab[0] * ac[:, 1] - ab[1] * ac[:, 0]
    obtuse = (cross != 0) & ((at_a <= 0) | (at_b <= 0) | (at_c <= 0))
    return _ZERO + int(obtuse.sum())


def generate(
    num_images: int,
    seed: int = 0,
    questions_per_kind: int = 10,
    size: int = 75,
    object_size: int = 5,
    kinds: tuple[str, ...] = KINDS,
) -> SortOfClevr:
    """``num_images`` scenes with ``questions_per_kind`` questions of each kind, by seed.

    The same ``seed`` gives the same data on every machine (numpy's PCG64 generator).
    The authors' sets: 9,800 training and 200 test images, 10 questions per kind.
    """
    if num_images < 1 or questions_per_kind < 1:
        raise ValueError(
            "sort_of_clevr: num_images and questions_per_kind must be positive, got "
            f"{num_images} and {questions_per_kind}"
        )
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"sort_of_clevr: kinds must be a non-empty subset of {KINDS}, got {kinds}")
    rng = np.random.default_rng(seed)
    kind_ids = [KINDS.index(k) for k in kinds]
    Q = questions_per_kind * len(kind_ids)
    images = np.empty((num_images, 3, size, size), dtype=np.uint8)
    questions = np.zeros((num_images, Q, QUESTION_DIM), dtype=np.float32)
    answers = np.empty((num_images, Q), dtype=np.int64)
    kinds_out = np.empty((num_images, Q), dtype=np.int64)
    subtypes = np.empty((num_images, Q), dtype=np.int64)
    centers = np.empty((num_images, len(COLORS), 2), dtype=np.int64)
    squares = np.empty((num_images, len(COLORS)), dtype=bool)
    for m in range(num_images):
        centers[m], squares[m] = random_scene(rng, size, object_size)
        images[m] = draw_scene(centers[m], squares[m], size, object_size)
        j = 0
        for kind in kind_ids:
            for _ in range(questions_per_kind):
                subtype = int(rng.integers(3))
                if kind == 2:
                    color, color2 = (int(v) for v in rng.permutation(len(COLORS))[:2])
                else:
                    color, color2 = int(rng.integers(len(COLORS))), None
                questions[m, j] = encode_question(kind, subtype, color, color2)
                answers[m, j] = answer_question(
                    centers[m], squares[m], kind, subtype, color, color2, size
                )
                kinds_out[m, j], subtypes[m, j] = kind, subtype
                j += 1
    return SortOfClevr(
        images=torch.from_numpy(images),
        questions=torch.from_numpy(questions),
        answers=torch.from_numpy(answers),
        kinds=torch.from_numpy(kinds_out),
        subtypes=torch.from_numpy(subtypes),
        centers=torch.from_numpy(centers),
        squares=torch.from_numpy(squares),
    )
