"""Data for nano FlowTok, in three parts:
1. The shapes world: flat coloured shapes on white captioned in a tiny canonical grammar, generated (no download).
2. The judge: says exactly whether a picture (or a caption) matches a prompt, usable alone; evaluation with it.
3. Your own captioned images (three folder layouts) with the shapes world's interface; picture grids and charts."""
import csv
import dataclasses
import glob
import io
import json
import math
import os
import re
import sys
import textwrap
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

import flowtok as ft

# -----------------------------------------------------------------------------
# 1. The shapes world

# vocabulary
COLORS = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (230, 200, 30), "green": (40, 160, 60),
          "blue": (40, 80, 220), "purple": (150, 60, 200)}  # exact fill RGB
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELD_OUT = frozenset({("green", "triangle"), ("purple", "circle"), ("orange", "square"), ("blue", "diamond")})
FAMILIES = ("single", "relation", "count")
SIZE_FRACTION = {"small": 0.09, "large": 0.16}  # radius r as a fraction of the image size
# Each relation as (axis, sign) of centre(A) - centre(B), with x = axis 0 and y = axis 1 growing downwards.
RELATION_AXIS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
COUNT_WORDS = {2: "two", 3: "three"}
MAX_OBJECTS = 3
# Every (colour, shape) pair in a fixed order: never iterate HELD_OUT, a frozenset's order varies between processes.
ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)
HELD_OUT_PAIRS = tuple(p for p in ALL_PAIRS if p in HELD_OUT)
COLOR_NAMES = tuple(COLORS)

def inside_shape(shape, dx, dy, r):
    """Which points (dx, dy) from the box centre (y down) lie in `shape` drawn in a box of half-side r."""
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2                 # disc of radius r
    if shape == "square":
        return (dx.abs() < r) & (dy.abs() < r)              # the whole box
    if shape == "triangle":
        return (dy.abs() < r) & (2 * dx.abs() <= dy + r)    # apex at top-centre, base on the box bottom
    return dx.abs() + dy.abs() <= r                         # diamond: vertices at the box edge midpoints

# specs and captions
@dataclasses.dataclass(frozen=True)
class Spec:
    """What a picture shows, independent of where things are placed."""
    family: str      # 'single' | 'relation' | 'count'
    objects: tuple   # ((color, shape), ...): single 1; relation 2 in caption order (A rel B); count N identical
    size: str        # 'small' | 'large', shared by all objects; only the single family's caption states it
    relation: str | None = None  # one of RELATIONS for the relation family, else None

def caption(spec):
    if spec.family == "single":
        (color, shape), = spec.objects
        return f"a {spec.size} {color} {shape}"  # "small"/"large" never take "an"
    if spec.family == "relation":
        (ca, sa), (cb, sb) = spec.objects
        art = lambda word: "an" if word[0] in "aeiou" else "a"  # every colour word has a regular vowel sound
        return f"{art(ca)} {ca} {sa} {spec.relation} {art(cb)} {cb} {sb}"
    color, shape = spec.objects[0]
    return f"{COUNT_WORDS[len(spec.objects)]} {color} {shape}s"

_C = "(" + "|".join(COLORS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_SINGLE_RE = re.compile(rf"an? (small|large) {_C} {_S}")
_RELATION_RE = re.compile(rf"an? {_C} {_S} (" + "|".join(RELATIONS) + rf") an? {_C} {_S}")
_COUNT_RE = re.compile(rf"(two|three) {_C} {_S}s")

def parse_caption(text):
    """Canonical grammar -> Spec, or None. Accepts either article, any case/spacing, a final period."""
    text = " ".join(text.lower().strip().removesuffix(".").split())
    if m := _SINGLE_RE.fullmatch(text):
        size, color, shape = m.groups()
        return Spec("single", ((color, shape),), size)
    if m := _RELATION_RE.fullmatch(text):
        ca, sa, rel, cb, sb = m.groups()  # the relation family always shows two different colours
        return Spec("relation", ((ca, sa), (cb, sb)), "large", rel) if ca != cb else None
    if m := _COUNT_RE.fullmatch(text):
        word, color, shape = m.groups()
        return Spec("count", ((color, shape),) * (2 if word == "two" else 3), "large")
    return None

def normalize(spec):
    """Rewrite 'right of'/'below' as 'left of'/'above' with the objects swapped: same picture-meaning."""
    flip = spec.family == "relation" and {"to the right of": "to the left of", "below": "above"}.get(spec.relation)
    return Spec("relation", spec.objects[::-1], spec.size, flip) if flip else spec

def reader_phrasing(texts):
    """Captions as image -> text learns to say them: a relation left/above-wise (normalize); other text as is."""
    return [caption(normalize(spec)) if (spec := parse_caption(t)) and spec != normalize(spec) else t for t in texts]

def same_meaning(a, b):
    a, b = normalize(a), normalize(b)
    size_ok = a.size == b.size or a.family != "single"  # only the single family's caption states size
    return (a.family, a.objects, a.relation) == (b.family, b.objects, b.relation) and size_ok

def is_held_out(spec):
    return any(pair in HELD_OUT for pair in spec.objects)

# sampling specs
def _spec_from_uniforms(family, u, pairs_a, pairs_b):
    """One spec of `family` from uniforms u in [0, 1): u[1..5] pick pair A, pair B (another colour), relation, size,
    count, so that a whole batch is one vectorised rng call."""
    size = SIZES[int(u[4] * 2)]
    pair_a = pairs_a[int(u[1] * len(pairs_a))]
    if family == "single":
        return Spec("single", (pair_a,), size)
    if family == "count":
        return Spec("count", (pair_a,) * (2 + int(u[5] * 2)), size)
    others = [p for p in pairs_b if p[0] != pair_a[0]]
    pair_b = others[int(u[2] * len(others))]
    return Spec("relation", (pair_a, pair_b), size, RELATIONS[int(u[3] * len(RELATIONS))])

# Fixed evaluation prompts: (spec seed, render seed) per split. Every default is chosen on 'val';
# 'test' is for the final report and the README, never looked at while tuning; 'grid' for pictures.
EVAL_SEEDS = {"val": (1234, 4321), "test": (2718, 3141), "grid": (7, 7)}

def eval_specs(pairs, n_per_family, split="val", hold_out=True):
    """Fixed evaluation prompts of a split, n_per_family per family in FAMILIES order. pairs 'seen': the training
    distribution (every pair if not hold_out); 'heldout': each has a HELD_OUT pair (single, count: 8 captions each)."""
    assert pairs in ("seen", "heldout") and split in EVAL_SEEDS
    rng = np.random.default_rng(EVAL_SEEDS[split][0])
    seen = SEEN_PAIRS if hold_out else ALL_PAIRS
    pairs_a, pairs_b = (seen, seen) if pairs == "seen" else (HELD_OUT_PAIRS, ALL_PAIRS)
    specs = []
    for family in FAMILIES:
        for u in rng.random((n_per_family, 7)):
            spec = _spec_from_uniforms(family, u, pairs_a, pairs_b)
            if pairs == "heldout" and family == "relation" and u[6] < 0.5:  # the held-out object on either side
                spec = Spec("relation", spec.objects[::-1], spec.size, spec.relation)
            specs.append(spec)
    return specs

# the world
class ShapesWorld:
    """An endless stream of (image, caption, spec) batches, deterministic for a seed."""
    def __init__(self, image_size=64, hold_out=True, seed=0, device="cpu"):
        self.image_size, self.hold_out, self.device = image_size, hold_out, torch.device(device)
        self.rng = np.random.default_rng(seed)
        self.pairs = SEEN_PAIRS if hold_out else ALL_PAIRS
        self.palette = torch.tensor(list(COLORS.values()), device=self.device, dtype=torch.float32) / 255  # (6, 3)

    def captions(self, n=20000):
        """Training captions to train the BPE on, from a fixed-seed stream: this stream's order stays untouched."""
        return [caption(s) for s in ShapesWorld(self.image_size, self.hold_out, seed=0).sample_specs(n)]

    def sample_specs(self, n):
        return [_spec_from_uniforms(FAMILIES[int(u[0] * 3)], u, self.pairs, self.pairs)  # u[0]: family, a third each
                for u in self.rng.random((n, 6))]

    def layout(self, specs, rng=None):
        """Placement obeying the specs by vectorised rejection sampling -> int cx, cy (B, O), r (B,); unused slots 0."""
        rng = self.rng if rng is None else rng
        S, B = self.image_size, len(specs)
        n_obj = np.array([len(s.objects) for s in specs])
        base = np.array([SIZE_FRACTION[s.size] * S for s in specs])
        r = np.maximum(1, np.rint(base * rng.uniform(0.9, 1.1, B))).astype(np.int64)  # +-10% jitter, whole pixels
        axis, sign = np.array([RELATION_AXIS.get(s.relation, (-1, 0)) for s in specs]).T  # axis -1: no relation
        min_offset = math.ceil(0.2 * S)
        cx, cy = np.zeros((2, B, MAX_OBJECTS), np.int64)
        T, todo = 64, np.arange(B)  # T candidate layouts per image per round; most images find one in the first
        while len(todo):
            rt = r[todo, None, None, None]
            u = rng.random((len(todo), T, MAX_OBJECTS, 2))
            c = rt + np.floor(u * (S - 2 * rt + 1)).astype(np.int64)  # (b, T, O, 2) centres (x, y) in [r, S - r]
            ok = np.ones((len(todo), T), bool)
            for i, j in ((0, 1), (0, 2), (1, 2)):  # boxes [c - r, c + r) at least 2 empty pixels apart
                gap = np.abs(c[:, :, i] - c[:, :, j]).max(-1) - 2 * r[todo, None]
                ok &= (n_obj[todo] <= j)[:, None] | (gap >= 2)  # (slot j unused, or far enough)
            d = c[:, :, 0] - c[:, :, 1]  # (b, T, 2) offset of A from B
            ax = np.maximum(axis[todo], 0)[:, None]
            along = np.take_along_axis(d, ax[:, :, None], 2)[..., 0] * sign[todo, None]
            other = np.take_along_axis(d, 1 - ax[:, :, None], 2)[..., 0]
            ok &= (axis[todo] < 0)[:, None] | ((along >= min_offset) & (along > np.abs(other)))
            found = ok.any(1)
            chosen = c[found, ok.argmax(1)[found]]  # (b_found, O, 2): each image's first layout that fits
            cx[todo[found]], cy[todo[found]] = chosen[..., 0], chosen[..., 1]
            todo = todo[~found]
        present = np.arange(MAX_OBJECTS)[None] < n_obj[:, None]
        return cx * present, cy * present, r

    def render(self, specs, rng=None, soft=False):
        """Specs -> float images (B, 3, S, S) in [0, 1], flat palette colours on white. soft: another renderer, to test
        a model on pictures it was not trained on: centres off the pixel grid, edges anti-aliased (4 x 4 samples)."""
        rng = self.rng if rng is None else rng
        cx, cy, r = self.layout(specs, rng)
        B, S, dev = len(specs), self.image_size, self.device
        n = 4 if soft else 1  # samples per pixel side
        shift = rng.uniform(-0.5, 0.5, (2, B, MAX_OBJECTS)) if soft else np.zeros((2, B, MAX_OBJECTS))
        grid = (torch.arange(S * n, device=dev, dtype=torch.float32) + 0.5) / n  # sample positions, in pixels
        rows = [(b, o, SHAPES.index(shape), COLOR_NAMES.index(color))
                for b, spec in enumerate(specs) for o, (color, shape) in enumerate(spec.objects)]
        img, slot, shape, color = np.array(rows).T  # (K,) each
        as_t = lambda a: torch.as_tensor(a, device=dev, dtype=torch.float32).view(-1, 1, 1)
        dx = grid.view(1, 1, -1) - as_t(cx[img, slot] + shift[0, img, slot])  # (K, 1, nS)
        dy = grid.view(1, -1, 1) - as_t(cy[img, slot] + shift[1, img, slot])  # (K, nS, 1)
        rk = as_t(r[img])  # (K, 1, 1)
        mask = torch.zeros(B, MAX_OBJECTS, S * n, S * n, device=dev)  # (B, O, nS, nS), empty slots stay 0
        for i, name in enumerate(SHAPES):  # each object is tested against its own shape only
            sel = np.flatnonzero(shape == i)
            mask[img[sel], slot[sel]] = inside_shape(name, dx[sel], dy[sel], rk[sel]).float()
        if soft:
            mask = torch.nn.functional.avg_pool2d(mask, n)  # (B, O, S, S): the share of each pixel covered
        ink = torch.zeros(B, MAX_OBJECTS, 3, device=dev)  # (B, O, 3) how far each object is from white
        ink[img, slot] = 1 - self.palette[color]
        # Objects never overlap, so painting is white minus a plain sum over objects (a batched matmul).
        out = 1 - torch.einsum("bop,boc->bcp", mask.view(B, MAX_OBJECTS, S * S), ink)  # (B, 3, S*S)
        return out.view(B, 3, S, S)

    def batch(self, n):
        specs = self.sample_specs(n)
        return self.render(specs), [caption(s) for s in specs], specs

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}  # plain dict of str/int: safe for weights_only loads

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["rng"]

class WorldPool:
    """The shapes world sampled once and encoded by the frozen tokenizer: on a CPU, rendering and encoding cost a good
    share of a flow step. Pictures from a stream seeded by `seed` (a resume rebuilds it), drawn by `world`'s rng."""
    @torch.no_grad()
    def __init__(self, world, tokenizer, n, seed, batch=500):
        source = ShapesWorld(world.image_size, world.hold_out, seed=seed, device=world.device)
        self.world, self.specs, moments, t0 = world, [], [], time.time()
        print(f"latent pool: encoding {n} pictures of the shapes world", flush=True)
        for start in range(0, n, batch):
            img, _, specs = source.batch(min(batch, n - start))
            moments.append(torch.stack(tokenizer.encode(img), 1).float())  # (b, 2, K, C): mean, logvar
            self.specs += specs
        self.moments = torch.cat(moments)  # (n, 2, K, C)
        print(f"latent pool: {n} pictures encoded in {time.time() - t0:.0f} s")

    def batch(self, n):
        """-> posterior mean, logvar (n, K, C), n captions, n specs."""
        idx = self.world.rng.integers(0, len(self.specs), n)
        specs = [self.specs[i] for i in idx]
        m = self.moments[torch.from_numpy(idx).to(self.moments.device)]
        return m[:, 0], m[:, 1], [caption(s) for s in specs], specs

# -----------------------------------------------------------------------------
# 2. The judge

def _label_components(cls):
    """4-connected components of equal class in cls (B, S, S) int, -1 = not an object pixel, by min-label
    propagation and pointer jumping. -> labels (B, S, S): the smallest flat index in each pixel's component."""
    B, H, W = cls.shape
    lab = torch.arange(B * H * W, device=cls.device, dtype=torch.int32).view(B, H, W)  # int32 halves memory traffic
    same_h = (cls[:, :, 1:] == cls[:, :, :-1]) & (cls[:, :, 1:] >= 0)  # (B, H, W-1) joined to right neighbour
    same_v = (cls[:, 1:, :] == cls[:, :-1, :]) & (cls[:, 1:, :] >= 0)  # (B, H-1, W) joined to lower neighbour
    while True:
        new = lab.clone()
        new[:, :, 1:] = torch.where(same_h, torch.minimum(new[:, :, 1:], lab[:, :, :-1]), new[:, :, 1:])
        new[:, :, :-1] = torch.where(same_h, torch.minimum(new[:, :, :-1], lab[:, :, 1:]), new[:, :, :-1])
        new[:, 1:, :] = torch.where(same_v, torch.minimum(new[:, 1:, :], lab[:, :-1, :]), new[:, 1:, :])
        new[:, :-1, :] = torch.where(same_v, torch.minimum(new[:, :-1, :], lab[:, 1:, :]), new[:, :-1, :])
        # A label is a pixel of the same component whose own label is never larger: jump to it.
        new = new.view(-1)[new]
        if torch.equal(new, lab):
            return lab
        lab = new

def _template_iou(comp, area, w, h):
    """IoU (K, 4) of each component with each shape template (SHAPES order) drawn in its bounding box.
    comp: (K, C, C) bool crops at the box's top-left corner; area: (K,) pixel counts; w, h: (K,) box sizes."""
    C = comp.shape[-1]
    grid = torch.arange(C, device=comp.device, dtype=torch.float32) + 0.5
    # Offsets from the box centre in units of the half-side: every template lives in a unit box.
    dx = 2 * grid.view(1, 1, C) / w.view(-1, 1, 1) - 1  # (K, 1, C)
    dy = 2 * grid.view(1, C, 1) / h.view(-1, 1, 1) - 1  # (K, C, 1)
    box = (dx < 1) & (dy < 1)  # (K, C, C): the crop may reach past the box (or past the canvas, clamped)
    templates = torch.stack([inside_shape(s, dx, dy, 1.0) & box for s in SHAPES], 1)  # (K, 4, C, C)
    inter = (templates & comp[:, None]).sum((-2, -1))
    return inter / (templates.sum((-2, -1)) + area[:, None] - inter)

def find_objects(images):
    """Objects by the judging rules in images (B, 3, S, S), float in [0, 1] or uint8. -> per image a list of
    dicts: color, shape (None below IoU 0.5), size, cx, cy (box centre, pixels), bbox (x0, y0, x1, y1 exclusive)."""
    rgb = (images.float() if images.dtype == torch.uint8 else images.float() * 255).permute(0, 2, 3, 1)  # (B, S, S, 3)
    B, S, dev = rgb.shape[0], rgb.shape[1], rgb.device
    palette = torch.tensor(list(COLORS.values()), device=dev, dtype=torch.float32)  # (6, 3)
    # Squared distances as |p|^2 - 2 p.c + |c|^2: one matmul, exact for whole-number pixel values.
    d2 = (rgb ** 2).sum(-1, keepdim=True) - 2 * rgb @ palette.T + (palette ** 2).sum(-1)  # (B, S, S, 6)
    near, k = d2.min(-1)
    background = ((rgb - 255) ** 2).sum(-1) < 60 ** 2
    cls = torch.where(~background & (near < 80 ** 2), k, -1)  # (B, S, S), -1 = not an object pixel
    lab = _label_components(cls).view(-1).long()
    fg = cls.view(-1) >= 0
    area = torch.bincount(lab[fg], minlength=lab.numel())
    roots = torch.nonzero(area >= 0.4 * math.pi * (SIZE_FRACTION["small"] * S) ** 2).view(-1)  # (K,) sorted by image
    if len(roots) == 0:
        return [[] for _ in range(B)]
    flat = torch.arange(lab.numel(), device=dev)
    x, y = (flat % S)[fg], (flat // S % S)[fg]
    x0, y0 = (torch.full_like(area, S).scatter_reduce(0, lab[fg], v, "amin")[roots] for v in (x, y))
    x1, y1 = (torch.zeros_like(area).scatter_reduce(0, lab[fg], v + 1, "amax")[roots] for v in (x, y))
    img = roots // (S * S)
    # Crop every component at its box's top-left, all crops the size of the largest box.
    C = int(torch.maximum(x1 - x0, y1 - y0).max())
    offs = torch.arange(C, device=dev)
    ys, xs = ((v[:, None] + offs).clamp(max=S - 1) for v in (y0, x0))  # (K, C) each
    labels = lab.view(B, S, S)
    ious = torch.cat([  # in chunks, which bounds memory when noisy images have many large blobs
        _template_iou(labels[img[i:j, None, None], ys[i:j, :, None], xs[i:j, None, :]] == roots[i:j, None, None],
                      area[roots[i:j]], (x1 - x0)[i:j], (y1 - y0)[i:j])
        for i, j in ((i, i + 256) for i in range(0, len(roots), 256))
    ])  # (K, 4)
    best_iou, best = ious.max(1)
    objects = [[] for _ in range(B)]
    rows = zip(*(t.tolist() for t in (img, cls.view(-1)[roots], best, best_iou, x0, y0, x1, y1)))
    for b, c, s, iou, bx0, by0, bx1, by1 in rows:
        side = max(bx1 - bx0, by1 - by0)
        small = abs(side - 2 * 0.09 * S) < abs(side - 2 * 0.16 * S)
        objects[b].append(dict(color=COLOR_NAMES[c], shape=SHAPES[s] if iou >= 0.5 else None,
                               size="small" if small else "large", cx=(bx0 + bx1) / 2, cy=(by0 + by1) / 2,
                               bbox=(bx0, by0, bx1, by1)))
    return objects

def _judge_one(objs, spec):
    if any(o["shape"] is None for o in objs):
        return False  # an object with no recognisable shape spoils the picture
    found = [(o["color"], o["shape"]) for o in objs]
    if spec.family != "relation":  # count: N identical (colour, shape) entries; single: one, of the right size
        return found == list(spec.objects) and (spec.family == "count" or objs[0]["size"] == spec.size)
    if len(objs) != 2 or {o["color"] for o in objs} != {c for c, _ in spec.objects}:
        return False
    by_color = {o["color"]: o for o in objs}
    a, b = (by_color[c] for c, _ in spec.objects)
    shapes_ok = (a["shape"], b["shape"]) == (spec.objects[0][1], spec.objects[1][1])
    # the relation, between box centres: the right sign along the named axis, and more than across it
    axis, sign = RELATION_AXIS[spec.relation]
    d = (a["cx"] - b["cx"], a["cy"] - b["cy"])
    return shapes_ok and sign * d[axis] > abs(d[1 - axis])

def judge_images(images, specs):
    return [_judge_one(objs, spec) for objs, spec in zip(find_objects(images), specs)]

def judge_captions(captions, specs):
    return [p is not None and same_meaning(p, s) for p, s in zip(map(parse_caption, captions), specs)]

def accuracy(oks, specs):
    """Per-family accuracy over the families present, and overall = mean over all items."""
    hits = {family: [ok for ok, s in zip(oks, specs) if s.family == family] for family in FAMILIES}
    out = {family: sum(h) / len(h) for family, h in hits.items() if h}
    return {**out, "overall": sum(oks) / len(oks) if len(oks) else 0.0}

# judging a trained model
def eval_images(image_size, specs, split, device, soft=False):
    """The fixed ground-truth renders of a split's evaluation specs (soft: see ShapesWorld.render)."""
    return ShapesWorld(image_size, seed=EVAL_SEEDS[split][1], device=device).render(specs, soft=soft)

@torch.no_grad()
def evaluate(tokenizer, model, bpe, s, n, split="val", directions=("t2i", "i2t"), hold_out=True):
    """Judge accuracy per family on a split's seen and held-out prompts (n per family each), sampling settings s:
    text -> image (and from one draw if s.draws > 1); with 'i2t' image -> text (likeliest and best of s.candidates,
    on the world's renders and soft ones), both round trips and the text decoder's decode(encode(caption))."""
    res, dev = {}, tokenizer.scale_factor.device
    likeliest = dataclasses.replace(s, candidates=1)
    for pairs in ("seen", "heldout"):
        specs = eval_specs(pairs, n, split, hold_out)
        prompts = [caption(x) for x in specs]
        if s.draws > 1:  # one draw per caption too: what the read-back check adds
            first = ft.text_to_image(tokenizer, model, bpe, prompts, dataclasses.replace(s, draws=1))
            res[f"t2i_first_{pairs}"] = accuracy(judge_images(first, specs), specs)
        imgs = ft.text_to_image(tokenizer, model, bpe, prompts, s, read_as=reader_phrasing(prompts))
        res[f"t2i_{pairs}"] = accuracy(judge_images(imgs, specs), specs)
        if "i2t" not in directions:
            continue
        for soft in (True, False):  # pictures of another renderer (soft), then the world's own
            truth = eval_images(tokenizer.cfg.image_size, specs, split, dev, soft)
            for name, settings in (("likeliest", likeliest), ("", s)) if s.candidates > 1 else (("", s),):
                caps = ft.image_to_text(tokenizer, model, bpe, truth, settings)
                key = "_".join(["i2t"] + ["soft"] * soft + [name] * bool(name) + [pairs])
                res[key] = accuracy(judge_captions(caps, specs), specs)
        back = ft.image_to_text(tokenizer, model, bpe, imgs, s)  # text -> image -> text: is it the prompt again?
        res[f"t2i2t_{pairs}"] = accuracy(judge_captions(back, specs), specs)
        with warnings.catch_warnings():  # the captions are model output: over-long ones are just wrong
            warnings.simplefilter("ignore")
            redrawn = ft.text_to_image(tokenizer, model, bpe, [c or "?" for c in caps], s)
        res[f"i2t2i_{pairs}"] = accuracy(judge_images(redrawn, specs), specs)  # image -> text -> image: same spec?
        ids = bpe.encode(prompts).to(dev)
        dec = [bpe.decode(x) for x in model.text_decoder(model.text_encoder(ids)[0]).argmax(-1)]
        res[f"text_roundtrip_{pairs}"] = accuracy([a == b for a, b in zip(dec, prompts)], specs)
    return res

@torch.no_grad()
def evaluate_tokenizer(tokenizer, n, bpe=None, images=None, captions=None, guidance=0.0, split="val", hold_out=True):
    """PSNR (and on the shapes world judge accuracy) of reconstructions from the posterior mean, of the given
    images or of a split's evaluation renders (n per family, seen and held-out). 'recon_blind' decodes without
    the captions; 'recon' lets a text-aware decoder read them (bpe given), with decoder guidance `guidance`."""
    res, dev = {}, tokenizer.scale_factor.device
    def recon_psnr(img, caps):
        ids = bpe.encode(caps).to(dev) if caps is not None and bpe is not None else None
        rec = tokenizer.decode(tokenizer.encode(img)[0], ids, guidance).clamp(0, 1)
        mse = (rec - img).pow(2).flatten(1).mean(1)
        return rec, (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    if images is not None:
        return {"recon": {"psnr": recon_psnr(images, captions)[1]}}
    for pairs in ("seen", "heldout"):
        specs = eval_specs(pairs, n, split, hold_out)
        img = eval_images(tokenizer.cfg.image_size, specs, split, dev)
        variants = {"recon_blind": None}
        if tokenizer.cfg.text_aware and bpe is not None:
            variants["recon"] = [caption(x) for x in specs]
        for name, caps in variants.items():
            rec, psnr = recon_psnr(img, caps)
            res[f"{name}_{pairs}"] = {**accuracy(judge_images(rec, specs), specs), "psnr": psnr}
    return res

def report(res, multiline=False):
    """An evaluation's results as one line (or one line per entry)."""
    fmt = lambda k, v: f"psnr {v:.2f}dB" if k == "psnr" else f"{k} {v:.3f}"
    parts = [f"{name}: " + " ".join(fmt(k, v) for k, v in acc.items()) for name, acc in res.items()
             if isinstance(acc, dict)]
    return ("\n" if multiline else " | ").join(parts)

# -----------------------------------------------------------------------------
# 3. Your own captioned images; picture grids and charts
# A folder of your pictures with captions, in one of three layouts found automatically:
#   imagefolder  metadata.jsonl or metadata.csv with columns file_name (relative path) and text
#   txt          cat.jpg beside cat.txt, searched recursively
#   coco         a captions_*.json (or a folder holding exactly one), several captions per image
# Bad data never stops a run: every entry is decoded once at open time, the bad ones are skipped
# and counted by reason, and a file that still fails later is skipped and another one drawn.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SKIP_REASONS = ("missing file", "unreadable image", "image too small", "no caption", "empty caption",
                "caption not UTF-8", "bad metadata line")
MIN_SIDE_FRACTION = 0.25  # a shorter side under image_size/4 would be upscaled over 4x: mostly blur

def _open_rgb(path, size):
    """An image as FlowTok's preprocessing sees it: RGB, alpha composited on white, 16/32-bit and float scaled
    to 8 bit; a JPEG decoded at its smallest DCT scale >= size (free and fast). Fails with a one-line ValueError."""
    try:
        with Image.open(path) as im:
            im.draft(None, (size, size))
            im = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF; captions see it upright
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            elif im.mode.startswith(("I", "F")):  # Pillow keeps 16-bit PNG/TIFF data in these modes
                a = np.nan_to_num(np.asarray(im, dtype=np.float64))
                peak = a.max(initial=0)
                sixteen_bit = im.mode.startswith("I;16") or (im.mode == "I" and peak <= 65535)
                full = 65535 if sixteen_bit else 1.0 if peak <= 1 else 255 if peak <= 255 else peak  # floats: [0, 1]
                im = Image.fromarray(np.clip(a / full * 255, 0, 255).round().astype(np.uint8))
            return im.convert("RGB")  # palette, CMYK, grayscale, 1-bit ...
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__})") from None

def _resize_crop(im, size):
    """Shorter side resized to size (bicubic), centre crop; no flip: captions say left and right. -> uint8 (3, S, S)"""
    w, h = im.size
    s = size / min(w, h)
    a = np.asarray(im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC))  # (H, W, 3)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return torch.from_numpy(a[top:top + size, left:left + size].copy()).permute(2, 0, 1)

def load_image(path, size):
    """Any image Pillow opens -> (3, size, size) float in [0, 1], preprocessed as for training."""
    return _resize_crop(_open_rgb(path, size), size).float() / 255

def _read_text(path):
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        return f.read()

def _imagefolder_entries(root, meta, skipped):
    """metadata.jsonl / .csv -> {image path: [raw captions]}: several rows naming one file are several captions."""
    rows = []
    if meta.endswith(".jsonl"):
        for line in filter(str.strip, _read_text(meta).splitlines()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)  # a bad metadata line, counted below
    else:
        rows = list(csv.DictReader(io.StringIO(_read_text(meta), newline="")))
    entries = {}
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get("text"), str):
            entries.setdefault(os.path.join(root, row["file_name"]), []).append(row["text"])
        else:
            skipped["bad metadata line"] += 1
    return entries

def _txt_entries(root, skipped):
    """Images with a same-named .txt beside them, recursively; hidden files and folders ignored."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)):
            txt = os.path.join(dirpath, os.path.splitext(name)[0] + ".txt")
            if os.path.isfile(txt):
                entries[os.path.join(dirpath, name)] = [_read_text(txt)]
            else:
                skipped["no caption"] += 1
    return entries

def _coco_entries(ann, image_root, skipped):
    """captions_SPLIT.json -> entries. Images are looked for in image_root if given, else beside the json or
    in a folder named SPLIT beside it or beside its folder (COCO's own layout)."""
    try:
        coco = json.loads(_read_text(ann))
        images = {im["id"]: im["file_name"] for im in coco["images"]}
        annotations = coco["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ann}: not a COCO captions file ({type(e).__name__}): it needs images[] with id and "
                         "file_name, annotations[] with image_id and caption") from None
    caps = {}
    for a in annotations:
        if isinstance(a, dict) and a.get("image_id") in images and isinstance(a.get("caption"), str):
            caps.setdefault(a["image_id"], []).append(a["caption"])
        else:
            skipped["bad metadata line"] += 1
    skipped["no caption"] += sum(i not in caps for i in images)
    here, split = os.path.dirname(os.path.abspath(ann)), os.path.basename(ann)[len("captions_"):-len(".json")]
    names = list(images.values())[:100]  # the root holding most of the first 100 images; the first wins ties
    root = image_root or max([here, os.path.join(here, split), os.path.join(os.path.dirname(here), split)],
                             key=lambda r: sum(os.path.isfile(os.path.join(r, n)) for n in names))
    return {os.path.join(root, name): caps[i] for i, name in images.items() if i in caps}

def _find_format(path, image_root):
    """-> (format name, {image path: [raw captions]}, skip counts), or a ValueError saying what to give instead."""
    skipped, root, metas = Counter(), os.path.dirname(os.path.abspath(path)), ("metadata.jsonl", "metadata.csv")
    if not os.path.exists(path):
        raise ValueError(f"dataset {path}: no such file or folder: give a folder of captioned images or a COCO "
                         "captions_*.json")
    if os.path.isdir(path):  # a metadata file first, else one COCO captions file, else .txt captions
        found = [f for f in (os.path.join(path, m) for m in metas) if os.path.isfile(f)][:1] or \
            sorted(f for sub in ("", "annotations") for f in glob.glob(os.path.join(path, sub, "captions_*.json")))
        if len(found) > 1:
            raise ValueError(f"dataset {path}: several COCO caption files ({', '.join(map(os.path.basename, found))})"
                             ": give the one to train on as the path")
        if not found and not (entries := _txt_entries(path, skipped)):
            raise ValueError(f"dataset {path}: no metadata.jsonl/metadata.csv, no captions_*.json and no image "
                             "with a same-named .txt caption: put your captions in one of these layouts")
        if not found:
            return "txt", entries, skipped
        root, path = path, found[0]
    if os.path.basename(path) in metas:
        return "imagefolder", _imagefolder_entries(root, path, skipped), skipped
    if path.endswith(".json"):
        return "coco", _coco_entries(path, image_root, skipped), skipped
    raise ValueError(f"dataset {path}: a file but not a COCO captions_*.json or a metadata.jsonl/.csv: "
                     "give the folder holding your images instead")

def _clean_caption(text, skipped):
    """The caption with whitespace runs (newlines too) as one space, or None with its skip reason counted."""
    # files are read with surrogateescape: each undecodable byte is a lone surrogate, which UTF-8 cannot encode
    why = "caption not UTF-8" if re.search("[\ud800-\udfff]", text) else None if text.split() else "empty caption"
    if why:
        skipped[why] += 1
    return None if why else " ".join(text.split())

class CaptionedImages:
    """Your (image, caption) pairs with ShapesWorld's interface; seeded epochs, one of an image's captions drawn each
    time. cache_mb of images stay in memory, a set fixed at open (an LRU under shuffled epochs would never hit)."""
    def __init__(self, path, image_size, seed=0, device="cpu", image_root=None, cache_mb=512):
        self.path, self.image_size, self.device = path, image_size, torch.device(device)
        self.format, entries, self.skipped = _find_format(path, image_root)
        entries = {file: good for file, raw in entries.items()  # an image with no good caption is skipped
                   if (good := [c for c in (_clean_caption(text, self.skipped) for text in raw) if c])}
        min_side, n_cache = math.ceil(image_size * MIN_SIDE_FRACTION), cache_mb * 2 ** 20 // (3 * image_size ** 2)

        def scan(i, file):  # -> skip reason, or the preprocessed image (None past the cache budget)
            try:  # a real decode, not verify(): verify() never reads a JPEG's data, so misses truncation
                im = _open_rgb(file, image_size)
            except ValueError:
                return "unreadable image" if os.path.isfile(file) else "missing file"
            if min(im.size) < min_side:  # draft decoding never shrinks a side below image_size
                return "image too small"
            return _resize_crop(im, image_size) if i < n_cache else None

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without holding the GIL
            results = list(pool.map(scan, range(len(entries)), entries))
        self.skipped.update(r for r in results if isinstance(r, str))
        keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
        files, caps = list(entries), list(entries.values())
        self.files, self.caps = [files[i] for i in keep], [caps[i] for i in keep]
        self.cache = {j: results[i] for j, i in enumerate(keep) if results[i] is not None}
        usable = f"{len(self.files)} usable images with {sum(map(len, self.caps))} captions" if self.files else \
            "no usable image-caption pair"
        skipped = ", ".join(f"{self.skipped[r]} {r}" for r in SKIP_REASONS if self.skipped[r]) or "nothing"
        summary = f"dataset {path}: {usable} ({self.format}); skipped {skipped}"
        if not self.files:
            raise ValueError(summary + ": fix those files or point at another dataset")
        print(summary)
        self.fingerprint = zlib.crc32("\n".join(self.files).encode("utf-8", "surrogateescape"))
        self.rng = np.random.default_rng(seed)
        self.bad = []  # indices that passed the scan but failed to decode later: out of every later epoch
        self.order, self.pos = self.rng.permutation(len(self.files)), 0

    def __len__(self):
        return len(self.files)

    def captions(self):
        return [c for caps in self.caps for c in caps]

    def _load(self, i):
        """Image i as uint8 (3, S, S); None if it fails to decode now (it is skipped from then on)."""
        if i in self.cache:
            return self.cache[i]
        try:
            return _resize_crop(_open_rgb(self.files[i], self.image_size), self.image_size)
        except ValueError as e:
            print(f"warning: {e}: skipped from now on", file=sys.stderr)
            self.bad.append(i)
            self.skipped["unreadable image"] += 1
            return None

    def items(self, n, load=True):
        """The next n (index, uint8 image or None when not load, caption) of the stream."""
        out = []
        while len(out) < n:
            if self.pos == len(self.order):  # a new epoch, without the images that failed to decode
                alive = np.setdiff1d(np.arange(len(self.files)), self.bad)
                if not len(alive):
                    raise ValueError(f"dataset {self.path}: every image failed to decode during training: "
                                     "check the disk and the files")
                self.order, self.pos = self.rng.permutation(alive), 0
            i, self.pos = int(self.order[self.pos]), self.pos + 1
            img = self._load(i) if (load and i not in self.bad) else None
            if i not in self.bad:
                out.append((i, img, self.caps[i][self.rng.integers(len(self.caps[i]))]))
        return out

    def batch(self, n):
        """-> images (n, 3, S, S) float in [0, 1] on device, n captions, [None] * n (no judge for free text)."""
        _, imgs, caps = zip(*self.items(n))
        x = torch.stack(imgs)  # (n, 3, S, S) uint8: a quarter of float's bytes to move
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True).float() / 255, list(caps), [None] * n

    def state_dict(self):  # plain ints, lists and one tensor: safe for weights_only loads
        return {"rng": self.rng.bit_generator.state, "order": torch.from_numpy(self.order.astype(np.int64)),
                "pos": self.pos, "bad": list(self.bad), "fingerprint": self.fingerprint}

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["rng"]
        if d["fingerprint"] == self.fingerprint:
            self.order, self.pos, self.bad = d["order"].numpy(), d["pos"], list(d["bad"])
        else:  # files added, removed or newly broken since the checkpoint
            print(f"warning: dataset {self.path} changed since the checkpoint: continuing with a fresh shuffle",
                  file=sys.stderr)
            self.order, self.pos, self.bad = self.rng.permutation(len(self.files)), 0, []

open_dataset = CaptionedImages  # your captioned images in whichever layout they are (see the top of this part)

class LatentCache:
    """Your dataset encoded once by the frozen tokenizer, as FlowTok's own pipeline trains on pre-tokenized latents:
    posterior mean, log-variance (N, 2, K, C) in a memory-mapped float16 .npy; rebuilt when data or tokenizer change."""
    @torch.no_grad()
    def __init__(self, ds, path, tokenizer, batch=256):
        self.ds = ds
        N, K, C = len(ds), tokenizer.cfg.num_tokens, tokenizer.cfg.token_dim
        weights = sum(float(v.double().sum()) for v in tokenizer.state_dict().values())
        key, meta = f"{ds.fingerprint}-{N}-{K}x{C}-{weights:.10e}", path + ".json"
        if not (os.path.exists(path) and os.path.exists(meta) and json.load(open(meta))["key"] == key):
            tmp, t0 = f"{path}.{os.getpid()}.tmp.npy", time.time()  # per process: DDP ranks may build it at once
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(N, 2, K, C))
            for start in range(0, N, batch):
                loaded = {i: img for i in range(start, min(N, start + batch)) if (img := ds._load(i)) is not None}
                if loaded:
                    x = torch.stack(list(loaded.values())).to(ds.device).float() / 255
                    out[list(loaded)] = torch.stack(tokenizer.encode(x), 1).cpu().numpy().astype(np.float16)
                print(f"latent cache: {min(N, start + batch)}/{N} images encoded", end="\r", flush=True)
            del out  # flushed and closed before the rename
            os.replace(tmp, path)  # atomic: a half-written cache is never picked up
            with open(f"{tmp}.json", "w") as f:
                json.dump({"key": key, "bad": list(ds.bad)}, f)
            os.replace(f"{tmp}.json", meta)
            print(f"latent cache: {N} images encoded in {time.time() - t0:.0f} s -> {path}")
        self.moments = np.load(path, mmap_mode="r")  # (N, 2, K, C) float16, paged in on demand
        ds.bad = sorted(set(ds.bad) | set(json.load(open(meta))["bad"]))

    def batch(self, n):
        """-> posterior mean, logvar (n, K, C) on the device (to re-sample from), n captions, [None] * n."""
        idx, _, caps = zip(*self.ds.items(n, load=False))
        m = torch.from_numpy(self.moments[np.array(idx)].astype(np.float32)).to(self.ds.device)  # (n, 2, K, C)
        return m[:, 0], m[:, 1], list(caps), [None] * n

def save_png(img, path):
    """Save a PIL image as a PNG at path (folders made) unless path is None; -> the image."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        img.save(path)
    return img

def save_grid(images, labels, path, cols=8, cell=128):
    """images (B, 3, S, S) in [0, 1] -> one PNG, each label written under its picture in up to 3 lines."""
    font = ImageFont.load_default(size=11)
    cols, text_h = min(cols, len(images)), 40
    canvas = Image.new("RGB", (cols * cell, math.ceil(len(images) / cols) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, S, S, 3)
    for i in range(len(images)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        canvas.paste(Image.fromarray(arr[i]).resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(" ".join(labels[i].split()), 22, break_long_words=False, break_on_hyphens=False)
        draw.multiline_text((x + 3, y + cell + 2), "\n".join(lines[:3]), fill="black", font=font, spacing=1)
    return save_png(canvas, path)

# matplotlib's "tab10" colours, in its order
CHART_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

def line_chart(series, path=None, title="", xlabel="", ylabel="", ylim=None, logy=False, size=(480, 300)):
    """{name: (xs, ys)} -> a line chart drawn with Pillow alone: framed axes with 5 ticks each, every point marked,
    a legend on the right. ylim fixes the y range; logy plots log10(y), leaving out y <= 0. -> the PIL image."""
    font = ImageFont.load_default(size=11)
    pts = {name: [(x, math.log10(y) if logy else y) for x, y in zip(xs, ys) if y > 0 or not logy]
           for name, (xs, ys) in series.items()}
    xs, ys = zip(*(xy for p in pts.values() for xy in p))
    (x0, x1), (y0, y1) = (min(xs), max(xs)), ylim or (min(ys), max(ys))
    x1, y1 = max(x1, x0 + 1e-9), max(y1, y0 + 1e-9)  # a single point or a flat line still has a range
    W, H = size
    left, right, top, bottom = 50, 130, 22, 36  # room for the y ticks, the legend, the title, the x ticks
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle((left, top, W - right, H - bottom), outline="black")
    for i in range(5):
        x, y = x0 + i / 4 * (x1 - x0), y0 + i / 4 * (y1 - y0)
        d.line((px(x), H - bottom, px(x), H - bottom + 3), fill="black")
        d.text((px(x), H - bottom + 5), f"{x:.4g}", fill="black", font=font, anchor="mt")
        d.line((left - 3, py(y), left, py(y)), fill="black")
        d.text((left - 5, py(y)), f"{10 ** y:.2g}" if logy else f"{y:.3g}", fill="black", font=font, anchor="rm")
    for i, (name, p) in enumerate(pts.items()):
        color, xy = CHART_COLORS[i % len(CHART_COLORS)], [(px(x), py(y)) for x, y in p]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for x, y in xy:
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        d.line((W - right + 8, top + 14 * i + 6, W - right + 24, top + 14 * i + 6), fill=color, width=2)
        d.text((W - right + 28, top + 14 * i), name, fill="black", font=font)
    d.text(((left + W - right) / 2, 4), title, fill="black", font=font, anchor="mt")
    d.text(((left + W - right) / 2, H - 4), xlabel, fill="black", font=font, anchor="mb")
    d.text((4, 4), ylabel, fill="black", font=font)
    return save_png(img, path)
