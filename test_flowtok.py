"""Tests for nano FlowTok: CPU only, small, hermetic. Run: python -m pytest -q"""

import os
import sys
import math
import subprocess
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import flowtok as ft
import data

torch.set_flush_denormal(True)
HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# flow math in closed form


def test_path_and_velocity_closed_form():
    x0, x1 = torch.randn(5, 4, 3), torch.randn(5, 4, 3)
    assert torch.allclose(ft.interpolate(x0, x1, torch.zeros(5)), x0)  # t=0: text latent
    assert torch.allclose(ft.interpolate(x0, x1, torch.ones(5)), x1)   # t=1: image latent
    assert torch.allclose(ft.interpolate(x0, x1, torch.full((5,), 0.25)), 0.75 * x0 + 0.25 * x1)
    # the target velocity is the time derivative of the path (finite difference, any t)
    t, h = torch.rand(5), 1e-3
    fd = (ft.interpolate(x0, x1, t + h) - ft.interpolate(x0, x1, t - h)) / (2 * h)
    assert torch.allclose(fd, ft.target_velocity(x0, x1), atol=1e-3)


def test_logit_normal_t():
    t = ft.sample_t(20000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02           # sigmoid of a symmetric normal
    assert 0.15 < (t < 0.3).float().mean() < 0.25         # P(n < logit 0.3 = -0.847) = 0.199


def test_euler_integrates_analytic_fields():
    x0, x1 = torch.randn(3, 2), torch.randn(3, 2)
    # constant field: exact for any number of steps, forwards and backwards
    for steps in (1, 3, 20):
        assert torch.allclose(ft.euler(lambda x, t: x1 - x0, x0, steps), x1, atol=1e-6)
        assert torch.allclose(ft.euler(lambda x, t: x1 - x0, x1, steps, 1.0, 0.0), x0, atol=1e-6)
    # dx/dt = x from 1 to t=1 -> e, Euler error O(1/steps)
    e = ft.euler(lambda x, t: x, torch.ones(1), 2000)
    assert abs(e.item() - math.e) < 2e-3
    # the time argument runs 0 .. 1 - dt: dx/dt = 2t integrates to 1 - 1/steps
    assert abs(ft.euler(lambda x, t: torch.full_like(x, 2 * t), torch.zeros(1), 10).item() - 0.9) < 1e-6


def test_backward_integration_of_linear_field_returns_start():
    # a time-dependent linear field: dx/dt = A(t) x; forward then backward with many steps -> start
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.2]])
    field = lambda x, t: (1 + t) * x @ A.t()
    x_start = torch.randn(4, 2)
    x_end = ft.euler(field, x_start, 4000)
    back = ft.euler(field, x_end, 4000, 1.0, 0.0)
    assert torch.allclose(back, x_start, atol=3e-3)
    assert not torch.allclose(x_end, x_start, atol=0.1)  # it did move

# -----------------------------------------------------------------------------
# blocks


def test_sdpa_attention_matches_manual():
    torch.manual_seed(0)
    attn = ft.Attention(32, 4)
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
    w = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    manual = attn.proj((w @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(attn(x), manual, atol=1e-5)


def test_adaln_zero_blocks_start_as_identity():
    torch.manual_seed(0)
    flow = ft.FlowTransformer(K=6, C=4, width=32, depth=2, n_head=4, directions=2)
    x, c = torch.randn(3, 6, 32), torch.randn(3, 32)
    for block in flow.blocks:
        assert torch.equal(block(x, c), x)
    out = flow(torch.randn(3, 6, 4), torch.rand(3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
    assert out.shape == (3, 6, 4) and torch.all(out == 0)  # zero output layer: v = 0 at init


def test_sincos_positions():
    p = ft.sincos_2d(4, 16)
    assert p.shape == (16, 16)
    assert len({tuple(r.tolist()) for r in p}) == 16  # every patch position distinct
    assert torch.allclose(p[0, :8], p[3, :8]) and not torch.allclose(p[0, 8:], p[3, 8:])  # same row

# -----------------------------------------------------------------------------
# image tokenizer

TINY_TOK = ft.TokenizerConfig(image_size=32, patch_size=8, num_tokens=6, token_dim=4, width=32,
                              enc_depth=1, dec_depth=1, n_head=2)


def test_patchify_roundtrip_and_tokenizer_shapes():
    tok = ft.ImageTokenizer(TINY_TOK)
    img = torch.rand(3, 3, 32, 32)
    patches = tok.patchify(img)
    assert patches.shape == (3, 16, 8 * 8 * 3)
    assert torch.equal(tok.unpatchify(patches), img)
    assert torch.equal(patches[0, 1], img[0, :, :8, 8:16].permute(1, 2, 0).flatten())  # row-major patches
    mean, logvar = tok.encode(img)
    assert mean.shape == logvar.shape == (3, 6, 4)
    assert tok.decode(mean).shape == (3, 3, 32, 32)
    assert tok.latents(img).shape == (3, 6, 4)


def test_tokenizer_overfits_a_batch_and_scale_factor():
    torch.manual_seed(0)
    tok = ft.ImageTokenizer(TINY_TOK)
    img = data.ShapesWorld(32, seed=1).batch(8)[0]
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = tok(img)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    tok.fit_scale([img])
    assert abs(tok.latents(img, sample=False).std().item() - 1) < 1e-3

# -----------------------------------------------------------------------------
# text tokenizer, encoder and decoder


def test_bpe_roundtrip_and_merges():
    captions = [data.caption(s) for s in data.ShapesWorld(seed=0).sample_specs(500)]
    tt = ft.TextTokenizer.train(captions, length=16, vocab_size=400)
    assert 256 < tt.vocab_size <= 401
    ids = tt.encode(["a small red circle"])
    assert ids.shape == (1, 16)
    assert (ids[0] != tt.pad_id).sum() == 4  # whole words became single tokens
    for text in ["a red circle to the left of a blue square", "café naïve 日本 ✓", "x"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ft.TextTokenizer(64, "bpe", tt.ranks).decode(ft.TextTokenizer(64, "bpe", tt.ranks).encode([text])[0]) == text
    # survives the checkpoint format (plain types) and a weights_only load
    state = ft.TextTokenizer.from_state_dict(tt.state_dict())
    assert torch.equal(state.encode(captions[:5]), tt.encode(captions[:5]))


def test_truncation_warns_once():
    tt = ft.TextTokenizer(4, "bpe", {bytes([i]): i for i in range(256)})
    with pytest.warns(UserWarning, match="truncated"):
        ids = tt.encode(["abcdefgh"])
    assert tt.decode(ids[0]) == "abcd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tt.encode(["abcdefgh"])  # second time: silent


def test_gpt2_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="not in tiktoken's cache"):
        ft.TextTokenizer(16, "gpt2")


def tiny_flow(vocab, i2t="shared"):
    return ft.FlowTok(ft.FlowConfig(vocab_size=vocab, num_tokens=6, token_dim=4, width=32, depth=2, n_head=4,
                                    text_width=32, text_depth=1, i2t=i2t))


def test_text_decoder_overfits_to_exact_roundtrip():
    torch.manual_seed(0)
    captions = [data.caption(s) for s in data.eval_specs("seen", 2)]  # 2 of each family
    tt = ft.TextTokenizer.train([data.caption(s) for s in data.ShapesWorld(seed=0).sample_specs(500)], 12, 400)
    model = ft.FlowTok(ft.FlowConfig(vocab_size=tt.vocab_size, num_tokens=12, token_dim=4, width=32, depth=1,
                                     n_head=4, text_width=64, text_depth=1))
    ids = tt.encode(captions)
    assert model.text_decoder(model.text_encoder(ids)[0]).shape == (6, 12, tt.vocab_size)
    opt = torch.optim.AdamW(list(model.text_encoder.parameters()) + list(model.text_decoder.parameters()), lr=3e-3)
    for _ in range(150):
        mean, logvar = model.text_encoder(ids)
        loss = F.cross_entropy(model.text_decoder(ft.gaussian_sample(mean, logvar)).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoded = [tt.decode(x) for x in model.text_decoder(model.text_encoder(ids)[0]).argmax(-1)]
    assert decoded == captions

# -----------------------------------------------------------------------------
# flow model: CFG, directions, determinism, a loss that falls


def perturbed(model, seed=0):
    """Give the zero-initialised layers random values, so every input really matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_cfg_scale_one_is_conditional_velocity():
    model = perturbed(tiny_flow(300))
    x = torch.randn(4, 6, 4)
    v_cond = model.velocity(x, 0.3, null=0)
    assert not torch.allclose(v_cond, model.velocity(x, 0.3, null=1))  # the flag matters
    assert torch.allclose(ft.guided(model, x, 0.3, 1.0), v_cond, atol=1e-6)
    v2 = ft.guided(model, x, 0.3, 2.0)
    assert torch.allclose(v2, 2 * v_cond - model.velocity(x, 0.3, null=1), atol=1e-5)


def test_direction_switch():
    x = torch.randn(4, 6, 4)
    shared = perturbed(tiny_flow(300, "shared"))
    assert not torch.allclose(shared.velocity(x, 0.5, direction=0), shared.velocity(x, 0.5, direction=1))
    dedicated = perturbed(tiny_flow(300, "dedicated"))
    v1 = dedicated.velocity(x, 0.5, direction=1)
    assert torch.allclose(v1, dedicated.flow_i2t(x, torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long),
                                                 torch.zeros(4, dtype=torch.long)))
    assert not torch.allclose(v1, dedicated.velocity(x, 0.5, direction=0))
    inverse = tiny_flow(300, "inverse")
    assert not hasattr(inverse, "flow_i2t") and inverse.flow.dir_embed.num_embeddings == 1


def test_cfg_roll_only_among_flagged():
    x1 = torch.arange(10.0)[:, None, None].expand(10, 2, 2)
    rolled, null = ft.cfg_roll(x1, 0.5, torch.Generator().manual_seed(3))
    idx = null.nonzero().squeeze(1)
    assert idx.numel() >= 2
    assert torch.equal(rolled[null == 0], x1[null == 0])                # unflagged untouched
    assert torch.equal(rolled[idx], x1[idx.roll(1)])                    # flagged rolled among themselves
    _, none = ft.cfg_roll(x1, 0.0)
    assert none.sum() == 0


def test_same_seed_same_samples():
    model, ids = perturbed(tiny_flow(300)), torch.randint(0, 300, (3, 6))
    a = model.generate(ids, 4, 2.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(ids, 4, 2.0, generator=torch.Generator().manual_seed(5))
    c = model.generate(ids, 4, 2.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(model.generate(ids, 4, from_mean=True), model.generate(ids, 4, from_mean=True))


@pytest.mark.parametrize("i2t", ["shared", "dedicated", "inverse"])
def test_flow_overfit_loss_falls(i2t):
    torch.manual_seed(0)
    model = tiny_flow(300, i2t)
    ids, z = torch.randint(0, 300, (16, 6)), torch.randn(16, 6, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(120):
        loss, stats = model(ids, z, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or {k: v.item() for k, v in stats.items()}
    assert stats["fm"].item() < 0.6 * first["fm"]
    assert stats["rec"].item() < 0.3 * first["rec"]
    assert ("i2t" in stats) == (i2t != "inverse")
    if i2t != "inverse":
        assert stats["i2t"].item() < 0.6 * first["i2t"]
    assert stats["spread"].item() > 0.05  # different captions keep different latents
