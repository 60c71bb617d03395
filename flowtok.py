"""
nano FlowTok: text <-> image through one flow between two small token sequences.

FlowTok (arXiv 2503.10772) does not denoise an image out of Gaussian noise under a text condition.
It encodes the caption into K small continuous tokens (K x C), encodes the image into the same
shape with a compact 1-D tokenizer, and learns a single velocity field that carries the first
straight into the second. This file is the whole model, in the order of the paper:

    helpers -> blocks -> 1-D image tokenizer -> text side (BPE, encoder, decoder)
            -> flow transformer (+ the losses) -> Euler ODE sampler -> image -> text's check

The flow convention, stated once and used everywhere (tests check it in closed form):

    t = 0 : the text latent   x0   (B, K, C)
    t = 1 : the image latent  x1   (B, K, C)
    x_t = (1 - t) * x0 + t * x1          (straight path)
    v   = d x_t / dt = x1 - x0           (target velocity, regressed with MSE)

Image -> text uses the same path with the roles swapped (source = image latent at t = 0).
Two things here are ours, not the paper's: the text-aware tokenizer decoder is guided towards the
caption when it draws (ImageTokenizer.decode), and image -> text checks its reading by how well that
decoder redraws the picture from each candidate caption (caption_candidates).
"""

import functools
import math
import re
import os
import tempfile
import warnings
from dataclasses import dataclass
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------
# Helpers: positions, time embedding, the straight path

def sincos_1d(n, dim):
    """Fixed 1-D sin-cos positions, (n, dim), as in the Transformer paper."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)  # (n, dim)


def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos positions for a grid x grid patch layout, (grid*grid, dim).
    Half the channels encode the row, half the column. Without this 2-D structure the tokenizer
    sits for hundreds of steps at the mean image (prototype-notes.md, lesson 2)."""
    row = sincos_1d(grid, dim // 2)  # (grid, dim/2)
    return torch.cat([row.repeat_interleave(grid, 0), row.repeat(grid, 1)], dim=1)  # (grid*grid, dim)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of t in [0, 1], (B, dim). t is scaled by 1000 first, as in DiT, so the
    fastest frequencies resolve small differences in t (FlowTok's code feeds raw t)."""
    half = dim // 2
    freq = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freq[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def interpolate(x0, x1, t):
    """The straight path x_t = (1 - t) x0 + t x1, with t of shape (B,)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * x1


def target_velocity(x0, x1):
    """d x_t / dt along the straight path: constant in t."""
    return x1 - x0


def sample_t(n, device, generator=None):
    """Logit-normal t = sigmoid(N(0, 1)): puts most training on the middle of the path, where the
    velocity is hardest to predict (SD3, FlowTok)."""
    return torch.sigmoid(torch.randn(n, device=device, generator=generator))


def gaussian_sample(mean, logvar, generator=None):
    """Reparameterised sample mean + sigma * eps (gradients flow into mean and logvar)."""
    eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    return mean + torch.exp(0.5 * logvar) * eps


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with (B, D) modulations broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]

# -----------------------------------------------------------------------------
# Blocks: attention, MLP, pre-norm transformer block, DiT adaLN-Zero block

class Attention(nn.Module):
    # Class-wide switch (train.py --sdpa=manual): the formula written out instead of SDPA. Under
    # bf16 on a CPU, at our short sequences (16-80 tokens), it is the fastest: PyTorch's fused CPU
    # kernel has a slow bf16 backward, and its math kernel spends 15-25 % of a tokenizer step on
    # masking checks we do not need.
    manual = False

    def __init__(self, dim, n_head):
        super().__init__()
        assert dim % n_head == 0, f"width {dim} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.n_head)
        if self.manual:  # softmax(q k^T / sqrt(Dh)) v
            y = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v  # (B, H, N, Dh)
        else:  # SDPA picks the fastest kernel available (flash / memory-efficient on CUDA, fused on CPU)
            y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, dim, ratio=4):
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim)
        self.proj = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        # exact (erf) GELU: on CPU the tanh approximation is ~5x slower, on GPU either is cheap
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block, used by the tokenizer and the text encoder/decoder."""
    def __init__(self, dim, n_head):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, n_head)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: the conditioning c (time + flags) sets a shift, scale and gate
    for each sub-layer. The gates start at zero, so every block starts as the identity."""
    def __init__(self, dim, n_head):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, n_head)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.ln1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.ln2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a linear map back to the C latent channels (zero-initialised)."""
    def __init__(self, dim, out_dim):
        super().__init__()
        self.ln = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=1)
        return self.out(modulate(self.ln(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid -> MLP -> (B, D)."""
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


def init_weights(model):
    """All special initialisation of the project lives here.
    - Linear: xavier-uniform, zero bias (DiT); Embedding / learned tokens: N(0, 0.02) (GPT-2).
    - adaLN-Zero: the modulation Linear of every DiTBlock and FinalLayer, and the final output
      Linear, start at zero, so the flow transformer starts as 'predict velocity 0' and each block
      as the identity; the network grows into its residual branches."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith("_tokens") or name.endswith("_pos"):
            nn.init.normal_(p, std=0.02)
    for m in model.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.ada[-1].weight)
            nn.init.zeros_(m.ada[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.out.weight)
            nn.init.zeros_(m.out.bias)


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def transformer_flops(tokens, width, depth):
    """Forward matmul FLOPs of `depth` transformer blocks over `tokens` tokens, per sample:
    qkv 6TD^2 + out 2TD^2 + MLP 16TD^2, plus attention scores and mixing 4T^2D (2 per multiply-add)."""
    return depth * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)

# -----------------------------------------------------------------------------
# 1-D image tokenizer (TiTok-style, continuous KL variant)
#
# encoder: patches (N = (S/p)^2 tokens) ; K learned latent tokens  -> ViT -> keep the K latent
#          outputs -> mean, logvar (K x C) -> sample z
# decoder: one shared mask token per patch (+ 2-D positions) ; Linear(z) [; caption tokens] -> ViT
#          -> pixels
# The K latent tokens form a 1-D sequence with no grid of their own: each can describe any part of
# the image, which is what makes K as small as the text length possible.
# FlowTok's decoder is text-aware (TA-TiTok's): it also reads the caption, so the latent need not
# spell out what the words already say ("diamond": sharp corners), and at sampling time the prompt
# itself helps draw the flow's output. A share of training captions is hidden from it, so it still
# decodes with no caption, and can be guided towards the caption like a CFG model (decode's
# guidance). The latent then keeps less of the shapes, so image -> text checks the flow's reading
# with this decoder (caption_candidates, at the end of the file). text_aware=False: image-only.

@dataclass
class TokenizerConfig:
    image_size: int = 64        # pixels per side
    patch_size: int = 8         # pixels per patch side: (image_size / patch_size)^2 patch tokens
    num_tokens: int = 16        # K, the latent sequence length (shared with the text side)
    token_dim: int = 16         # C, channels per latent token (FlowTok's 16; 8 blurs small diamonds' corners)
    width: int = 128            # ViT width, encoder and decoder
    enc_depth: int = 3          # encoder blocks
    dec_depth: int = 4          # decoder blocks
    n_head: int = 4             # attention heads
    kl_weight: float = 1e-4     # small: keeps the latent bounded, not a prior to sample from
    edge_weight: float = 8.0    # extra reconstruction weight on pixels next to a colour edge; 0 = plain MSE
    text_aware: bool = True     # the decoder also reads the caption (FlowTok); False: image-only
    vocab_size: int = 0         # caption ids the decoder reads: set from the text tokenizer by train.py
    text_drop: float = 0.1      # share of training captions hidden from the decoder ("no caption")
    gan_weight: float = 0.0     # patch-GAN loss, as a multiple of the reconstruction loss's gradient
                                # at the last layer (adaptive weight); 0 = off, 0.1 is a reasonable start
    gan_start: int = 0          # tokenizer steps before the GAN loss reaches the tokenizer
    disc_width: int = 32        # discriminator channels: width, 2x, 4x over three stride-2 convs


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): three stride-2 4x4 convs, then one real/fake logit per (S/8)^2 region.
    It judges edges and texture locally, which is what an MSE-trained decoder blurs."""
    def __init__(self, width):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.Conv2d(c_in, 1, 3, 1, 1))

    def flops(self, size):
        """Forward FLOPs per image of side `size`."""
        total = 0
        for conv in self.net:
            if isinstance(conv, nn.Conv2d):
                size //= conv.stride[0]
                total += 2 * size * size * conv.weight.numel()
        return total

    def forward(self, img):
        return self.net(img * 2 - 1)  # (B, 1, S/8, S/8) logits


def max3x3(x):
    """Maximum over each pixel's 3x3 neighbourhood, as two separable passes of shifted maxima:
    6x faster on CPU than F.max_pool2d(x, 3, 1, 1), which it equals."""
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    x = torch.maximum(torch.maximum(x[..., :-2], x[..., 1:-1]), x[..., 2:])
    return torch.maximum(torch.maximum(x[..., :-2, :], x[..., 1:-1, :]), x[..., 2:, :])


def edge_mask(img, tol=0.02):
    """1 where a pixel's 3x3 neighbourhood holds more than one colour, else 0: (B, 1, S, S).
    On flat-colour pictures this is a 2-pixel band along every outline, corners included."""
    spread = max3x3(img) + max3x3(-img)  # per-channel max - min
    return (spread.amax(1, keepdim=True) > tol).float()


class ImageTokenizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        self.cfg = cfg
        W, K, C, p = cfg.width, cfg.num_tokens, cfg.token_dim, cfg.patch_size
        grid = cfg.image_size // p
        self.register_buffer("patch_pos", sincos_2d(grid, W), persistent=False)  # (N, W)
        # encoder
        self.patch_embed = nn.Linear(3 * p * p, W)
        self.latent_tokens = nn.Parameter(torch.zeros(K, W))
        self.encoder = nn.Sequential(*[Block(W, cfg.n_head) for _ in range(cfg.enc_depth)])
        self.enc_ln = nn.LayerNorm(W)
        self.to_moments = nn.Linear(W, 2 * C)
        # decoder
        self.mask_tokens = nn.Parameter(torch.zeros(1, W))
        self.latent_in = nn.Linear(C, W)
        self.latent_pos = nn.Parameter(torch.zeros(K, W))
        if cfg.text_aware:  # id vocab_size stands for "no caption"; captions are K ids, like the latent
            assert cfg.vocab_size > 0, "a text-aware tokenizer needs vocab_size (the text tokenizer's)"
            self.text_in = nn.Embedding(cfg.vocab_size + 1, W)
            self.text_pos = nn.Parameter(torch.zeros(K, W))
        self.decoder = nn.Sequential(*[Block(W, cfg.n_head) for _ in range(cfg.dec_depth)])
        self.dec_ln = nn.LayerNorm(W)
        self.to_pixels = nn.Linear(W, 3 * p * p)
        self.disc = PatchDiscriminator(cfg.disc_width) if cfg.gan_weight > 0 else None
        # Multiplies latents before the flow so they have ~unit std (set by fit_scale after training).
        self.register_buffer("scale_factor", torch.ones(()))
        init_weights(self)

    def flops(self, train=True):
        """FLOPs per image: forward only (encoding for the flow stage) or a training step (3x:
        backward costs twice the forward)."""
        c = self.cfg
        T = (c.image_size // c.patch_size) ** 2 + c.num_tokens
        enc = transformer_flops(T, c.width, c.enc_depth)
        if not train:
            return enc
        # with the GAN: three discriminator passes (real, detached fake, fake for the tokenizer), x3
        disc = 9 * self.disc.flops(c.image_size) if self.disc is not None else 0
        dec = transformer_flops(T + c.num_tokens * c.text_aware, c.width, c.dec_depth)
        return 3 * (enc + dec) + disc

    def patchify(self, img):
        return rearrange(img, "b c (h p) (w q) -> b (h w) (p q c)", p=self.cfg.patch_size, q=self.cfg.patch_size)

    def unpatchify(self, x):
        g = self.cfg.image_size // self.cfg.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=self.cfg.patch_size, c=3)

    def encode(self, img):
        """img (B, 3, S, S) in [0, 1] -> posterior mean, logvar, each (B, K, C)."""
        B, N, K = img.shape[0], self.patch_pos.shape[0], self.cfg.num_tokens
        x = self.patch_embed(self.patchify(img * 2 - 1)) + self.patch_pos  # (B, N, W)
        x = torch.cat([x, self.latent_tokens.expand(B, K, -1)], dim=1)  # (B, N + K, W)
        x = self.enc_ln(self.encoder(x)[:, N:])  # (B, K, W): keep only the latent outputs
        mean, logvar = self.to_moments(x).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z, ids=None, guidance=0.0):
        """z (B, K, C), caption ids (B, K) or None (no caption) -> image (B, 3, S, S), not clamped
        (clamp for display). An image-only tokenizer ignores ids. guidance s > 0 (with a caption):
        classifier-free guidance on the decoder, x_caption + s * (x_caption - x_none); the hidden
        training captions (text_drop) taught it the captionless picture, as CFG's dropped labels do."""
        B, N = z.shape[0], self.patch_pos.shape[0]
        masks = (self.mask_tokens + self.patch_pos).expand(B, N, -1)  # (B, N, W)
        x = [masks, self.latent_in(z) + self.latent_pos]
        if self.cfg.text_aware:
            if ids is None:
                ids = torch.full(z.shape[:2], self.cfg.vocab_size, dtype=torch.long, device=z.device)
            x.append(self.text_in(ids) + self.text_pos)
        x = torch.cat(x, dim=1)  # (B, N + K [+ K caption tokens], W)
        x = self.dec_ln(self.decoder(x)[:, :N])  # (B, N, W): the patch positions carry the pixels
        img = (self.unpatchify(self.to_pixels(x)) + 1) / 2
        if guidance and ids is not None and self.cfg.text_aware:
            img = img + guidance * (img - self.decode(z))
        return img

    def forward(self, img, ids=None, step=None):
        """Reconstruction + KL (+ GAN) loss on a batch of images and their caption ids (B, K);
        returns (loss, stats). step: the training step, for the GAN's start (None: already started)."""
        mean, logvar = self.encode(img)
        if ids is not None and self.cfg.text_aware:  # hide some captions: "no caption" is id vocab_size
            hide = torch.rand(ids.shape[0], 1, device=ids.device) < self.cfg.text_drop
            ids = ids.masked_fill(hide, self.cfg.vocab_size)
        recon = self.decode(gaussian_sample(mean, logvar), ids)
        # MSE, not L1: tried here, L1 sat at the blank white image (its median pixel) for 1400+ steps.
        # Weighted towards outlines: a blurred corner costs few pixels of MSE but turns a small
        # diamond into a circle, and most of the picture is flat colour that is learned early.
        err = (recon - img).pow(2)
        w = self.pixel_weights(img)  # (B, 1, S, S)
        rec = (w * err).mean() / w.mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        stats = {"mse": err.mean(), "kl": kl}
        loss = rec + self.cfg.kl_weight * kl
        if self.disc is not None:
            loss = loss + self.gan_losses(img, recon, rec, step, stats)
        return loss, stats

    def pixel_weights(self, img):
        return 1 + self.cfg.edge_weight * edge_mask(img)

    def gan_losses(self, img, recon, rec, step, stats):
        """Hinge GAN, VQGAN's recipe, in one backward pass with the reconstruction loss.
        The discriminator learns real vs (detached) reconstructions from step 0. From gan_start on,
        the tokenizer also gets -D(recon), through a copy of D whose weights are constants (so that
        term trains the tokenizer alone), scaled so that its gradient at the last layer is
        gan_weight times the reconstruction loss's: the two losses' scales drift apart in training, and a
        fixed weight ends up either doing nothing or drowning the reconstruction."""
        d_loss = F.relu(1 - self.disc(img)).mean() + F.relu(1 + self.disc(recon.detach())).mean()
        stats["disc"] = d_loss
        if step is not None and step < self.cfg.gan_start:
            return d_loss
        frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
        adv = -torch.func.functional_call(self.disc, frozen, (recon,)).mean()
        last = self.to_pixels.weight
        g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
        g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0].norm()
        stats["adv"] = adv
        return d_loss + self.cfg.gan_weight * (g_rec / (g_adv + 1e-6)).clamp(max=1e4).detach() * adv

    @torch.no_grad()
    def latents(self, img, sample=True):
        """Images -> flow-space latents (B, K, C): a posterior sample (FlowTok re-samples each step),
        times the scale factor."""
        mean, logvar = self.encode(img)
        return (gaussian_sample(mean, logvar) if sample else mean) * self.scale_factor

    @torch.no_grad()
    def images(self, z, ids=None, guidance=0.0):
        """Flow-space latents (and the caption ids they were drawn for) -> images in [0, 1]."""
        return self.decode(z / self.scale_factor, ids, guidance).clamp(0, 1)

    @torch.no_grad()
    def redraw_error(self, img, z, ids):
        """Per picture (B,): the edge-weighted squared error of the picture the decoder draws from
        flow-space latents z and caption ids against img. Image -> text ranks captions by it."""
        return (self.pixel_weights(img) * (self.images(z, ids) - img).pow(2)).flatten(1).sum(1)

    @torch.no_grad()
    def fit_scale(self, batches):
        """Set the scale factor so that latent means have unit std over the given image batches."""
        means = torch.cat([self.encode(img)[0].flatten() for img in batches])
        self.scale_factor.fill_(1.0 / means.std().clamp_min(1e-6).item())
        return self.scale_factor.item()

# -----------------------------------------------------------------------------
# Text side, part 1: a byte-level BPE on tiktoken, trained in seconds on the captions
#
# FlowTok reads captions with a frozen CLIP text tower. Nothing pretrained is available offline,
# so we train the whole text side from scratch, starting from tiktoken tokens.

# A split pattern that Python's `re` (used to train) and tiktoken (used to encode) read the same way.
SPLIT_PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
PAD = "<|pad|>"
# tiktoken stores each downloaded file under sha1(url) in its cache; GPT-2 needs these two.
GPT2_CACHE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")


def train_bpe(texts, vocab_size):
    """Byte-level BPE: start from the 256 bytes, repeatedly merge the most frequent adjacent pair.
    Each distinct pre-split word is processed once, weighted by its count, which makes this cheap
    (the shapes world has a few dozen distinct words). Stops early when no pair occurs twice."""
    words = Counter(w.encode("utf-8") for text in texts for w in re.findall(SPLIT_PATTERN, text))
    pieces = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(pieces[w], pieces[w][1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # deterministic tie-break
        if n < 2:
            break
        ranks[a + b] = len(ranks)
        for w, ps in pieces.items():
            i, merged = 0, []
            while i < len(ps):
                if i + 1 < len(ps) and ps[i] == a and ps[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(ps[i])
                    i += 1
            pieces[w] = merged
    return ranks


def tiktoken_cache_dir():
    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")


class TextTokenizer:
    """Captions <-> (B, K) token ids, padded (or truncated, with one warning) to K tokens.
    kind 'bpe': our own ranks, stored in the checkpoint. kind 'gpt2': tiktoken's GPT-2 BPE, only
    when its files are already in tiktoken's cache (we never start a download: it has no timeout)."""

    def __init__(self, length, kind="bpe", ranks=None):
        import tiktoken
        self.length, self.kind, self.ranks = length, kind, ranks
        if kind == "bpe":
            self.enc = tiktoken.Encoding(name="flowtok-bpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                         special_tokens={PAD: len(ranks)})
            self.pad_id = len(ranks)
        elif kind == "gpt2":
            cache = tiktoken_cache_dir()
            if not all(os.path.exists(os.path.join(cache, f)) for f in GPT2_CACHE_FILES):
                raise RuntimeError(f"GPT-2 BPE files are not in tiktoken's cache ({cache}). On a machine with "
                                   "internet run: python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\" "
                                   "(set TIKTOKEN_CACHE_DIR to copy the cache), or use --text_tokenizer=bpe")
            self.enc = tiktoken.get_encoding("gpt2")
            self.pad_id = self.enc.eot_token
        else:
            raise ValueError(f"unknown text tokenizer {kind!r}: use 'bpe' or 'gpt2'")
        self.vocab_size = self.enc.n_vocab
        self.warned = False
        self.encode_one = functools.lru_cache(maxsize=1 << 16)(self.encode_one)  # per instance

    @classmethod
    def train(cls, texts, length, vocab_size=512):
        return cls(length, "bpe", train_bpe(texts, vocab_size))

    def state_dict(self):
        # hex strings: plain python types load under torch.load(weights_only=True)
        ranks = [t.hex() for t, _ in sorted(self.ranks.items(), key=lambda kv: kv[1])] if self.ranks else None
        return {"kind": self.kind, "length": self.length, "ranks": ranks}

    @classmethod
    def from_state_dict(cls, d):
        ranks = {bytes.fromhex(h): i for i, h in enumerate(d["ranks"])} if d["ranks"] else None
        return cls(d["length"], d["kind"], ranks)

    def encode(self, texts):
        """list of str -> LongTensor (B, K) of ids, padded with pad_id."""
        return torch.tensor([self.encode_one(t) for t in texts])

    def encode_one(self, text):
        """str -> K ids. Memoised (see __init__): a flow step encodes 2 x 128 captions, drawn from the
        few thousand the shapes world has; 128 took 8 ms uncached (tiktoken's batch call) and 0.5 ms
        cached on a 2-core CPU, ~3 % of a flow step."""
        ids = self.enc.encode_ordinary(text)
        if not self.warned and len(ids) > self.length:
            warnings.warn(f"caption of {len(ids)} tokens truncated to {self.length} "
                          f"(raise --num_tokens to keep it): {text[:80]!r}")
            self.warned = True
        ids = ids[:self.length]
        return tuple(ids + [self.pad_id] * (self.length - len(ids)))

    def decode(self, ids):
        """(K,) ids -> str, up to the first pad."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        ids = ids[:ids.index(self.pad_id)] if self.pad_id in ids else ids
        return self.enc.decode([i for i in ids if i < self.pad_id or self.kind == "gpt2"], errors="replace")

# -----------------------------------------------------------------------------
# Text side, part 2: variational text encoder and non-autoregressive text decoder
#
# The encoder turns K token embeddings into a Gaussian over the K x C text latent (CrossFlow's
# "variational encoder"). Sampling it, rather than taking the mean, is what lets one caption
# flow to many different images. The decoder reads a text latent back into K token ids in
# parallel, which is what image -> text needs at its end.

class TextEncoder(nn.Module):
    def __init__(self, vocab_size, K, C, width, depth, n_head):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.embed_pos = nn.Parameter(torch.zeros(K, width))
        self.blocks = nn.Sequential(*[Block(width, n_head) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.to_moments = nn.Linear(width, 2 * C)

    def forward(self, ids):
        """ids (B, K) -> mean, logvar (B, K, C). No attention mask: the pads mark the length."""
        x = self.ln(self.blocks(self.embed(ids) + self.embed_pos))
        mean, logvar = self.to_moments(x).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)


class TextDecoder(nn.Module):
    def __init__(self, vocab_size, K, C, width, depth, n_head):
        super().__init__()
        self.latent_in = nn.Linear(C, width)
        self.latent_pos = nn.Parameter(torch.zeros(K, width))
        self.blocks = nn.Sequential(*[Block(width, n_head) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, z):
        """z (B, K, C) -> logits (B, K, vocab)."""
        return self.head(self.ln(self.blocks(self.latent_in(z) + self.latent_pos)))


def clip_loss(a, b, logit_scale):
    """Symmetric InfoNCE between two (B, D) batches: row i of a belongs with row i of b."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def text_kl(mean, logvar):
    """FlowTok's text-latent KL: -1/2 sum(1 + logvar - (0.3 mean)^6 - var), summed per sample,
    averaged over the batch. The (0.3 mu)^6 term leaves |mu| free up to ~3 while pulling the
    variance towards 1, so the source keeps real noise (diversity) and a readable mean."""
    kl = -0.5 * (1 + logvar - (0.3 * mean).pow(6) - logvar.exp())
    return kl.flatten(1).sum(1).mean()

# -----------------------------------------------------------------------------
# Flow transformer: a DiT with adaLN-Zero over the K latent tokens, and the FlowTok losses

@dataclass
class FlowConfig:
    vocab_size: int = 512       # set from the text tokenizer at build time
    num_tokens: int = 16        # K (set from the tokenizer)
    token_dim: int = 8          # C (set from the tokenizer)
    width: int = 256            # flow transformer width
    depth: int = 6              # flow transformer blocks
    n_head: int = 4             # flow transformer attention heads
    text_width: int = 128       # text encoder and decoder width
    text_depth: int = 3         # text encoder and decoder blocks (each)
    kl_weight: float = 0.01     # text-latent KL (FlowTok code: 0.01 with the (0.3 mu)^6 prior)
    align_weight: float = 1.0   # contrastive text <-> image alignment (FlowTok: 1.0)
    decoder_weight: float = 1.0 # text decoder reconstruction cross-entropy
    cfg_prob: float = 0.1       # fraction of samples flagged "unconditional" (CFG indicator)
    i2t: str = "dedicated"      # image -> text: 'dedicated' (a second transformer, as FlowTok),
                                # 'shared' (one model told the direction by an embedding: half the
                                # parameters), 'inverse' (no i2t training: run t2i backwards)
    i2t_weight: float = 1.0     # image -> text flow loss
    i2t_frac: float = 0.5       # fraction of each batch that also trains image -> text
    i2t_target: str = "mean"    # image -> text lands on the text latent's 'mean' or a 'sample' of it
    round_weight: float = 1.0   # decoder cross-entropy on the i2t flow's predicted end point
    i2t_t0: float = 0.8         # fraction of the i2t samples trained at t = 0, the step that reads the image


class FlowTransformer(nn.Module):
    """v_theta(x_t, t, flags): (B, K, C) -> (B, K, C). Conditioning c = emb(t) + emb(cfg flag)
    [+ emb(direction)], fed to every block through adaLN. No cross-attention: the text is not a
    condition here, it is where the path starts."""
    def __init__(self, K, C, width, depth, n_head, directions=1):
        super().__init__()
        self.x_in = nn.Linear(C, width)
        self.register_buffer("pos", sincos_1d(K, width), persistent=False)  # (K, D)
        self.t_embed = TimestepEmbedder(width)
        self.cfg_embed = nn.Embedding(2, width)         # 0: conditional, 1: "unconditional"
        self.dir_embed = nn.Embedding(directions, width)  # 0: text -> image, 1: image -> text
        self.blocks = nn.ModuleList([DiTBlock(width, n_head) for _ in range(depth)])
        self.final = FinalLayer(width, C)
        init_weights(self)

    def forward(self, x, t, null, direction):
        c = self.t_embed(t) + self.cfg_embed(null) + self.dir_embed(direction)  # (B, D)
        x = self.x_in(x) + self.pos  # (B, K, D)
        for block in self.blocks:
            x = block(x, c)
        return self.final(x, c)  # (B, K, C)


def cfg_roll(x1, prob, generator=None):
    """FlowTok's CFG indicator: flag ~prob of the samples; the flagged samples' targets are rolled
    by one among themselves, so under the flag the model learns to flow a caption to an unrelated
    image (the unconditional field). With fewer than two flagged there is nothing to roll."""
    null = torch.rand(x1.shape[0], device=x1.device, generator=generator) < prob
    idx = null.nonzero().squeeze(1)
    if idx.numel() < 2:
        return x1, torch.zeros_like(null, dtype=torch.long)
    x1 = x1.clone()
    x1[idx] = x1[idx.roll(1)]
    return x1, null.long()


class FlowTok(nn.Module):
    """Text encoder + text decoder + flow transformer(s), trained jointly on (caption, image latent)."""
    def __init__(self, cfg):
        super().__init__()
        assert cfg.i2t in ("shared", "dedicated", "inverse"), f"unknown i2t mode {cfg.i2t!r}"
        assert cfg.i2t_target in ("mean", "sample"), f"unknown i2t target {cfg.i2t_target!r}"
        self.cfg = cfg
        K, C = cfg.num_tokens, cfg.token_dim
        text = (cfg.vocab_size, K, C, cfg.text_width, cfg.text_depth, 4)
        self.text_encoder = TextEncoder(*text)
        self.text_decoder = TextDecoder(*text)
        self.flow = FlowTransformer(K, C, cfg.width, cfg.depth, cfg.n_head, 2 if cfg.i2t == "shared" else 1)
        if cfg.i2t == "dedicated":
            self.flow_i2t = FlowTransformer(K, C, cfg.width, cfg.depth, cfg.n_head)
        # Contrastive alignment: the image latent goes through a small MLP before it is compared
        # with the text latent, so the text latent need not copy the image latent's layout.
        self.image_proj = nn.Sequential(nn.Linear(K * C, cfg.text_width), nn.SiLU(), nn.Linear(cfg.text_width, K * C))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_weights(self)

    def flops(self):
        """Training FLOPs per sample: flow transformer (t2i, plus the i2t share of the batch),
        text encoder and decoder, each 3x their forward; on the i2t share also the text encoder's
        no-grad forward and the decoder's rounding step."""
        c = self.cfg
        flow = transformer_flops(c.num_tokens, c.width, c.depth)
        text = transformer_flops(c.num_tokens, c.text_width, c.text_depth)
        i2t = (c.i2t != "inverse") * c.i2t_frac
        return 3 * (flow * (1 + i2t) + 2 * text) + i2t * 4 * text

    def velocity(self, x, t, direction=0, null=0):
        """v_theta(x, t) for one direction (0: text -> image, 1: image -> text). t is a float or
        (B,); null is 0/1 or a (B,) tensor of CFG flags (1 asks for the unconditional field)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(B)
        null = torch.as_tensor(null, device=x.device, dtype=torch.long).expand(B)
        net = self.flow_i2t if (direction == 1 and self.cfg.i2t == "dedicated") else self.flow
        d = direction if self.cfg.i2t == "shared" else 0
        return net(x, t, null, torch.full((B,), d, device=x.device, dtype=torch.long))

    def forward(self, ids, z_img, ids_i2t=None):
        """One training step's losses. ids (B, K) caption tokens; z_img (B, K, C) image latents
        (scaled, from the frozen tokenizer); ids_i2t (B, K): the caption the image->text flow should
        land on (one phrasing per picture). Returns (loss, stats)."""
        cfg, B = self.cfg, ids.shape[0]
        mean, logvar = self.text_encoder(ids)
        z_txt = gaussian_sample(mean, logvar)  # the source x0; not detached: the flow trains it
        # text -> image flow matching, with CFG-indicator rolling of the targets
        x1, null = cfg_roll(z_img, cfg.cfg_prob)
        t = sample_t(B, ids.device)
        v = self.velocity(interpolate(z_txt, x1, t), t, direction=0, null=null)
        fm = F.mse_loss(v, target_velocity(z_txt, x1))
        kl = text_kl(mean, logvar)
        align = clip_loss(z_txt.flatten(1), self.image_proj(z_img.flatten(1)), self.logit_scale)
        rec = F.cross_entropy(self.text_decoder(z_txt).flatten(0, 1), ids.flatten())
        loss = fm + cfg.kl_weight * kl + cfg.align_weight * align + cfg.decoder_weight * rec
        stats = {"fm": fm, "kl": kl, "align": align, "rec": rec,
                 "spread": mean.std(0).mean()}  # how different captions' latents are; ~0 = collapse
        if cfg.i2t != "inverse":
            loss = loss + self.i2t_losses(z_img, ids if ids_i2t is None else ids_i2t, stats)
        return loss, stats

    def i2t_losses(self, z_img, ids, stats):
        """Image -> text on the first i2t_frac of the batch: source the image latent, target the
        text latent of the picture's one canonical phrasing `ids`, detached so that this loss cannot
        move the text latents to make itself easy. The default target is the latent's mean: one
        point per caption, so the path is a plain regression that straight Euler steps follow,
        where a noisy sample asks the flow to invent noise the image does not hold (README, Image -> text).
        Then the rounding loss (Diffusion-LM's L_round): read the end point the model predicts
        from x_t, x1_hat = x_t + (1 - t) v, with the text decoder and score it against the tokens,
        so the flow learns to land where the decoder can read and the decoder learns to read it."""
        cfg = self.cfg
        n = max(1, int(z_img.shape[0] * cfg.i2t_frac))
        x0, ids = z_img[:n], ids[:n]
        with torch.no_grad():
            mean, logvar = self.text_encoder(ids)
            x1 = mean if cfg.i2t_target == "mean" else gaussian_sample(mean, logvar)
        # A share i2t_t0 of them at t = 0. With one end point per caption, the first Euler step from the image
        # decides the caption, and later steps only read on from where it pointed; logit-normal t
        # would spend the training on mid-path points where x_t already holds half the answer.
        t = sample_t(n, ids.device) * (torch.rand(n, device=ids.device) >= cfg.i2t_t0)
        x_t = interpolate(x0, x1, t)
        v = self.velocity(x_t, t, direction=1)
        stats["i2t"] = F.mse_loss(v, target_velocity(x0, x1))
        x1_hat = x_t + (1 - t).view(-1, 1, 1) * v  # (n, K, C)
        stats["round"] = F.cross_entropy(self.text_decoder(x1_hat).flatten(0, 1), ids.flatten())
        return cfg.i2t_weight * stats["i2t"] + cfg.round_weight * stats["round"]

    # --- sampling -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, ids, steps=20, cfg_scale=2.0, from_mean=False, generator=None):
        """Caption ids (B, K) -> image latents (B, K, C) by Euler integration from t=0 to t=1."""
        mean, logvar = self.text_encoder(ids)
        x0 = mean if from_mean else gaussian_sample(mean, logvar, generator)
        return euler(lambda x, t: guided(self, x, t, cfg_scale), x0, steps)

    @torch.no_grad()
    def caption_logits(self, z_img, steps=20, inverse=None):
        """Image latents (B, K, C) -> the text decoder's logits (B, K, vocab) at the end of the
        image -> text path. inverse (the default for i2t='inverse', a switch for any model)
        integrates the text->image field backwards from t=1 to t=0 instead, with no image->text
        training at all."""
        if self.cfg.i2t == "inverse" if inverse is None else inverse:
            z_txt = euler(lambda x, t: self.velocity(x, t, direction=0), z_img, steps, 1.0, 0.0)
        else:
            z_txt = euler(lambda x, t: self.velocity(x, t, direction=1), z_img, steps)
        return self.text_decoder(z_txt)

# -----------------------------------------------------------------------------
# Euler ODE sampler with classifier-free guidance

def guided(model, x, t, scale):
    """CFG through the indicator: v = v_null + s * (v_cond - v_null), both from one batched pass
    (null flag 0 for the first half, 1 for the second)."""
    null = torch.arange(2, device=x.device).repeat_interleave(x.shape[0])  # (2B,): B zeros, B ones
    v_cond, v_null = model.velocity(torch.cat([x, x]), t, direction=0, null=null).chunk(2)
    return v_null + scale * (v_cond - v_null)


def euler(velocity, x, steps, t_start=0.0, t_end=1.0):
    """Integrate dx/dt = velocity(x, t) from t_start to t_end in `steps` equal Euler steps.
    With t_end < t_start it runs backwards (dt < 0)."""
    ts = torch.linspace(t_start, t_end, steps + 1).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * velocity(x, t0)
    return x


# image -> text: the text decoder's reading, checked by the text-aware image decoder

def pick_tokens(logits, generator=None):
    """Logits (B, K, vocab) -> ids (B, K): the most likely, or drawn with the generator."""
    if generator is None:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator).view(logits.shape[:2])


@torch.no_grad()
def caption_candidates(tok, model, img, n, steps=1, inverse=None, generator=None):
    """Image -> text with a check FlowTok does not have: images (B, 3, S, S) -> n candidate
    captions per image (B, n, K), best first. Candidate 0 is the text decoder's most likely tokens;
    the others are drawn from its distribution (by default the same draws for every call). A
    text-aware tokenizer then ranks them by how well its decoder redraws the picture from the latent
    and the caption: it was trained to take from the words what the latent leaves out (mostly the
    shapes), so a wrong word draws a wrong picture. An image-only tokenizer cannot tell them apart:
    they keep that order."""
    z = tok.latents(img, sample=False)
    logits = model.caption_logits(z, steps, inverse)  # (B, K, vocab)
    generator = generator or torch.Generator(img.device).manual_seed(0)
    cands = torch.stack([logits.argmax(-1)] + [pick_tokens(logits, generator) for _ in range(n - 1)], 1)
    if tok.cfg.text_aware and n > 1:
        err = torch.stack([tok.redraw_error(img, z, cands[:, i]) for i in range(n)], 1)  # (B, n)
        cands = cands.gather(1, err.argsort(dim=1, stable=True)[..., None].expand_as(cands))
    return cands  # (B, n, K)
