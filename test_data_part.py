"""Tests for data.py: the shapes world, its captions and its judge."""
import io
import math

import numpy as np
import pytest
import torch

from data import (COLORS, HELD_OUT, RELATIONS, SHAPES, ShapesWorld, Spec, accuracy, caption, eval_specs,
                  find_objects, is_held_out, judge_captions, judge_images, parse_caption, same_meaning)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small tensor ops run 10x slower with 2 threads when the CPU is shared: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("image_size, seeds, n", [(64, (0, 1, 2), 30), (128, (0,), 12)])
def test_ground_truth_judges_perfect(image_size, seeds, n):
    for seed in seeds:
        world = ShapesWorld(image_size=image_size, seed=seed)
        for split in ("seen", "heldout"):
            specs = eval_specs(split, n, seed=seed)
            oks = judge_images(world.render(specs), specs)
            assert accuracy(oks, specs) == {"single": 1.0, "relation": 1.0, "count": 1.0, "overall": 1.0}


def test_uint8_images_judge_the_same():
    specs = eval_specs("seen", 10)
    images = ShapesWorld(seed=3).render(specs)
    assert judge_images((images * 255).round().to(torch.uint8), specs) == [True] * len(specs)


def _other(options, *avoid):
    return next(o for o in options if o not in avoid)


def _variants(spec):
    """Specs that differ from `spec` in exactly one attribute."""
    colors = list(COLORS)
    if spec.family == "single":
        (c, s), = spec.objects
        return [Spec("single", ((_other(colors, c), s),), spec.size),
                Spec("single", ((c, _other(SHAPES, s)),), spec.size),
                Spec("single", spec.objects, "small" if spec.size == "large" else "large")]
    if spec.family == "count":
        (c, s), n = spec.objects[0], len(spec.objects)
        return [Spec("count", ((_other(colors, c), s),) * n, spec.size),
                Spec("count", ((c, _other(SHAPES, s)),) * n, spec.size),
                Spec("count", ((c, s),) * (5 - n), spec.size)]
    (ca, sa), (cb, sb) = spec.objects
    rel = lambda objects, relation=spec.relation: Spec("relation", objects, spec.size, relation)
    return [rel(((_other(colors, ca, cb), sa), (cb, sb))),
            rel(((ca, _other(SHAPES, sa)), (cb, sb))),
            rel(((ca, sa), (cb, _other(SHAPES, sb)))),
            rel(((cb, sa), (ca, sb))),  # colours swapped between the two objects
            *(rel(spec.objects, r) for r in RELATIONS if r != spec.relation)]


def test_one_attribute_changed_fails():
    specs = eval_specs("seen", 12, seed=7) + eval_specs("heldout", 4, seed=7)
    images = ShapesWorld(seed=7).render(specs)
    for image, spec in zip(images, specs):
        variants = _variants(spec)
        assert judge_images(image[None].expand(len(variants), -1, -1, -1), variants) == [False] * len(variants), spec


def test_caption_round_trip():
    for split in ("seen", "heldout"):
        for spec in eval_specs(split, 40):
            text = caption(spec)
            parsed = parse_caption(text)
            assert parsed is not None and same_meaning(parsed, spec), text
            assert caption(parsed) == text or spec.family == "single"  # only single captions state size
            assert parse_caption("  " + text.upper() + ". ") == parsed


def test_caption_grammar():
    assert caption(Spec("relation", (("orange", "square"), ("red", "circle")), "small", "above")) == \
        "an orange square above a red circle"
    assert caption(Spec("single", (("orange", "square"),), "small")) == "a small orange square"
    assert caption(Spec("count", (("green", "triangle"),) * 3, "large")) == "three green triangles"
    assert parse_caption("a orange square above an red circle") == \
        Spec("relation", (("orange", "square"), ("red", "circle")), "large", "above")
    for junk in ("hello world", "", "a red", "two red circle", "a purple circle to the left of",
                 "a red circle to the left of a red square", "four red circles", "a small red circles"):
        assert parse_caption(junk) is None, junk


def test_judge_captions_accepts_swapped_relation():
    spec = Spec("relation", (("red", "circle"), ("blue", "square")), "small", "to the left of")
    captions = ["a blue square to the right of a red circle", "a red circle to the left of a blue square",
                "a red circle to the right of a blue square", "a blue circle to the left of a red square", "junk"]
    assert judge_captions(captions, [spec] * 5) == [True, True, False, False, False]
    single = Spec("single", (("red", "circle"),), "small")
    assert judge_captions(["a small red circle", "a large red circle"], [single] * 2) == [True, False]


def test_hold_out_stream():
    held = ShapesWorld(hold_out=True, seed=0).sample_specs(3000)
    assert not any(is_held_out(s) for s in held)
    assert {f: sum(s.family == f for s in held) > 800 for f in ("single", "relation", "count")} == \
        {"single": True, "relation": True, "count": True}
    full = ShapesWorld(hold_out=False, seed=0).sample_specs(3000)
    seen_pairs = {p for s in full for p in s.objects}
    assert HELD_OUT <= seen_pairs
    for s in held + full:
        if s.family == "relation":
            assert s.objects[0][0] != s.objects[1][0]
    for s in eval_specs("heldout", 50):
        assert is_held_out(s)
    assert not any(is_held_out(s) for s in eval_specs("seen", 50))


def test_determinism_and_resume():
    a, b = ShapesWorld(seed=5), ShapesWorld(seed=5)
    ia, ca, sa = a.batch(16)
    ib, cb, sb = b.batch(16)
    assert torch.equal(ia, ib) and ca == cb and sa == sb
    assert eval_specs("heldout", 10, seed=3) == eval_specs("heldout", 10, seed=3)

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = a.batch(16)
    buffer.seek(0)
    resumed = ShapesWorld(seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = resumed.batch(16)
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_render_constraints(image_size):
    world = ShapesWorld(image_size=image_size, seed=11)
    specs = world.sample_specs(96)
    images = world.render(specs)
    assert images.shape == (96, 3, image_size, image_size) and images.dtype == torch.float32
    pixels = (images * 255).round()
    assert (pixels - images * 255).abs().max() < 1e-3
    allowed = torch.tensor([(255, 255, 255)] + list(COLORS.values()), dtype=torch.float32)  # (7, 3)
    is_allowed = (pixels.permute(0, 2, 3, 1)[..., None, :] == allowed).all(-1).any(-1)  # (B, S, S)
    assert is_allowed.all()

    # Layout: inside the canvas, boxes >= 2 px apart, relations along their axis by >= 0.2 S.
    cx, cy, r = world.layout(specs, np.random.default_rng(0))
    for b, spec in enumerate(specs):
        n = len(spec.objects)
        assert ((cx[b, :n] - r[b] >= 0) & (cx[b, :n] + r[b] <= image_size)).all()
        assert ((cy[b, :n] - r[b] >= 0) & (cy[b, :n] + r[b] <= image_size)).all()
        for i in range(n):
            for j in range(i + 1, n):
                assert max(abs(cx[b, i] - cx[b, j]), abs(cy[b, i] - cy[b, j])) - 2 * r[b] >= 2
        if spec.family == "relation":
            dx, dy = cx[b, 0] - cx[b, 1], cy[b, 0] - cy[b, 1]
            along, other = {"to the left of": (-dx, dy), "to the right of": (dx, dy),
                            "above": (-dy, dx), "below": (dy, dx)}[spec.relation]
            assert along >= math.ceil(0.2 * image_size) and along > abs(other)

    # Rendered objects: one component per object, bounding boxes apart, sizes as drawn.
    if image_size >= 64:
        for objs, spec in zip(find_objects(images), specs):
            assert len(objs) == len(spec.objects)
            for i, a in enumerate(objs):
                for b in objs[i + 1:]:
                    gap_x = max(a["bbox"][0], b["bbox"][0]) - min(a["bbox"][2], b["bbox"][2])
                    gap_y = max(a["bbox"][1], b["bbox"][1]) - min(a["bbox"][3], b["bbox"][3])
                    assert max(gap_x, gap_y) >= 2


def test_accuracy():
    specs = [Spec("single", (("red", "circle"),), "small")] * 2 + \
            [Spec("count", (("red", "circle"),) * 2, "small")] * 2
    assert accuracy([True, False, True, True], specs) == {"single": 0.5, "count": 1.0, "overall": 0.75}


def test_batch_of_one_shape():
    world = ShapesWorld(seed=0)
    specs = [Spec("single", (("blue", "square"),), "large")]
    assert judge_images(world.render(specs), specs) == [True]
