"""Sort-of-CLEVR generator: drawing, answers on hand-made scenes, encoding, determinism."""

import numpy as np
import pytest
import torch

from spatial_attention.apps import sort_of_clevr as soc

# red, green, blue, orange, gray, yellow as (x, y) = (column, row)
CENTERS = np.array([[10, 10], [60, 10], [10, 60], [60, 60], [35, 35], [35, 10]])
SQUARES = np.array([True, False, False, True, True, False])
RED, GREEN, BLUE, ORANGE, GRAY, YELLOW = range(6)


def _ask(kind, subtype, color, color2=None):
    return soc.ANSWERS[soc.answer_question(CENTERS, SQUARES, kind, subtype, color, color2)]


def test_drawing_puts_each_colour_and_shape_where_it_belongs():
    img = soc.draw_scene(CENTERS, SQUARES)
    assert img.shape == (3, 75, 75) and img.dtype == np.uint8
    for (x, y), rgb in zip(CENTERS, soc.COLORS.values(), strict=True):
        assert tuple(img[:, y, x]) == rgb
    # a square fills its corners, a circle does not
    assert tuple(img[:, 10 + 5, 10 + 5]) == soc.COLORS["red"]
    assert tuple(img[:, 10 + 5, 60 + 5]) == (255, 255, 255)
    assert tuple(img[:, 10, 60 + 5]) == soc.COLORS["green"]  # on the circle's radius
    assert tuple(img[:, 0, 0]) == (255, 255, 255)


@pytest.mark.parametrize(
    "question,answer",
    [
        ((0, 0, RED), "square"),
        ((0, 0, GREEN), "circle"),
        ((0, 1, RED), "yes"),  # x = 10 is on the left
        ((0, 1, GREEN), "no"),
        ((0, 2, RED), "yes"),  # y = 10 is in the top half
        ((0, 2, BLUE), "no"),
        ((1, 0, RED), "circle"),  # closest to red: yellow, 25 px away
        ((1, 1, RED), "square"),  # furthest from red: orange
        ((1, 2, RED), "2"),  # two other squares (orange, gray)
        ((1, 2, GREEN), "2"),  # two other circles (blue, yellow)
        ((2, 0, RED, ORANGE), "4"),  # the box spans the canvas: all four others inside
        ((2, 0, RED, GREEN), "1"),  # the box is the line y = 10: yellow only
        ((2, 1, RED, GREEN), "yes"),  # yellow on the line y = 10
        ((2, 1, GREEN, BLUE), "yes"),  # gray on y = 70 - x
        ((2, 1, BLUE, ORANGE), "no"),  # nothing within 12 px of y = 60
        ((2, 2, RED, ORANGE), "3"),  # green, blue right angles; yellow obtuse; gray collinear
        ((2, 2, RED, GREEN), "3"),  # blue, orange, gray right angles; yellow collinear
    ],
)
def test_answers_on_a_hand_made_scene(question, answer):
    assert _ask(*question) == answer


def test_closest_never_answers_with_the_object_itself():
    # every other object is more than 31.6 px away (the reference's 999 sentinel would
    # have picked red itself)
    centers = np.array([[10, 10], [60, 60], [10, 60], [60, 10], [50, 40], [65, 30]])
    squares = np.array([True, False, False, False, False, False])
    assert soc.answer_question(centers, squares, 1, 0, 0) == soc.ANSWERS.index("circle")


def test_question_encoding():
    q = soc.encode_question(2, 1, RED, BLUE)
    assert q.shape == (18,) and q.sum() == 4
    assert q[RED] == q[6 + BLUE] == q[12 + 2] == q[15 + 1] == 1
    with pytest.raises(ValueError, match="two different colours"):
        soc.answer_question(CENTERS, SQUARES, 2, 0, RED, RED)


def test_generate_is_deterministic_consistent_and_covers_every_answer():
    a = soc.generate(40, seed=3)
    b = soc.generate(40, seed=3)
    c = soc.generate(40, seed=4)
    for x, y in zip(a.__dict__.values(), b.__dict__.values(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (40, 3, 75, 75) and a.questions.shape == (40, 30, 18)
    assert (a.kinds == torch.arange(3).repeat_interleave(10)).all()
    # objects at least 10 px apart, each drawn in its colour at its centre
    d = (a.centers[:, :, None] - a.centers[:, None]).pow(2).sum(-1)
    assert (d + torch.eye(6, dtype=d.dtype) * 10**6 >= 100).all()
    for m in range(3):
        for i, rgb in enumerate(soc.COLORS.values()):
            x, y = a.centers[m, i].tolist()
            assert tuple(a.images[m, :, y, x].tolist()) == rgb
    # stored answers agree with the question vectors they were asked with
    for m in range(5):
        for j in range(30):
            q = a.questions[m, j].numpy()
            kind, sub = int(q[12:15].argmax()), int(q[15:18].argmax())
            color = int(q[:6].argmax())
            color2 = int(q[6:12].argmax()) if q[6:12].any() else None
            assert a.answers[m, j] == soc.answer_question(
                a.centers[m].numpy(), a.squares[m].numpy(), kind, sub, color, color2
            )
    assert set(a.answers.unique().tolist()) >= {0, 1, 2, 3, 4, 5, 6, 7}
    index, questions, answers, kinds = a.flat()
    assert index.shape == answers.shape == kinds.shape == (1200,) and questions.shape[1] == 18


def test_generate_subset_of_kinds_and_errors():
    d = soc.generate(2, seed=0, questions_per_kind=4, kinds=("relational",))
    assert d.questions.shape == (2, 4, 18) and (d.kinds == 1).all()
    with pytest.raises(ValueError, match="kinds"):
        soc.generate(2, kinds=("spatial",))
    with pytest.raises(ValueError, match="positive"):
        soc.generate(0)
    with pytest.raises(ValueError, match="could not place"):
        soc.generate(1, size=20)
