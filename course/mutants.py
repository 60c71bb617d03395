"""Wrong answers to the course's blanks, for `python course/kit.py check`: each must fail a grading test
of its assignment. Instructor only (the student copy leaves this file out: a sign flip of the solution
is the solution).

WRONG[function] lists (label, wrong function, must_name). Plausible mistakes have must_name True: some
failing test's message must contain the label, so a student who makes it is told so. Trivial answers
(return zeros, the input) only have to fail. Families of mistakes are built by one function with the
changed part as an argument, so each wrong answer below is one line.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import flowtok as ft


def plausible(label, fn):
    return label, fn, True


def trivial(label, fn):
    return label, fn, False


def per_sample(t, x):
    return t.view(-1, *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, ...)

# -----------------------------------------------------------------------------
# path


def euler(at_end=False, dt=lambda t0, t1, steps: t1 - t0, points=lambda steps: steps + 1, traced=slice(None)):
    def integrate(velocity, x, steps, t_start=0.0, t_end=1.0, trace=None):
        ts, xs = torch.linspace(t_start, t_end, points(steps)).tolist(), [x]
        for t0, t1 in zip(ts[:-1], ts[1:]):
            xs.append(xs[-1] + dt(t0, t1, steps) * velocity(xs[-1], t1 if at_end else t0))
        if trace is not None:
            trace += xs[traced]
        return xs[-1]
    return integrate


PATH = {
    "interpolate": [
        plausible("t and 1 - t swapped", lambda x0, x1, t: per_sample(t, x0) * x0 + (1 - per_sample(t, x0)) * x1),
        plausible("t not reshaped to (B, 1, 1)", lambda x0, x1, t: (1 - t) * x0 + t * x1),
        plausible("the (1 - t) factor dropped", lambda x0, x1, t: x0 + per_sample(t, x0) * x1),
        plausible("sign of x1 - x0 flipped", lambda x0, x1, t: x0 + per_sample(t, x0) * (x0 - x1)),
        trivial("returns x0", lambda x0, x1, t: x0),
        trivial("returns x1", lambda x0, x1, t: x1),
    ],
    "target_velocity": [
        plausible("sign flipped", lambda x0, x1: x0 - x1),
        plausible("sum instead of difference", lambda x0, x1: x1 + x0),
        plausible("normalised to unit length", lambda x0, x1: F.normalize(x1 - x0, dim=-1)),
        trivial("returns x1", lambda x0, x1: x1),
        trivial("returns zeros", lambda x0, x1: torch.zeros_like(x0)),
    ],
    "sample_t": [
        plausible("uniform t", lambda n, device, generator=None: torch.rand(n, generator=generator)),
        plausible("no sigmoid", lambda n, device, generator=None: torch.randn(n, generator=generator)),
        plausible("sigmoid of a uniform", lambda n, device, generator=None: torch.rand(n, generator=generator).sigmoid()),
        plausible("generator ignored", lambda n, device, generator=None: torch.randn(n).sigmoid()),
        trivial("constant t = 1/2", lambda n, device, generator=None: torch.full((n,), 0.5)),
    ],
    "euler": [
        plausible("velocity evaluated at the step's end", euler(at_end=True)),
        plausible("dt always positive", euler(dt=lambda t0, t1, steps: abs(t1 - t0))),
        plausible("dt = 1 / steps (interval ignored)", euler(dt=lambda t0, t1, steps: 1 / steps)),
        plausible("one step too few", euler(points=lambda steps: steps)),
        plausible("trace misses the start", euler(traced=slice(1, None))),
        plausible("trace misses the end", euler(traced=slice(None, -1))),
        trivial("returns x unchanged", lambda velocity, x, steps, t_start=0.0, t_end=1.0, trace=None: x),
    ],
}

# -----------------------------------------------------------------------------
# guidance


def null_roll(flag=lambda r, prob: r < prob, seeded=True, min_flagged=2, clone=True, shift=1, everyone=False,
              flags=lambda null: null.long()):
    def roll(x1, prob, generator=None):
        null = flag(torch.rand(x1.shape[0], generator=generator if seeded else None), prob)
        idx = null.nonzero().squeeze(1)
        if idx.numel() < min_flagged:
            return x1, torch.zeros_like(null, dtype=torch.long)
        out = x1.clone() if clone else x1
        if everyone:
            out = x1.roll(shift, 0)
        else:
            out[idx] = x1[idx.roll(shift)]
        return out, flags(null)
    return roll


def guided(flags=lambda B: torch.arange(2).repeat_interleave(B), swap=False, direction=0,
           mix=lambda v_cond, v_null, s: v_null + s * (v_cond - v_null)):
    def guide(model, x, t, scale):
        v_cond, v_null = model.velocity(torch.cat([x, x]), t, direction=direction, null=flags(x.shape[0])).chunk(2)
        return mix(*((v_null, v_cond) if swap else (v_cond, v_null)), scale)
    return guide


def two_passes(model, x, t, scale):
    v_cond, v_null = model.velocity(x, t, direction=0, null=0), model.velocity(x, t, direction=0, null=1)
    return v_null + scale * (v_cond - v_null)


GUIDANCE = {
    "null_roll": [
        plausible("every sample rolled", null_roll(everyone=True)),
        plausible("flags drawn with > prob", null_roll(flag=lambda r, prob: r > prob)),
        plausible("input changed in place", null_roll(clone=False)),
        plausible("flagged targets not rolled", null_roll(shift=0)),
        plausible("a lone flagged sample kept its flag", null_roll(min_flagged=1)),
        plausible("flags returned as bool", null_roll(flags=lambda null: null)),
        plausible("generator ignored", null_roll(seeded=False)),
        trivial("no flags, targets unchanged", lambda x1, prob, generator=None: (x1, torch.zeros(len(x1), dtype=torch.long))),
    ],
    "guided": [
        plausible("halves swapped", guided(swap=True)),
        plausible("flags interleaved", guided(flags=lambda B: torch.arange(2).repeat(B))),
        plausible("the decoder's form", guided(mix=lambda v_cond, v_null, s: v_cond + s * (v_cond - v_null))),
        plausible("guidance sign flipped", guided(mix=lambda v_cond, v_null, s: v_null + s * (v_null - v_cond))),
        plausible("image -> text field used", guided(direction=1)),
        plausible("scale ignored", guided(mix=lambda v_cond, v_null, s: v_cond)),
        plausible("two separate passes", two_passes),
        trivial("returns zeros", lambda model, x, t, scale: torch.zeros_like(x)),
    ],
}

# -----------------------------------------------------------------------------
# text


def reparameterised(std=lambda logvar: torch.exp(0.5 * logvar), noise=torch.randn, seeded=True):
    def sample(mean, logvar, generator=None):
        return mean + std(logvar) * noise(mean.shape, dtype=mean.dtype, generator=generator if seeded else None)
    return sample


def text_kl(prior=lambda mean: (0.3 * mean).pow(6), var=torch.exp, sign=-0.5,
            reduce=lambda kl: kl.flatten(1).sum(1).mean()):
    return lambda mean, logvar: reduce(sign * (1 + logvar - prior(mean) - var(logvar)))


def clip_loss(normalise=True, temperature=lambda s: s.exp().clamp(max=100), combine=lambda rows, cols: (rows + cols) / 2,
              mask_same=True):
    def loss(a, b, logit_scale, same=None):
        if normalise:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        logits, labels = temperature(logit_scale) * a @ b.t(), torch.arange(a.shape[0])
        if same is not None and mask_same:
            logits = logits.masked_fill(same & ~torch.eye(len(a), dtype=torch.bool), -torch.inf)
        return combine(F.cross_entropy(logits, labels), F.cross_entropy(logits.t(), labels))
    return loss


TEXT = {
    "gaussian_sample": [
        plausible("exp(logvar) for the std", reparameterised(std=torch.exp)),
        plausible("logvar used as the std", reparameterised(std=lambda logvar: logvar)),
        plausible("noise not scaled", reparameterised(std=lambda logvar: 1.0)),
        plausible("uniform noise", reparameterised(noise=torch.rand)),
        plausible("generator ignored", reparameterised(seeded=False)),
        plausible("no noise", lambda mean, logvar, generator=None: mean + torch.exp(0.5 * logvar)),
        trivial("returns the mean", lambda mean, logvar, generator=None: mean),
    ],
    "text_kl": [
        plausible("mean instead of sum", text_kl(reduce=lambda kl: kl.mean())),
        plausible("summed over the batch too", text_kl(reduce=lambda kl: kl.sum())),
        plausible("sum over the last dim only", text_kl(reduce=lambda kl: kl.sum(-1).mean())),
        plausible("mean^2 instead of (0.3 mean)^6", text_kl(prior=lambda mean: mean.pow(2))),
        plausible("0.3 mean^6", text_kl(prior=lambda mean: 0.3 * mean.pow(6))),
        plausible("var as exp(logvar / 2)", text_kl(var=lambda logvar: torch.exp(0.5 * logvar))),
        plausible("sign flipped", text_kl(sign=0.5)),
        trivial("returns zero", lambda mean, logvar: torch.zeros(())),
    ],
    "clip_loss": [
        plausible("a -> b only", clip_loss(combine=lambda rows, cols: rows)),
        plausible("b -> a only", clip_loss(combine=lambda rows, cols: cols)),
        plausible("sum of the two directions", clip_loss(combine=lambda rows, cols: rows + cols)),
        plausible("not normalised", clip_loss(normalise=False)),
        plausible("logit_scale used without exp", clip_loss(temperature=lambda s: s)),
        plausible("no cap at 100", clip_loss(temperature=lambda s: s.exp())),
        plausible("same-caption pairs still counted as negatives", clip_loss(mask_same=False)),
        trivial("returns zero", lambda a, b, logit_scale: torch.zeros(())),
    ],
}

# -----------------------------------------------------------------------------
# network


def timestep_embedding(time_scale=1000.0, period=None, over_dim=False, sin_first=False, interleave=False):
    def embed(t, dim, max_period=10000.0):
        half = dim // 2
        p = max_period if period is None else period(max_period)
        freq = torch.exp(-math.log(p) * torch.arange(half) / (dim if over_dim else half))
        args = time_scale * t[:, None] * freq[None]
        waves = [torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)]
        return torch.stack(waves, -1).flatten(1) if interleave else torch.cat(waves, -1)
    return embed


def attention(split="b n (three h d) -> three b h n d", scale=lambda head, width: head ** -0.5, softmax_dim=-1,
              join="b h n d -> b n (h d)", proj=True):
    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), split, three=3, h=self.n_head)
        y = rearrange((q @ k.transpose(-2, -1) * scale(q.shape[-1], x.shape[-1])).softmax(softmax_dim) @ v, join)
        return self.proj(y) if proj else y
    return forward


def dit_block(order="shift1 scale1 gate1 shift2 scale2 gate2", gate=lambda g: g[:, None], residual=1.0, norm=True,
              parallel=False):
    def forward(self, x, c):
        m = dict(zip(order.split(), self.ada(c).chunk(6, dim=1)))
        ln1, ln2 = (self.ln1, self.ln2) if norm else (nn.Identity(), nn.Identity())
        h = residual * x + gate(m["gate1"]) * self.attn(ft.modulate(ln1(x), m["shift1"], m["scale1"]))
        return residual * h + gate(m["gate2"]) * self.mlp(ft.modulate(ln2(x if parallel else h), m["shift2"], m["scale2"]))
    return forward


def patchify(pattern):
    return lambda self, img: rearrange(img, pattern, p=self.cfg.patch_size, q=self.cfg.patch_size)


NETWORK = {
    "timestep_embedding": [
        plausible("sin and cos swapped", timestep_embedding(sin_first=True)),
        plausible("cos and sin interleaved", timestep_embedding(interleave=True)),
        plausible("t not scaled by 1000", timestep_embedding(time_scale=1.0)),
        plausible("frequencies over dim, not dim / 2", timestep_embedding(over_dim=True)),
        plausible("frequency exponent sign flipped", timestep_embedding(period=lambda p: 1 / p)),
        plausible("max_period ignored", timestep_embedding(period=lambda p: 10000.0)),
        trivial("returns zeros", lambda t, dim, max_period=10000.0: torch.zeros(len(t), dim)),
    ],
    "modulate": [
        plausible("the 1 + dropped", lambda x, shift, scale: x * scale[:, None] + shift[:, None]),
        plausible("shift and scale swapped", lambda x, shift, scale: x * (1 + shift[:, None]) + scale[:, None]),
        plausible("broadcast over the batch", lambda x, shift, scale: x * (1 + scale[None]) + shift[None]),
        plausible("shift added before scaling", lambda x, shift, scale: (x + shift[:, None]) * (1 + scale[:, None])),
        trivial("returns x", lambda x, shift, scale: x),
    ],
    "Attention.forward": [
        plausible("no 1/sqrt(Dh) scaling", attention(scale=lambda head, width: 1.0)),
        plausible("scaled by 1/Dh", attention(scale=lambda head, width: 1 / head)),
        plausible("scaled by the full width sqrt(D)", attention(scale=lambda head, width: width ** -0.5)),
        plausible("softmax over the queries", attention(softmax_dim=-2)),
        plausible("heads joined in the wrong order", attention(join="b h n d -> b n (d h)")),
        plausible("q, k, v split wrong", attention(split="b n (h d three) -> three b h n d")),
        plausible("output projection dropped", attention(proj=False)),
        trivial("returns x", lambda self, x: x),
    ],
    "DiTBlock.forward": [
        plausible("gates dropped", dit_block(gate=lambda g: 1.0)),
        plausible("no residual", dit_block(residual=0.0)),
        plausible("shift and scale read swapped", dit_block(order="scale1 shift1 gate1 scale2 shift2 gate2")),
        plausible("modulations grouped by kind", dit_block(order="shift1 shift2 scale1 scale2 gate1 gate2")),
        plausible("norm skipped", dit_block(norm=False)),
        plausible("gates broadcast over the batch", dit_block(gate=lambda g: g[None])),
        plausible("the MLP reads the block's input", dit_block(parallel=True)),
        trivial("returns x", lambda self, x, c: x),
    ],
    "ImageTokenizer.patchify": [
        plausible("patches in column-major order", patchify("b c (h p) (w q) -> b (w h) (p q c)")),
        plausible("channels first within a patch", patchify("b c (h p) (w q) -> b (h w) (c p q)")),
        plausible("rows and columns swapped within a patch", patchify("b c (h p) (w q) -> b (h w) (q p c)")),
        plausible("reshape without permuting", lambda self, img: img.reshape(len(img), -1, 3 * self.cfg.patch_size ** 2)),
        trivial("returns zeros", lambda self, img: torch.zeros(len(img), 4, 12)),
    ],
}

WRONG = {**PATH, **GUIDANCE, **TEXT, **NETWORK}
