"""The course's grading tests: one pytest marker per assignment (course/kit.py lists them).

    python -m pytest -m path          # grade one assignment: path, guidance, text or network

Every expected value comes from fixed inputs written here and worked out by hand (or from a known
distribution, with a tolerance of many standard errors), never from a random seed or a PyTorch
version. Every test runs twice, with float32 and with float64 as the default dtype. A failing
assertion's message names the likely mistake: course/kit.py check proves that each wrong answer it
knows is caught by such a message.
"""

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import flowtok as ft

DTYPES = (torch.float32, torch.float64)


@contextmanager
def default_dtype(dtype):
    """Tensors and modules made inside are `dtype` (the kit's runner uses this too)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    with default_dtype(request.param):
        yield request.param


def close(actual, expected, tol, why):
    """Assert that `actual` is a tensor equal to `expected` within tol (absolute and relative).
    `why` is the message's first line: what the value means and the likely mistakes."""
    assert torch.is_tensor(actual), f"{why}\n  expected a tensor, got {type(actual).__name__}"
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, f"{why}\n  expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}"
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"{why}\n  expected {expected.tolist()}\n  got {actual.tolist()}"


def seeded(seed):
    return torch.Generator().manual_seed(seed)

# -----------------------------------------------------------------------------
# 1. path: the straight path, its velocity, logit-normal t, the Euler sampler


@pytest.mark.path
def test_interpolate_runs_from_text_to_image(dtype):
    x0, x1 = torch.full((3, 2, 3), 2.0), torch.full((3, 2, 3), -2.0)  # B = C = 3: a t that is not per sample still broadcasts
    close(ft.interpolate(x0, x1, torch.zeros(3)), x0, 1e-6,
          "at t = 0 the path starts at x0, the text latent (t and 1 - t swapped?)")
    close(ft.interpolate(x0, x1, torch.ones(3)), x1, 1e-6, "at t = 1 the path ends at x1, the image latent "
          "(t and 1 - t swapped? sign of x1 - x0 flipped? the (1 - t) factor dropped?)")
    rows = torch.tensor([2.0, 1.0, -2.0])[:, None, None].expand(3, 2, 3)  # t = 0, 1/4, 1: 2, 3/4 2 + 1/4 (-2), -2
    close(ft.interpolate(x0, x1, torch.tensor([0.0, 0.25, 1.0])), rows, 1e-6,
          "each sample has its own t (t not reshaped to (B, 1, 1)?)")


@pytest.mark.path
def test_target_velocity_is_the_path_derivative(dtype):
    x0, x1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, -2.0]])
    close(ft.target_velocity(x0, x1), [[3.0, -4.0]], 1e-6, "v = x1 - x0 points from the text latent to the image "
          "latent (sign flipped? sum instead of difference? normalised to unit length?)")
    # moving along v for half the time carries x_t at t = 1/4 to x_t at t = 3/4
    half = ft.interpolate(x0, x1, torch.tensor([0.25])) + 0.5 * ft.target_velocity(x0, x1)
    close(half, ft.interpolate(x0, x1, torch.tensor([0.75])), 1e-6, "x_t + 0.5 v should be x_(t + 0.5)")


@pytest.mark.path
def test_sample_t_is_logit_normal(dtype):
    t = ft.sample_t(20000, "cpu", seeded(0))
    assert torch.is_tensor(t) and t.shape == (20000,), "sample_t(n, ...) returns n values of t, (n,)"
    assert 0 < t.min() and t.max() < 1, "t lies strictly inside (0, 1) (no sigmoid?)"
    # sigmoid(N(0, 1)): median 1/2; P(t < 0.1) = P(N < logit 0.1 = -2.197) = 0.014; standard errors 0.002, 0.001
    assert abs(t.median() - 0.5) < 0.02, f"the median of sigmoid(N(0, 1)) is 1/2, got {t.median():.3f} (sigmoid of a uniform?)"
    low = (t < 0.1).float().mean()
    assert abs(low - 0.014) < 0.006, f"P(t < 0.1) should be 0.014, not {low:.3f} (uniform t?)"
    assert torch.equal(ft.sample_t(50, "cpu", seeded(1)), ft.sample_t(50, "cpu", seeded(1))), \
        "the same generator seed gives the same t (generator ignored?)"


@pytest.mark.path
def test_euler_closed_form(dtype):
    x = torch.tensor([[1.0, -2.0]])
    const = lambda x, t: torch.full_like(x, 3.0)
    close(ft.euler(const, x, 3), x + 3, 1e-6, "a constant field v = 3 moves x by exactly 3 from t = 0 to 1, "
          "in any number of steps (returns x unchanged?)")
    close(ft.euler(const, x, 3, 1.0, 0.0), x - 3, 1e-6, "backwards, from t = 1 to 0, it moves x by -3 (dt always positive? "
          "dt = 1 / steps (interval ignored)?)")
    close(ft.euler(const, x, 2, 0.0, 0.5), x + 1.5, 1e-6, "from t = 0 to 0.5 it moves x by 1.5 (dt = 1 / steps (interval ignored)?)")
    ramp = lambda x, t: torch.ones_like(x) * 2 * t  # dx/dt = 2t; Euler reads t at each step's start
    close(ft.euler(ramp, torch.zeros(1), 4), [0.75], 1e-6, "dx/dt = 2t in 4 steps is 2 (0 + 1 + 2 + 3) / 16 = 0.75 "
          "(velocity evaluated at the step's end? one step too few?)")
    grow = lambda x, t: x  # dx/dt = x: each step multiplies by 1 + dt
    close(ft.euler(grow, torch.ones(1), 4), [1.25 ** 4], 1e-6, "dx/dt = x in 4 steps is (1 + 1/4)^4 = 2.4414 "
          "(one step too few?)")
    trace = []
    ft.euler(const, x, 3, trace=trace)
    assert len(trace) == 4, f"a list trace receives x at the start and after each of 3 steps: 4, not {len(trace)} " \
        "(trace misses the start? trace misses the end?)"
    close(torch.stack(trace), torch.stack([x, x + 1, x + 2, x + 3]), 1e-6, "the trace is x, x + 1, x + 2, x + 3")

# -----------------------------------------------------------------------------
# 2. guidance: the indicator's roll in training, the guided mix in sampling


def numbered(B):
    """(B, 2, 3) targets, sample i all i: a rolled target tells where it came from."""
    return torch.arange(float(B))[:, None, None].repeat(1, 2, 3)


@pytest.mark.guidance
def test_null_roll_rolls_only_the_flagged(dtype):
    x1 = numbered(1000)
    before = x1.clone()
    rolled, null = ft.null_roll(x1, 0.25, seeded(0))
    assert torch.equal(x1, before), "null_roll must leave its input alone (input changed in place?)"
    assert torch.is_tensor(null) and null.dtype == torch.long and null.shape == (1000,), \
        "the flags are a (B,) long tensor of 0 and 1, for an embedding (flags returned as bool?)"
    share = null.float().mean()  # standard error 0.014
    assert abs(share - 0.25) < 0.1, f"about prob = 0.25 of the samples are flagged, not {share:.2f} (flags drawn with > prob?)"
    keep = null == 0
    assert torch.equal(rolled[keep], x1[keep]), "unflagged samples keep their own target (every sample rolled?)"
    came_from, flagged = rolled[~keep][:, 0, 0].long(), (~keep).nonzero().squeeze(1)
    assert sorted(came_from.tolist()) == flagged.tolist() and (came_from != flagged).all(), \
        "each flagged sample takes another flagged sample's target (flagged targets not rolled?)"
    again = ft.null_roll(x1, 0.25, seeded(0))
    assert torch.equal(again[1], null), "the same generator seed flags the same samples (generator ignored?)"


@pytest.mark.guidance
def test_null_roll_edge_cases(dtype):
    x1 = numbered(5)
    rolled, null = ft.null_roll(x1, 0.0)
    assert null.sum() == 0 and torch.equal(rolled, x1), "prob = 0 flags nobody (flags drawn with > prob?)"
    rolled, null = ft.null_roll(x1, 1.0)
    came_from = rolled[:, 0, 0].long()
    assert null.tolist() == [1] * 5 and sorted(came_from.tolist()) == list(range(5)) and \
        (came_from != torch.arange(5)).all(), "prob = 1 flags everyone, and every target moves (flagged targets not rolled?)"
    rolled, null = ft.null_roll(x1[:1], 1.0)
    assert null.tolist() == [0] and torch.equal(rolled, x1[:1]), \
        "a lone flagged sample has no other target to take: it stays conditional (a lone flagged sample kept its flag?)"


class StandInFlow:
    """A flow model with a known field: v = x + t conditional (null 0), v = -x unconditional
    (null 1); NaN for the image -> text direction. Counts its calls."""
    def __init__(self):
        self.calls = 0

    def velocity(self, x, t, direction=0, null=0):
        self.calls += 1
        null = torch.as_tensor(null).expand(x.shape[0]).view(-1, 1, 1)
        v = torch.where(null == 1, -x, x + t)
        return v if direction == 0 else torch.full_like(x, math.nan)


@pytest.mark.guidance
def test_guided_mixes_conditional_and_unconditional(dtype):
    x = numbered(3) - 1  # rows -1, 0, 1
    model = StandInFlow()
    v = ft.guided(model, x, 0.25, 3.0)
    close(ft.guided(StandInFlow(), x, 0.25, 1.0), x + 0.25, 1e-6, "at scale 1 guidance is the conditional field v_cond (halves "
          "swapped? flags interleaved? image -> text field used? the decoder's form? guidance sign flipped?)")
    close(ft.guided(StandInFlow(), x, 0.25, 0.0), -x, 1e-6, "at scale 0 guidance is the unconditional field v_null "
          "(halves swapped? flags interleaved? scale ignored?)")
    close(v, 5 * x + 0.75, 1e-6, "v_null + s (v_cond - v_null) = -x + 3 (2x + t) = 5x + 0.75 here "
          "(guidance sign flipped? the decoder's form v_cond + s (v_cond - v_null)? scale ignored?)")
    assert model.calls == 1, f"both fields come from one batched pass of 2B samples, not {model.calls} (two separate passes?)"

# -----------------------------------------------------------------------------
# 3. text: the reparameterised sample, FlowTok's KL, symmetric InfoNCE


@pytest.mark.text
def test_gaussian_sample_statistics(dtype):
    mean, logvar = torch.full((20000,), 3.0), torch.full((20000,), math.log(4.0))
    z = ft.gaussian_sample(mean, logvar, seeded(0))
    assert torch.is_tensor(z) and z.shape == mean.shape and z.dtype == mean.dtype, "a sample has the mean's shape and dtype"
    # N(3, 2^2): standard errors 0.014 for the mean, 0.010 for the std
    close(z.std(), 2.0, 0.02, "sigma = exp(logvar / 2) = 2 for logvar = ln 4 (exp(logvar) for the std? logvar used as "
          "the std? noise not scaled? no noise? uniform noise?)")
    close(z.mean(), 3.0, 0.03, "samples centre on the mean (uniform noise?)")
    same = [ft.gaussian_sample(mean[:50], logvar[:50], seeded(1)) for _ in range(2)]
    assert torch.equal(*same), "the same generator seed gives the same sample (generator ignored?)"


@pytest.mark.text
def test_gaussian_sample_is_reparameterised(dtype):
    mean, logvar = torch.tensor([0.5, -1.0], requires_grad=True), torch.tensor([0.0, 2.0], requires_grad=True)
    z = ft.gaussian_sample(mean, logvar, seeded(0))
    z.sum().backward()
    close(mean.grad, [1.0, 1.0], 1e-6, "dz / dmean = 1: the sample is mean + sigma eps")
    close(logvar.grad, (z - mean).detach() / 2, 1e-5, "dz / dlogvar = sigma eps / 2 = (z - mean) / 2 "
          "(exp(logvar) for the std?)")


@pytest.mark.text
def test_text_kl_per_element(dtype):
    one = lambda mean, logvar: ft.text_kl(torch.tensor([[[mean]]]), torch.tensor([[[logvar]]]))  # B = K = C = 1
    close(one(0.0, 0.0), 0.0, 1e-6, "the prior's own mean 0, variance 1 costs nothing (sign flipped?)")
    close(one(10 / 3, 0.0), 0.5, 1e-5, "(0.3 mean)^6 = 1 at mean = 10/3, so the KL is 1/2 (mean^2 instead of "
          "(0.3 mean)^6? 0.3 mean^6? sign flipped?)")
    close(one(0.0, math.log(2.0)), (1 - math.log(2.0)) / 2, 1e-5, "var = exp(logvar) = 2: the KL is (1 - ln 2) / 2 = 0.153 "
          "(var as exp(logvar / 2)? sign flipped?)")


@pytest.mark.text
def test_text_kl_sums_per_sample_and_averages_the_batch(dtype):
    mean = torch.zeros(2, 2, 3)
    mean[0] = 10 / 3  # sample 0: six elements of KL 1/2 each; sample 1: the prior's mean, KL 0
    close(ft.text_kl(mean, torch.zeros(2, 2, 3)), 1.5, 1e-5, "sum over K and C per sample (3 and 0), mean over the "
          "batch: 1.5 (mean instead of sum? summed over the batch too? sum over the last dim only?)")


def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.text
def test_clip_loss_closed_form(dtype):
    # lengths 3, 2 and 1, sqrt 2 must not matter; cosines [[1, r], [0, r]] with r = 1/sqrt 2; temperature e^ln2 = 2
    a, b = torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r, s = 1 / math.sqrt(2), 2.0
    rows = [softplus(s * r - s), softplus(-s * r)]  # cross-entropy of a -> b: log(1 + e^(other - own))
    cols = [softplus(-s), math.log(2)]               # b -> a: logits [1, 0] and [r, r] (a tie: ln 2)
    close(ft.clip_loss(a, b, torch.tensor(math.log(s))), sum(rows + cols) / 4, 1e-5,
          "the mean of the row (a -> b) and column (b -> a) cross-entropies, 0.370 here (one-directional, "
          "a -> b only? b -> a only? sum of the two directions? not normalised? logit_scale used without exp?)")


@pytest.mark.text
def test_clip_loss_caps_the_temperature_at_100(dtype):
    a, b = torch.eye(2), torch.tensor([[1.0, 0.0], [0.99, math.sqrt(1 - 0.99 ** 2)]])  # cosines [[1, .99], [0, .141]]
    c = math.sqrt(1 - 0.99 ** 2)
    want = (softplus(99 - 100) + softplus(-100 * c) + softplus(-100) + softplus(99 - 100 * c)) / 4
    close(ft.clip_loss(a, b, torch.tensor(math.log(1000.0))), want, 1e-4,
          "exp(logit_scale) = 1000 is capped at 100 (no cap at 100?)")

@pytest.mark.text
def test_clip_loss_same_caption_pairs_are_no_negatives(dtype):
    # rows 0 and 1 share a caption: cosines [[1, 1, 0], [1, 1, 0], [0, 0, 1]], temperature 2. Masking the
    # off-diagonal same pairs leaves rows 0, 1 with logits [2, 0]: softplus(-2) each; row 2 keeps [0, 0, 2]
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    want = (2 * softplus(-2.0) + math.log(1 + 2 * math.exp(-2.0))) / 3  # rows and columns alike (a = b)
    close(ft.clip_loss(a, a.clone(), torch.tensor(math.log(2.0)), same), want, 1e-5,
          "pairs marked `same` off the diagonal get logit -inf (same-caption pairs still counted as negatives? "
          "the diagonal masked too?)")


# -----------------------------------------------------------------------------
# 4. network: time embedding, adaLN, attention, the adaLN-Zero block, patches


@pytest.mark.network
def test_timestep_embedding_closed_form(dtype):
    # dim 4: frequencies 10000^(-0/2), 10000^(-1/2) = 1, 0.01; t = 0.001 scaled by 1000 gives angles 1, 0.01
    emb = ft.timestep_embedding(torch.tensor([0.0, 0.001]), 4)
    close(emb, [[1, 1, 0, 0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]], 1e-5,
          "[cos(1000 t f), sin(1000 t f)] with f = 1, 0.01 (sin and cos swapped? cos and sin interleaved? "
          "t not scaled by 1000? frequencies over dim, not dim / 2? frequency exponent sign flipped?)")
    close(ft.timestep_embedding(torch.tensor([0.001]), 4, 100.0), [[math.cos(1), math.cos(0.1), math.sin(1), math.sin(0.1)]],
          1e-5, "max_period 100 gives frequencies 1, 0.1 (max_period ignored?)")


@pytest.mark.network
def test_modulate_closed_form(dtype):
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.5, 2.0]]])  # (B, N, D) = (2, 2, 2)
    shift, scale = torch.tensor([[1.0, -1.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.0], [-1.0, 1.0]])
    close(ft.modulate(x, torch.zeros(2, 2), torch.zeros(2, 2)), x, 0, "zero shift and scale leave x as it is "
          "(the 1 + dropped?)")
    close(ft.modulate(x, shift, scale), [[[2.5, 1.0], [5.5, 3.0]], [[0.0, 2.0], [0.0, 6.0]]], 1e-6,
          "x (1 + scale) + shift, one (shift, scale) per sample for all its tokens (shift and scale swapped? "
          "broadcast over the batch, not the tokens? shift added before scaling?)")


@pytest.mark.network
def test_attention_closed_form(dtype):
    attn = ft.Attention(4, 2)  # two heads of Dh = 2 channels
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.eye(4).repeat(3, 1))  # q = k = v = x
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(2 * torch.eye(4))
        attn.proj.bias.fill_(0.5)
    # token 0 = (a, 0, c, 0), token 1 = 0. Head 0 scores token 0 with itself a^2 / sqrt 2 = ln 3, all else 0:
    # token 0 takes 3/4 of its own value, token 1 half of it. Head 1 likewise with ln 7: 7/8 and 1/2.
    a, c = math.sqrt(math.sqrt(2) * math.log(3)), math.sqrt(math.sqrt(2) * math.log(7))
    x = torch.tensor([[[a, 0, c, 0], [0, 0, 0, 0]]])
    y = torch.tensor([[[3 / 4 * a, 0, 7 / 8 * c, 0], [a / 2, 0, c / 2, 0]]])
    for manual in (False, True):
        attn.manual = manual
        close(attn(x), 2 * y + 0.5, 1e-5, f"softmax(q k^T / sqrt(Dh)) v per head, then proj ({'written out' if manual else 'SDPA'}; "
              "no 1/sqrt(Dh) scaling? scaled by 1/Dh? scaled by the full width sqrt(D)? softmax over the queries? "
              "heads joined in the wrong order? q, k, v split wrong? output projection dropped?)")


class StandIn(nn.Module):
    """A sub-layer with a known formula, in place of a learned one."""
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


@pytest.mark.network
def test_dit_block_closed_form(dtype):
    block = ft.DiTBlock(1, 1)  # D = 1; the sub-layers replaced by known formulas, c is the six modulations
    block.ada, block.ln1, block.ln2 = nn.Identity(), StandIn(lambda h: h + 1), StandIn(lambda h: h + 1)
    block.attn, block.mlp = StandIn(lambda h: 2 * h), StandIn(lambda h: h * h)
    x = torch.tensor([[[1.0], [2.0]], [[0.0], [-1.0]]])  # (B, N, D) = (2, 2, 1)
    #                  shift1 scale1 gate1 shift2 scale2 gate2
    c = torch.tensor([[1.0, 0.5, 0.5, 0.0, -0.5, 2.0],
                      [0.0, 0.0, 1.0, 1.0, 1.0, -1.0]])
    close(block(x, c * torch.tensor([1, 1, 0, 1, 1, 0])), x, 0, "with both gates 0 the block is the identity "
          "(gates dropped? no residual? modulations grouped by kind?)")
    # the attention half, gate2 = 0: x + gate1 * 2 ((x + 1) (1 + scale1) + shift1)
    close(block(x, c * torch.tensor([1, 1, 1, 1, 1, 0])), [[[5.0], [7.5]], [[2.0], [-1.0]]], 1e-6,
          "x + gate1 attn(modulate(ln1(x), shift1, scale1)) (shift and scale read swapped? norm skipped? "
          "gates broadcast over the batch, not the tokens?)")
    # then the MLP half on that x: + gate2 ((x + 1) (1 + scale2) + shift2)^2
    close(block(x, c), [[[23.0], [43.625]], [[-47.0], [-2.0]]], 1e-6, "then x + gate2 mlp(modulate(ln2(x), shift2, "
          "scale2)) on the new x (the MLP reads the block's input? shift and scale read swapped?)")


@pytest.mark.network
def test_patchify_order(dtype):
    cfg = ft.TokenizerConfig(image_size=4, patch_size=2, num_tokens=2, token_dim=2, width=8, enc_depth=1, dec_depth=1,
                             n_head=2, text_aware=False)
    tokenizer = ft.ImageTokenizer(cfg)
    c, y, x = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img = (100 * c + 10 * y + x)[None]  # pixel (c, y, x) holds the number cyx
    patches = tokenizer.patchify(img)
    assert torch.is_tensor(patches) and patches.shape == (1, 4, 12), "(B, 3, 4, 4) in 2 x 2 patches: (B, 4, 12)"
    close(patches[0, 1], [2, 102, 202, 3, 103, 203, 12, 112, 212, 13, 113, 213], 0, "patch 1 is the top right one, "
          "read row by row, the 3 channels of each pixel together (patches in column-major order? channels first "
          "within a patch? rows and columns swapped within a patch? reshape without permuting?)")
    close(patches[0, 2, :3], [20, 120, 220], 0, "patch 2 starts at row 2, column 0 (patches in column-major order?)")
    close(tokenizer.unpatchify(patches), img, 0, "unpatchify undoes patchify")
