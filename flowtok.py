"""nano FlowTok: text <-> image through one flow between two small token sequences.

FlowTok (arXiv 2503.10772) does not denoise an image out of noise under a text condition: it encodes the
caption into K x C continuous tokens, the image into the same shape with a compact 1-D tokenizer, and learns
one velocity field that carries the first straight into the second. This file is the whole model, in the
paper's order: helpers -> blocks -> 1-D image tokenizer -> text side -> flow transformer and losses -> Euler
sampler -> using a trained model. The flow convention, used everywhere (image -> text swaps the roles):

    t = 0 : the text latent   x0   (B, K, C)
    t = 1 : the image latent  x1   (B, K, C)
    x_t = (1 - t) * x0 + t * x1          (straight path)
    v   = d x_t / dt = x1 - x0           (target velocity, regressed with MSE)

Ours, not the paper's: the text-aware tokenizer decoder is guided towards the caption, a drawn picture is
re-encoded and redrawn, and each direction checks itself with the other (text_to_image, caption_candidates).
Naming: `tokenizer` is the image tokenizer, `bpe` the text one; `cfg` a config; CFG is spelled `guidance`.
"""

import argparse, dataclasses, functools, inspect, math, os, re, tempfile, time, warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

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
    """(grid*grid, dim) sin-cos positions, half for the row, half the column (learned 1-D ones stall training)."""
    row = sincos_1d(grid, dim // 2)  # (grid, dim/2)
    return torch.cat([row.repeat_interleave(grid, 0), row.repeat(grid, 1)], dim=1)  # (grid*grid, dim)

def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of t (B,) in [0, 1] -> (B, dim) float32: [cos(1000 t f), sin(1000 t f)] with
    f_i = max_period^(-i / half), i < half = dim / 2. t is scaled by 1000 first, as in DiT, so the fastest
    frequencies resolve small differences in t (FlowTok's code feeds raw t)."""
    half = dim // 2
    freq = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freq[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

def interpolate(x0, x1, t):
    """The straight path x_t = (1 - t) x0 + t x1: x0, x1 (B, ...) and t (B,), one t per sample -> (B, ...)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * x1

def target_velocity(x0, x1):
    """d x_t / dt along the straight path, v = x1 - x0 (same shape): constant in t."""
    return x1 - x0

def sample_t(n, device, generator=None):
    """Logit-normal t = sigmoid(N(0, 1)), (n,), drawn with `generator`: puts most training on the middle
    of the path, where the velocity is hardest to predict (SD3, FlowTok)."""
    return torch.sigmoid(torch.randn(n, device=device, generator=generator))

def gaussian_sample(mean, logvar, generator=None):
    """Reparameterised sample mean + sigma * eps, sigma = exp(logvar / 2), eps ~ N(0, 1) drawn with
    `generator`; shapes and dtype of mean (gradients flow into mean and logvar)."""
    eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    return mean + torch.exp(0.5 * logvar) * eps

def modulate(x, shift, scale):
    """adaLN: x (B, N, D) * (1 + scale) + shift, with (B, D) modulations broadcast over the N tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]

# -----------------------------------------------------------------------------
# Blocks: attention, MLP, pre-norm transformer block, DiT adaLN-Zero block

class Attention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head, self.manual = n_head, False  # manual: the formula written out, not SDPA (use_manual_attention)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        """x (B, N, D) -> (B, N, D): qkv(x) holds q | k | v, each n_head heads of Dh = D / n_head channels;
        per head softmax(q k^T / sqrt(Dh)) v (SDPA, or written out when self.manual), heads joined, proj."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.n_head)
        if self.manual:  # softmax(q k^T / sqrt(Dh)) v
            y = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v  # (B, H, N, Dh)
        else:  # SDPA picks the fastest kernel available (flash / memory-efficient on CUDA, fused on CPU)
            y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))

def use_manual_attention(model, on):
    """Every attention layer of `model` to SDPA or the formula written out (faster under bf16 on a CPU)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.manual = on

class MLP(nn.Module):
    def __init__(self, dim, ratio=4):
        super().__init__()
        self.fc, self.proj = nn.Linear(dim, ratio * dim), nn.Linear(ratio * dim, dim)

    def forward(self, x):
        # exact (erf) GELU: on CPU the tanh approximation is the slower one, on GPU either is cheap
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
    """DiT block, adaLN-Zero: c (time + flag) sets a shift, scale and gate per sub-layer; zero gates: identity."""
    def __init__(self, dim, n_head):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), Attention(dim, n_head)
        self.ln2, self.mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), MLP(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        """x (B, N, D), c (B, D): ada(c) = shift1 | scale1 | gate1 | shift2 | scale2 | gate2, then
        x + gate1 attn(modulate(ln1(x), shift1, scale1)) and on that x + gate2 mlp(modulate(ln2(x), shift2, scale2))."""
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
        self.freq_dim, self.mlp = freq_dim, nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))

def init_weights(model):
    """All special init: Linear xavier-uniform, zero bias (DiT); Embedding and learned tokens N(0, 0.02) (GPT-2);
    adaLN-Zero: adaLN modulations and the final output at zero (velocity 0, each block the identity); the
    tokenizer's seam convolution at zero (it starts as a correction of nothing)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith(("_tokens", "_pos")):
            nn.init.normal_(p, std=0.02)
    for m in model.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            for layer in (m.ada[-1], m.out) if isinstance(m, FinalLayer) else (m.ada[-1],):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

def param_count(module):
    return sum(p.numel() for p in module.parameters())

def transformer_flops(tokens, width, depth):
    """Forward matmul FLOPs per sample of `depth` blocks over T tokens: qkv, out, MLP 24TD^2; attention 4T^2D."""
    return depth * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)

# -----------------------------------------------------------------------------
# 1-D image tokenizer (TiTok-style, continuous KL variant)
#
# encoder: patches (N = (S/p)^2) ; K learned latent tokens -> ViT -> K latent outputs -> mean, logvar (K x C)
# decoder: a shared mask token per patch (+ 2-D positions) ; Linear(z) [; caption tokens] -> ViT -> pixels
# The K latent tokens have no grid: each can describe any part of the image, so K can be as small as the text.
# The decoder is text-aware (TA-TiTok's, as FlowTok's): it also reads the caption, so the latent need not
# spell out what the words say ("diamond": sharp corners). Captions hidden in training (text_drop) let it
# decode without one, and be guided towards the caption like a CFG model (decode).

@dataclass
class TokenizerConfig:
    image_size: int = 64        # pixels per side
    patch_size: int = 8         # pixels per patch side: (image_size / patch_size)^2 patch tokens
    num_tokens: int = 16        # K, the latent sequence length (shared with the text side)
    token_dim: int = 16         # C, channels per latent token (FlowTok's 16; 8 blurs small diamonds' corners)
    width: int = 128            # ViT width, encoder and decoder
    pixel_channels: int = 16    # decoder: features per pixel a 3x3 convolution reads across patch borders
    enc_depth: int = 3          # encoder blocks
    dec_depth: int = 4          # decoder blocks
    n_head: int = 4             # attention heads
    kl_weight: float = 1e-4     # small: keeps the latent bounded, not a prior to sample from
    edge_weight: float = 8.0    # extra reconstruction weight on pixels next to a colour edge; 0 = plain MSE
    text_aware: bool = True     # the decoder also reads the caption (FlowTok); False: image-only
    text_drop: float = 0.1      # share of training captions hidden from the decoder ("no caption")

    def __post_init__(self):
        check_ranges(self, positive=("image_size", "patch_size", "num_tokens", "token_dim", "width", "pixel_channels",
                                     "enc_depth", "dec_depth", "n_head"), shares=("text_drop",))
        check_multiple(self, "image_size", self.patch_size, "patch_size")
        check_multiple(self, "width", self.n_head, "n_head")
        check_multiple(self, "width", 4, "4")  # sincos_2d: a sin and a cos for the row and for the column

def max3x3(x):
    """F.max_pool2d(x, 3, 1, 1) as two separable passes of shifted maxima: much faster on CPU."""
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    x = torch.maximum(torch.maximum(x[..., :-2], x[..., 1:-1]), x[..., 2:])
    return torch.maximum(torch.maximum(x[..., :-2, :], x[..., 1:-1, :]), x[..., 2:, :])

def edge_mask(img, tol=0.02):
    """(B, 1, S, S): 1 where a pixel's 3x3 neighbourhood holds more than one colour (a band along outlines)."""
    spread = max3x3(img) + max3x3(-img)  # per-channel max - min
    return (spread.amax(1, keepdim=True) > tol).float()

class ImageTokenizer(nn.Module):
    def __init__(self, cfg, vocab_size=0):  # vocab_size: the text tokenizer's, for a text-aware decoder
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        W, K, C, p = cfg.width, cfg.num_tokens, cfg.token_dim, cfg.patch_size
        self.register_buffer("patch_pos", sincos_2d(cfg.image_size // p, W), persistent=False)  # (N, W)
        self.patch_embed, self.latent_tokens = nn.Linear(3 * p * p, W), nn.Parameter(torch.zeros(K, W))  # encoder
        self.encoder = nn.Sequential(*[Block(W, cfg.n_head) for _ in range(cfg.enc_depth)])
        self.enc_ln, self.to_moments = nn.LayerNorm(W), nn.Linear(W, 2 * C)
        self.mask_tokens = nn.Parameter(torch.zeros(1, W))  # decoder
        self.latent_in, self.latent_pos = nn.Linear(C, W), nn.Parameter(torch.zeros(K, W))
        if cfg.text_aware:  # id vocab_size stands for "no caption"; captions are K ids, like the latent
            assert vocab_size > 0, "a text-aware tokenizer needs vocab_size (the text tokenizer's)"
            self.text_in, self.text_pos = nn.Embedding(vocab_size + 1, W), nn.Parameter(torch.zeros(K, W))
        self.decoder = nn.Sequential(*[Block(W, cfg.n_head) for _ in range(cfg.dec_depth)])
        # A patch token paints only its own p x p pixels, so neighbours disagree along patch borders (a visible
        # grid). Each token also paints features per pixel, and a 3x3 convolution over the whole canvas turns
        # them into a correction that reads both sides of every seam.
        self.dec_ln, self.to_pixels = nn.LayerNorm(W), nn.Linear(W, (3 + cfg.pixel_channels) * p * p)
        self.seam_conv = nn.Conv2d(cfg.pixel_channels, 3, 3, padding=1)
        # Multiplies latents before the flow so they have ~unit std (set by fit_scale after training).
        self.register_buffer("scale_factor", torch.ones(()))
        init_weights(self)

    def flops(self, train=True):
        """FLOPs per image: a training step (3x the forward: backward costs twice it), or encoding only."""
        c = self.cfg
        T = (c.image_size // c.patch_size) ** 2 + c.num_tokens
        enc = transformer_flops(T, c.width, c.enc_depth)
        dec = transformer_flops(T + c.num_tokens * c.text_aware, c.width, c.dec_depth)
        return 3 * (enc + dec) if train else enc

    def patchify(self, img):
        """img (B, 3, S, S) -> (B, N, p * p * 3): p x p patches in row-major order, each flattened (row, column,
        channel) within the patch; unpatchify is its inverse."""
        return rearrange(img, "b c (h p) (w q) -> b (h w) (p q c)", p=self.cfg.patch_size, q=self.cfg.patch_size)

    def unpatchify(self, x):
        """(B, N, p * p * c) -> (B, c, S, S), for any number of channels c: the inverse of patchify."""
        g, p = self.cfg.image_size // self.cfg.patch_size, self.cfg.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=p, q=p)

    def paint(self, x):
        """Decoder outputs at the patch positions (B, N, W) -> image (B, 3, S, S) in about [-1, 1]: each patch's
        own pixels plus the seam convolution of the per-pixel features."""
        x = self.unpatchify(self.to_pixels(x))  # (B, 3 + pixel_channels, S, S)
        return x[:, :3] + self.seam_conv(x[:, 3:])

    def encode(self, img):
        """img (B, 3, S, S) in [0, 1] -> posterior mean, logvar, each (B, K, C)."""
        B, N, K = img.shape[0], self.patch_pos.shape[0], self.cfg.num_tokens
        x = self.patch_embed(self.patchify(img * 2 - 1)) + self.patch_pos  # (B, N, W)
        x = torch.cat([x, self.latent_tokens.expand(B, K, -1)], dim=1)  # (B, N + K, W)
        x = self.enc_ln(self.encoder(x)[:, N:])  # (B, K, W): keep only the latent outputs
        mean, logvar = self.to_moments(x).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z, ids=None, guidance=0.0):
        """z (B, K, C), caption ids (B, K) or None (no caption; an image-only tokenizer ignores ids) -> image
        (B, 3, S, S), not clamped. guidance s > 0: CFG on the decoder, x_caption + s * (x_caption - x_none);
        the hidden training captions (text_drop) taught it the captionless picture, as CFG's dropped labels do."""
        B, N = z.shape[0], self.patch_pos.shape[0]
        masks = (self.mask_tokens + self.patch_pos).expand(B, N, -1)  # (B, N, W)
        x = [masks, self.latent_in(z) + self.latent_pos]
        if self.cfg.text_aware:
            if ids is None:
                ids = torch.full(z.shape[:2], self.vocab_size, dtype=torch.long, device=z.device)
            x.append(self.text_in(ids) + self.text_pos)
        x = torch.cat(x, dim=1)  # (B, N + K [+ K caption tokens], W)
        x = self.dec_ln(self.decoder(x)[:, :N])  # (B, N, W): the patch positions carry the pixels
        img = (self.paint(x) + 1) / 2  # (B, 3, S, S)
        if guidance and ids is not None and self.cfg.text_aware:
            img = img + guidance * (img - self.decode(z))
        return img

    def forward(self, img, ids=None):
        """Reconstruction + KL loss on images and their caption ids (B, K) -> (loss, stats)."""
        mean, logvar = self.encode(img)
        if ids is not None and self.cfg.text_aware:  # hide some captions: "no caption" is id vocab_size
            hide = torch.rand(ids.shape[0], 1, device=ids.device) < self.cfg.text_drop
            ids = ids.masked_fill(hide, self.vocab_size)
        recon = self.decode(gaussian_sample(mean, logvar), ids)
        # MSE, not L1 (tried: it sat at the blank white image, its median pixel, for 1400+ steps), weighted
        # towards outlines: a blurred corner costs little MSE but turns a small diamond into a circle.
        err, w = (recon - img).pow(2), self.pixel_weights(img)  # w (B, 1, S, S)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return (w * err).mean() / w.mean() + self.cfg.kl_weight * kl, {"mse": err.mean(), "kl": kl}

    def pixel_weights(self, img):
        return 1 + self.cfg.edge_weight * edge_mask(img)

    @torch.no_grad()
    def latents(self, img, sample=True):
        """Images -> flow-space latents (B, K, C): a posterior sample (or the mean), times the scale factor."""
        mean, logvar = self.encode(img)
        return (gaussian_sample(mean, logvar) if sample else mean) * self.scale_factor

    @torch.no_grad()
    def images(self, z, ids=None, guidance=0.0):
        """Flow-space latents (and the caption ids they were drawn for) -> images in [0, 1]."""
        return self.decode(z / self.scale_factor, ids, guidance).clamp(0, 1)

    @torch.no_grad()
    def redraw_error(self, img, z, ids):
        """(B,): edge-weighted squared error of the decoder's redraw of img from latents z and caption ids."""
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
# FlowTok reads captions with a frozen CLIP text tower; offline, with nothing pretrained, we train ours from scratch.

# A split pattern that Python's `re` (used to train) and tiktoken (used to encode) read the same way.
SPLIT_PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
PAD = "<|pad|>"
# tiktoken stores each downloaded file under sha1(url) in its cache; GPT-2 needs these two.
GPT2_CACHE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")

def train_bpe(texts, vocab_size):
    """Byte-level BPE: from the 256 bytes, merge the most frequent adjacent pair (each distinct word once)."""
    words = Counter(w.encode("utf-8") for text in texts for w in re.findall(SPLIT_PATTERN, text))
    pieces = {w: [bytes([b]) for b in w] for w in words}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(pieces[w], pieces[w][1:]):
                pairs[a, b] += n
        (a, b), n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]), default=((b"", b""), 0))  # ties: by pair
        if n < 2:  # no pair left, or none repeats
            break
        ranks[a + b] = len(ranks)
        for w, ps in pieces.items():  # left to right, as tiktoken merges
            merged = []
            for p in ps:
                if merged and merged[-1] == a and p == b:
                    merged[-1] = a + b
                else:
                    merged.append(p)
            pieces[w] = merged
    return ranks

class TextTokenizer:
    """Captions <-> (B, K) ids, padded (or truncated, with one warning). kind 'bpe': our ranks, kept in the
    checkpoint; 'gpt2': tiktoken's, only if already in its cache (a download there has no timeout)."""
    def __init__(self, length, kind="bpe", ranks=None):
        import tiktoken
        self.length, self.kind, self.ranks = length, kind, ranks
        if kind == "bpe":
            self.enc = tiktoken.Encoding(name="flowtok-bpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                         special_tokens={PAD: len(ranks)})
            self.pad_id = len(ranks)
        elif kind == "gpt2":
            cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
                os.path.join(tempfile.gettempdir(), "data-gym-cache")
            if not all(os.path.exists(os.path.join(cache, f)) for f in GPT2_CACHE_FILES):
                raise RuntimeError(f"GPT-2 BPE files are not in tiktoken's cache ({cache}). On a machine with "
                                   "internet run: python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\" "
                                   "(set TIKTOKEN_CACHE_DIR to copy the cache), or use --text_tokenizer=bpe")
            self.enc = tiktoken.get_encoding("gpt2")
            self.pad_id = self.enc.eot_token
        else:
            raise ValueError(f"unknown text tokenizer {kind!r}: use 'bpe' or 'gpt2'")
        self.vocab_size, self.warned = self.enc.n_vocab, False
        self.encode_one = functools.lru_cache(maxsize=1 << 16)(self.encode_one)  # per instance

    @classmethod
    def train(cls, texts, length, vocab_size=512):
        return cls(length, "bpe", train_bpe(texts, vocab_size))

    def state_dict(self):  # ranks as hex strings: plain python types load under weights_only=True
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
        """str -> K ids; memoised (see __init__): captions repeat, and a cache hit is far cheaper than tiktoken."""
        ids = self.enc.encode_ordinary(text)
        if not self.warned and len(ids) > self.length:
            warnings.warn(f"caption of {len(ids)} tokens truncated to {self.length} "
                          f"(raise --tokenizer.num_tokens to keep it): {text[:80]!r}")
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
# The encoder turns K token embeddings into a Gaussian over the K x C text latent (CrossFlow's "variational
# encoder"): sampling it, not taking the mean, lets one caption flow to many different images. The decoder
# reads a text latent back into K token ids in parallel, as image -> text needs at its end.

class TextTransformer(nn.Module):
    """Pre-norm blocks over the K text positions between an input map and an output map: the text decoder
    (latent (B, K, C) -> logits (B, K, vocab)) as it is, the encoder below. No attention mask: pads mark the end."""
    def __init__(self, inp, out, K, width, depth, n_head):
        super().__init__()
        self.inp, self.inp_pos = inp, nn.Parameter(torch.zeros(K, width))
        self.blocks = nn.Sequential(*[Block(width, n_head) for _ in range(depth)])
        self.ln, self.out = nn.LayerNorm(width), out

    def forward(self, x):
        return self.out(self.ln(self.blocks(self.inp(x) + self.inp_pos)))

class TextEncoder(TextTransformer):
    def forward(self, ids):
        """ids (B, K) -> mean, logvar (B, K, C) of the text latent."""
        mean, logvar = super().forward(ids).chunk(2, dim=-1)
        return mean, logvar.clamp(-30.0, 20.0)

def clip_loss(a, b, logit_scale, same=None):
    """Symmetric InfoNCE between two (B, D) batches, row i of a belongs with row i of b: logits = cosine
    similarities times exp(logit_scale) capped at 100, (B, B); the mean of the cross-entropies of rows
    (a -> b) and of columns (b -> a). Returns a scalar. same (B, B) bool, optional: pairs that share a
    caption; off the diagonal they are no negatives (logit -inf): a shapes-world batch repeats captions,
    and pushing a caption away from its own pictures teaches nothing."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()  # (B, B)
    if same is not None:
        logits = logits.masked_fill(same & ~torch.eye(len(a), dtype=torch.bool, device=a.device), -torch.inf)
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

def text_kl(mean, logvar):
    """FlowTok's text-latent KL: -1/2 sum(1 + logvar - (0.3 mean)^6 - var), summed per sample, averaged
    over the batch: mean, logvar (B, K, C) -> a scalar. The (0.3 mu)^6 term leaves |mu| free up to ~3 while
    pulling the variance towards 1, so the source keeps real noise (diversity) and a readable mean.
    FlowTok's code sums over the batch too (a weight ~B times larger); the mean keeps kl_weight batch-free."""
    kl = -0.5 * (1 + logvar - (0.3 * mean).pow(6) - logvar.exp())
    return kl.flatten(1).sum(1).mean()

# -----------------------------------------------------------------------------
# Flow transformer: a DiT with adaLN-Zero over the K latent tokens, and the FlowTok losses

@dataclass
class FlowConfig:
    width: int = 256            # flow transformer width
    depth: int = 6              # flow transformer blocks
    n_head: int = 4             # flow transformer attention heads
    text_width: int = 128       # text encoder and decoder width
    text_depth: int = 3         # text encoder and decoder blocks (each)
    kl_weight: float = 0.01     # text-latent KL (FlowTok code: 0.01 with the (0.3 mu)^6 prior)
    align_weight: float = 1.0   # contrastive text <-> image alignment (FlowTok: 1.0)
    decoder_weight: float = 1.0 # text decoder reconstruction cross-entropy
    null_prob: float = 0.1      # share of samples flagged "unconditional" (for classifier-free guidance)
    i2t_weight: float = 1.0     # image -> text flow loss
    i2t_frac: float = 0.5       # share of each batch that also trains image -> text
    round_weight: float = 1.0   # decoder cross-entropy on the i2t flow's predicted end point
    i2t_t0: float = 0.8         # share of the i2t samples trained at t = 0, the step that reads the image

    def __post_init__(self):
        check_ranges(self, positive=("width", "depth", "n_head", "text_width", "text_depth"),
                     shares=("null_prob", "i2t_frac", "i2t_t0"))
        check_multiple(self, "width", self.n_head, "n_head")
        check_multiple(self, "width", 2, "2")  # sincos_1d: a sin and a cos per frequency
        check_multiple(self, "text_width", TEXT_HEADS, "the text side's heads")

TEXT_HEADS = 4  # attention heads of the text encoder and decoder

class FlowTransformer(nn.Module):
    """v_theta(x_t, t, null): (B, K, C) -> (B, K, C), conditioned through adaLN on c = emb(t) + emb(null flag).
    No cross-attention: the text is not a condition here, it is where the path starts."""
    def __init__(self, K, C, width, depth, n_head):
        super().__init__()
        self.x_in = nn.Linear(C, width)
        self.register_buffer("pos", sincos_1d(K, width), persistent=False)  # (K, D)
        self.t_embed, self.null_embed = TimestepEmbedder(width), nn.Embedding(2, width)  # null 1: "unconditional"
        self.blocks = nn.ModuleList([DiTBlock(width, n_head) for _ in range(depth)])
        self.final = FinalLayer(width, C)
        init_weights(self)

    def forward(self, x, t, null):
        c = self.t_embed(t) + self.null_embed(null)  # (B, D)
        x = self.x_in(x) + self.pos  # (B, K, D)
        for block in self.blocks:
            x = block(x, c)
        return self.final(x, c)  # (B, K, C)

def null_roll(x1, prob, generator=None):
    """FlowTok's guidance indicator, x1 (B, K, C) -> (targets, flags (B,) long): flag ~prob of the samples
    (uniform draw < prob, with `generator`); the flagged samples' targets are rolled by one among themselves,
    so under the flag the model learns to flow a caption to an unrelated image (the unconditional field).
    With fewer than two flagged there is nothing to roll. Fixed shapes (no nonzero(), no branch on a count):
    torch.compile traces the flow step as one graph."""
    null = torch.rand(x1.shape[0], device=x1.device, generator=generator) < prob
    n = null.sum()
    null = null & (n >= 2)
    rank = null.cumsum(0) - 1  # (B,): each flagged sample's place among the flagged
    flagged = torch.argsort((~null).long(), stable=True)  # (B,): the flagged positions first, in order
    src = torch.where(null, flagged[(rank - 1) % n.clamp_min(1)], torch.arange(len(null), device=x1.device))
    return x1[src], null.long()

class FlowTok(nn.Module):
    """Text encoder + decoder + two flow transformers (text -> image and image -> text, as FlowTok), trained
    jointly on (caption, image latent). vocab_size: the text tokenizer's; K, C: the image tokenizer's."""
    def __init__(self, cfg, vocab_size, num_tokens, token_dim):
        super().__init__()
        self.cfg, K, C = cfg, num_tokens, token_dim
        W, text = cfg.text_width, (K, cfg.text_width, cfg.text_depth, TEXT_HEADS)
        self.text_encoder = TextEncoder(nn.Embedding(vocab_size, W), nn.Linear(W, 2 * C), *text)
        self.text_decoder = TextTransformer(nn.Linear(C, W), nn.Linear(W, vocab_size), *text)
        self.flow, self.flow_i2t = [FlowTransformer(K, C, cfg.width, cfg.depth, cfg.n_head) for _ in range(2)]
        # Contrastive alignment through a small MLP on the image side: the text latent need not copy its layout.
        self.image_proj = nn.Sequential(nn.Linear(K * C, cfg.text_width), nn.SiLU(), nn.Linear(cfg.text_width, K * C))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_weights(self)

    def flops(self):
        """Training FLOPs per sample: 3x the forward of the flow (t2i and the i2t share) and the text encoder
        and decoder, plus on the i2t share the text encoder's no-grad forward and the rounding decode."""
        c, K = self.cfg, self.text_decoder.inp_pos.shape[0]
        flow = transformer_flops(K, c.width, c.depth)
        text = transformer_flops(K, c.text_width, c.text_depth)
        return 3 * (flow * (1 + c.i2t_frac) + 2 * text) + c.i2t_frac * 4 * text

    def velocity(self, x, t, direction=0, null=0):
        """v_theta(x, t) for one direction (0: text -> image, 1: image -> text). t: a float or (B,); null: 0/1
        or (B,) flags (1 asks for the unconditional field)."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
        null = torch.as_tensor(null, device=x.device, dtype=torch.long).expand(x.shape[0])
        return (self.flow_i2t if direction == 1 else self.flow)(x, t, null)

    def forward(self, ids, z_img, ids_i2t=None):
        """One training step's (loss, stats). ids (B, K) caption tokens; z_img (B, K, C) scaled image latents;
        ids_i2t (B, K): the caption the image -> text flow should land on (one phrasing per picture)."""
        cfg, B = self.cfg, ids.shape[0]
        mean, logvar = self.text_encoder(ids)
        z_txt = gaussian_sample(mean, logvar)  # the source x0; not detached: the flow trains it
        # text -> image flow matching, with the guidance indicator rolling some targets
        x1, null = null_roll(z_img, cfg.null_prob)
        t = sample_t(B, ids.device)
        v = self.velocity(interpolate(z_txt, x1, t), t, direction=0, null=null)
        fm = F.mse_loss(v, target_velocity(z_txt, x1))
        kl = text_kl(mean, logvar)
        same = (ids[:, None] == ids[None]).all(-1)  # (B, B)
        align = clip_loss(z_txt.flatten(1), self.image_proj(z_img.flatten(1)), self.logit_scale, same)
        rec = F.cross_entropy(self.text_decoder(z_txt).flatten(0, 1), ids.flatten())
        loss = fm + cfg.kl_weight * kl + cfg.align_weight * align + cfg.decoder_weight * rec
        # spread: how different captions' latents are; ~0 = collapse
        stats = {"fm": fm, "kl": kl, "align": align, "rec": rec, "spread": mean.std(0).mean()}
        return loss + self.i2t_losses(z_img, ids if ids_i2t is None else ids_i2t, stats), stats

    def i2t_losses(self, z_img, ids, stats):
        """Image -> text on the first i2t_frac of the batch, from the image latent to the text latent's mean for
        the picture's one phrasing `ids`, detached (this loss must not move it to make itself easy). One end point
        per caption: a plain regression that straight Euler steps follow (a sample would ask for noise the image
        lacks). Then Diffusion-LM's rounding loss: the text decoder reads x1_hat = x_t + (1 - t) v, against ids."""
        cfg = self.cfg
        n = max(1, int(z_img.shape[0] * cfg.i2t_frac))
        x0, ids = z_img[:n], ids[:n]
        with torch.no_grad():
            x1 = self.text_encoder(ids)[0]
        # A share i2t_t0 at t = 0: the first Euler step from the image decides the caption, later steps only
        # read on; logit-normal t would train mid-path, where x_t already holds half the answer.
        t = sample_t(n, ids.device) * (torch.rand(n, device=ids.device) >= cfg.i2t_t0)
        x_t = interpolate(x0, x1, t)
        v = self.velocity(x_t, t, direction=1)
        stats["i2t"] = F.mse_loss(v, target_velocity(x0, x1))
        x1_hat = x_t + (1 - t).view(-1, 1, 1) * v  # (n, K, C)
        stats["round"] = F.cross_entropy(self.text_decoder(x1_hat).flatten(0, 1), ids.flatten())
        return cfg.i2t_weight * stats["i2t"] + cfg.round_weight * stats["round"]

    @torch.no_grad()
    def generate(self, ids, steps, guidance, from_mean=False, generator=None, trace=None):
        """Caption ids (B, K) -> image latents (B, K, C), Euler from t=0 to t=1 (trace: see euler)."""
        mean, logvar = self.text_encoder(ids)
        x0 = mean if from_mean else gaussian_sample(mean, logvar, generator)
        return euler(lambda x, t: guided(self, x, t, guidance), x0, steps, trace=trace)

    @torch.no_grad()
    def caption_logits(self, z_img, steps):
        """Image latents (B, K, C) -> text decoder logits (B, K, vocab) at the end of the image -> text path."""
        return self.text_decoder(euler(lambda x, t: self.velocity(x, t, direction=1), z_img, steps))

# -----------------------------------------------------------------------------
# Euler ODE sampler with classifier-free guidance

def guided(model, x, t, scale):
    """Classifier-free guidance through the indicator, x (B, K, C) -> (B, K, C): v = v_null + s * (v_cond - v_null),
    both from one batched pass of the text -> image direction (null flag 0 for the first half, 1 for the second)."""
    null = torch.arange(2, device=x.device).repeat_interleave(x.shape[0])  # (2B,): B zeros, B ones
    v_cond, v_null = model.velocity(torch.cat([x, x]), t, direction=0, null=null).chunk(2)
    return v_null + scale * (v_cond - v_null)

def euler(velocity, x, steps, t_start=0.0, t_end=1.0, trace=None):
    """Integrate dx/dt = velocity(x, t) from t_start to t_end in `steps` equal Euler steps, each
    x <- x + (t1 - t0) velocity(x, t0) with t0 a float, the step's start; x keeps its shape. With t_end <
    t_start it runs backwards (dt < 0). A list `trace` receives x at every step, start and end included."""
    ts = torch.linspace(t_start, t_end, steps + 1).tolist()
    trace = [] if trace is None else trace
    trace.append(x)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * velocity(x, t0)
        trace.append(x)
    return x

# -----------------------------------------------------------------------------
# Using a trained model: settings, checkpoints, drawing in both directions
#
# Every setting has one home: a dataclass field whose comment is its --help text. train.py, sample.py
# and bench.py build their flags from these dataclasses; a checkpoint carries the ones it was made with.

@dataclass
class SampleConfig:
    steps: int = 8              # Euler steps text -> image; chosen on val
    guidance: float = 2.0       # classifier-free guidance on the flow, v_null + s (v_cond - v_null); 1 = none
    dec_guidance: float = 1.0   # text-aware decoder: guidance towards the caption, x_c + s (x_c - x_none); 0 = none
    i2t_steps: int = 1          # Euler steps image -> text: one end point per caption makes its paths straight
    candidates: int = 16        # image -> text: captions drawn per image; the one the text-aware decoder
                                # redraws the picture best from is kept (1 = the most likely, unchecked)
    check_margin: float = 2.0   # image -> text: the check picks only among captions at most this many nats
                                # less likely than the likeliest, by the text decoder (inf: any)
    check_gain: float = 0.05    # image -> text: and only one whose redraw error is at least this share below
                                # the likeliest caption's (0: any lower error); chosen on val
    from_mean: bool = False     # start text -> image at the text latent's mean instead of a sample
    reencode: int = 2           # text -> image: rounds of decode -> encode -> decode, which pull a drawn picture
                                # onto what the tokenizer reconstructs (cleaner shapes); 0 = none
    draws: int = 8              # text -> image: pictures drawn per caption (from_mean: one); the one whose image ->
                                # text reading gives the caption the highest likelihood is kept; chosen on val

    def __post_init__(self):
        check_ranges(self, positive=("steps", "i2t_steps", "candidates", "draws"), shares=("check_gain",))

# Named presets, each a few overrides of the defaults by flag name. 'cpu' is the defaults, sized for a 2-core
# CPU where bf16 is fast; 'cpu-fp32' is a shorter schedule for CPUs that emulate bf16 (their minutes are in the
# README). The preset 'auto' picks 'gpu' on CUDA, else 'cpu' or 'cpu-fp32' by cpu_bf16_is_faster.
PRESETS = {
    "cpu": {},
    "cpu-fp32": {"tokenizer_steps": 4000, "flow_steps": 1300},
    "gpu": {"tokenizer_steps": 6000, "tokenizer_batch": 128, "tokenizer_lr": 1e-3, "flow_steps": 8000,
            "flow_batch": 256, "tokenizer.width": 256, "tokenizer.enc_depth": 4, "tokenizer.dec_depth": 6,
            "flow.width": 384, "flow.depth": 8, "flow.n_head": 6, "eval_interval": 2000},
    # the paper's shapes: 256 px, patch 16, K = 77 tokens x C = 16 channels, flow transformer sizes of
    # FlowTok-B / XL / H (its Table 1); for bench.py and real-data training on a GPU
    **{name: {"tokenizer.image_size": 256, "tokenizer.patch_size": 16, "tokenizer.num_tokens": 77,
              "tokenizer.token_dim": 16, "tokenizer.width": 768, "tokenizer.enc_depth": 12,
              "tokenizer.dec_depth": 12, "tokenizer.n_head": 12, "flow.width": w, "flow.depth": d,
              "flow.n_head": h, "flow.text_width": 512, "flow.text_depth": 6, "tokenizer_batch": 32,
              "flow_batch": 256, "tokenizer_lr": 1e-4, "flow_lr": 4e-4}
       for name, (w, d, h) in {"B": (768, 12, 12), "XL": (1152, 28, 16), "H": (1280, 36, 20)}.items()},
    # your own pictures on a CPU, in minutes: 64 px, longer captions (K = 32), C = 8
    "photo64": {"tokenizer.num_tokens": 32, "tokenizer.token_dim": 8, "tokenizer.kl_weight": 1e-5,
                "tokenizer_steps": 3000, "flow_steps": 1500, "eval_interval": 500},
    # for tests and smoke runs: seconds, not a useful model
    "tiny": {"tokenizer_steps": 20, "tokenizer_batch": 8, "flow_steps": 20, "flow_batch": 16, "warmup": 5,
             "latent_pool": 64, "tokenizer.width": 32, "tokenizer.enc_depth": 1, "tokenizer.dec_depth": 1,
             "tokenizer.n_head": 2, "flow.width": 32, "flow.depth": 1, "flow.n_head": 2, "flow.text_width": 32,
             "flow.text_depth": 1, "log_interval": 5, "eval_interval": 10, "eval_prompts": 2, "final_prompts": 2,
             "sample.steps": 2},
}

def parse_settings(parser, sections, argv=None):
    """Defaults, then the preset's overrides, then the command line. sections: {flag prefix: (dataclass,
    title)}, one with the 'preset' field. -> ({prefix: config}, the command line's own {flag: value})."""
    for prefix, (cls, title) in sections.items():
        add_fields(parser, cls, prefix, title)
    cli = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = cli.get("preset", "auto")
    if preset == "auto":  # on a CPU the schedule follows the precision: --bf16 if given, else the probe
        bf16 = cli.get("bf16", None)
        preset = "gpu" if torch.cuda.is_available() else "cpu" if (cpu_bf16_is_faster() if bf16 is None else bf16) \
            else "cpu-fp32"
    if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)} or auto")
    settings = {**PRESETS[preset], **cli, "preset": preset}
    return {prefix: build_config(cls, settings, prefix, parser) for prefix, (cls, _) in sections.items()}, cli

def check_ranges(cfg, positive=(), shares=()):
    """Every number in a config is >= 0; those in `positive` are >= 1 (whole numbers) or > 0; `shares` lie
    in [0, 1]. Else a ValueError starting with the field's name (the command lines add the flag's prefix)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if f.name not in positive and v < 0:
            raise ValueError(f"{f.name} must be >= 0, not {v}")
        if f.name in positive and (v < 1 if isinstance(v, int) else v <= 0):
            raise ValueError(f"{f.name} must be {'>= 1' if isinstance(v, int) else '> 0'}, not {v}")
        if f.name in shares and v > 1:
            raise ValueError(f"{f.name} is a share, between 0 and 1, not {v}")

def check_multiple(cfg, name, of, what):
    if getattr(cfg, name) % of:
        raise ValueError(f"{name} must be a multiple of {what} ({of}), not {getattr(cfg, name)}")

def str2bool(s):
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")

def field_help(cls):
    """The comment after each field of a config dataclass, with its continuation lines: its --help."""
    helps, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s+(\w+):[^#\n]*#\s*(.*)$", line):
            name, helps[m[1]] = m[1], m[2]
        elif name and (m := re.match(r"\s{8,}#\s*(.*)$", line)):  # indented under the comment above
            helps[name] += " " + m[1]
        else:
            name = None
    return helps

def add_fields(parser, cls, prefix, title):
    """One flag per field, --prefix.name=value (booleans also bare); default None, to tell what the user set."""
    group, helps = parser.add_argument_group(title), field_help(cls)
    for f in dataclasses.fields(cls):
        kind = bool if f.default is None else type(f.default)  # None: a switch meaning 'auto'
        auto = " (default auto)" if f.default is None else f" (default {f.default!r})"
        group.add_argument(f"--{prefix}{f.name}", type=str2bool if kind is bool else kind, default=None,
                           metavar=kind.__name__, help=helps.get(f.name, "") + auto,
                           **({"nargs": "?", "const": True} if kind is bool else {}))

def build_config(cls, values, prefix, parser):
    """cls from the values of its fields' flags, {prefix + name: value}; a range error names the flag."""
    try:
        return cls(**{f.name: values[prefix + f.name] for f in dataclasses.fields(cls) if prefix + f.name in values})
    except ValueError as e:
        parser.error(f"--{prefix}{e}")

def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")

@functools.cache
def cpu_bf16_is_faster():
    """Whether this CPU multiplies bf16 matrices clearly faster than fp32, measured once at the flow's sizes:
    CPUs with AMX or AVX512-BF16 do, others emulate bf16 (a capability flag would guess wrong on some)."""
    pairs = {dtype: (torch.randn(2048, 256, dtype=dtype), torch.randn(256, 1024, dtype=dtype))
             for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: math.inf for dtype in pairs}
    for _ in range(10):  # interleaved, the fastest of each: a busy moment spoils one try, not the verdict
        for dtype, (x, y) in pairs.items():
            t = time.perf_counter()
            x @ y
            best[dtype] = min(best[dtype], time.perf_counter() - t)
    return best[torch.bfloat16] < 0.5 * best[torch.float32]  # a wide margin, again against noise

def mixed_precision(dev, bf16=None, fp16=True):
    """-> (bf16, fp16, autocast context, GradScaler). bf16=None: on where faster (CUDA with bf16 support, CPUs
    where cpu_bf16_is_faster). GPUs without bf16 use fp16 (unless fp16=False) with a GradScaler."""
    if bf16 is None:
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else dev.type == "cpu" and cpu_bf16_is_faster()
    fp16 = dev.type == "cuda" and not bf16 and fp16
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16 if bf16 else torch.float16) if (bf16 or fp16) else nullcontext()
    return bf16, fp16, ctx, torch.amp.GradScaler(dev.type, enabled=fp16)

def make_optimizer(model, lr, weight_decay, dev):
    """AdamW, decaying only matrices (not biases, norms); fused on CUDA and CPU (same results, faster)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=dev.type in ("cuda", "cpu"))

class CheckpointError(Exception):
    pass

def save_checkpoint(state, out_dir, name="ckpt.pt"):
    """Write a temp file, fsync, rename it over the old one: a crash at any moment leaves the old or the new."""
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train first: python train.py")
    try:
        return torch.load(path, map_location=device, weights_only=True)  # a checkpoint is data, never code
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a nano FlowTok checkpoint ({type(e).__name__}); "
                              "it is damaged or not one of ours: retrain or pick another --ckpt") from None

def saved_config(cls, state, key, path):
    """A config dataclass from a checkpoint; settings unknown to this version, or missing, are an error."""
    d = state.get(key) or {}
    names = {f.name for f in dataclasses.fields(cls)}
    for what, keys in (("unknown", set(d) - names), ("missing", names - set(d))):
        if keys:
            raise CheckpointError(f"{path} was written by another version of nano FlowTok ({what} {cls.__name__} "
                                  f"settings: {', '.join(sorted(keys))}): retrain, or use that version")
    return cls(**d)

def load_weights(module, weights, path):
    """module.load_state_dict(weights) (torch.compile's key prefix dropped); weights of another shape or name
    (another version of this file) are a CheckpointError."""
    try:
        return module.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in weights.items()})
    except RuntimeError:
        raise CheckpointError(f"{path} was written by another version of nano FlowTok (its weights do not fit "
                              "this model): retrain, or use that version") from None

def tokenizer_from(state, path, device):
    """The image tokenizer of a checkpoint (any stage), in eval mode."""
    vocab = TextTokenizer.from_state_dict(state["bpe"]).vocab_size
    tokenizer = ImageTokenizer(saved_config(TokenizerConfig, state, "tokenizer_cfg", path), vocab).to(device)
    load_weights(tokenizer, state["tokenizer"], path)
    return tokenizer.eval()

def load_models(path, device):
    """Checkpoint -> (image tokenizer, EMA flow model, text tokenizer, its sampling settings)."""
    state = load_checkpoint(path, device)
    if not state.get("ema"):
        raise CheckpointError(f"{path} has no trained flow yet (stage {state.get('stage')!r}): "
                              "finish training: python train.py --resume")
    tokenizer, bpe = tokenizer_from(state, path, device), TextTokenizer.from_state_dict(state["bpe"])
    c = tokenizer.cfg
    model = FlowTok(saved_config(FlowConfig, state, "flow_cfg", path), bpe.vocab_size, c.num_tokens, c.token_dim)
    load_weights(model, state["ema"], path)
    return tokenizer, model.to(device).eval(), bpe, saved_config(SampleConfig, state, "sample_cfg", path)

@torch.no_grad()
def text_to_image(tokenizer, model, bpe, prompts, s, seed=0, batch=256, read_as=None):
    """Captions -> images (B, 3, S, S) in [0, 1], drawn with the sampling settings s. With s.draws > 1 each
    caption is drawn s.draws times and the picture kept is the one image -> text reads back as most likely
    that caption: as `read_as` says it, if given (one phrasing per picture, as image -> text was trained)."""
    dev, n = tokenizer.scale_factor.device, 1 if s.from_mean else s.draws  # from the mean, every draw is the same
    g = torch.Generator(dev).manual_seed(seed)
    read_as = prompts if read_as is None else read_as
    out, step = [], max(1, batch // n)  # a batch of `step` captions draws step * n pictures
    for i in range(0, len(prompts), step):
        ids = bpe.encode(prompts[i:i + step]).to(dev).repeat_interleave(n, 0)  # (b n, K): each caption n times
        img = tokenizer.images(model.generate(ids, s.steps, s.guidance, s.from_mean, g), ids, s.dec_guidance)
        for _ in range(s.reencode):
            img = tokenizer.images(tokenizer.latents(img, sample=False), ids, s.dec_guidance)
        if n > 1:
            logits = model.caption_logits(tokenizer.latents(img, sample=False), s.i2t_steps)  # (b n, K, vocab)
            back = bpe.encode(read_as[i:i + step]).to(dev).repeat_interleave(n, 0)  # (b n, K)
            best = caption_logprob(logits, back[:, None]).view(-1, n).argmax(1)  # (b,): the likeliest reading
            img = img.view(-1, n, *img.shape[1:])[torch.arange(len(best), device=dev), best]
        out.append(img)
    return torch.cat(out)

@torch.no_grad()
def image_to_text(tokenizer, model, bpe, images, s, batch=256):
    """Images (B, 3, S, S) in [0, 1] -> B captions: the best of s.candidates (caption_candidates)."""
    best = [caption_candidates(tokenizer, model, images[i:i + batch], s.candidates, s.i2t_steps,
                               margin=s.check_margin, gain=s.check_gain)[:, 0]
            for i in range(0, len(images), batch)]  # (B, K) each
    return [bpe.decode(x) for ids in best for x in ids]

def caption_logprob(logits, ids):
    """Text decoder logits (B, K, vocab), captions ids (B, n, K) -> (B, n): each whole caption's log-likelihood."""
    logp = logits.log_softmax(-1)[:, None].expand(-1, ids.shape[1], -1, -1)  # (B, n, K, vocab)
    return logp.gather(-1, ids[..., None]).flatten(2).sum(2)

def pick_tokens(logits, generator=None):
    """Logits (B, K, vocab) -> ids (B, K): the most likely, or drawn with the generator."""
    if generator is None:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=generator).view(logits.shape[:2])

@torch.no_grad()
def caption_candidates(tokenizer, model, img, n, steps=1, generator=None, margin=math.inf, gain=0.0):
    """Image -> text with a check FlowTok lacks: images (B, 3, S, S) -> n captions each (B, n, K), best first:
    the likeliest, then draws (the same each call by default). A text-aware decoder ranks them by how well it
    redraws the picture from latent and caption (a wrong word draws a wrong shape); captions over `margin`
    nats less likely than the likeliest rank last, so a lucky redraw cannot outvote a sure reading, and another
    caption goes first only when it redraws at least a share `gain` better: a near tie keeps the likeliest."""
    z = tokenizer.latents(img, sample=False)
    logits = model.caption_logits(z, steps)  # (B, K, vocab)
    generator = generator or torch.Generator(img.device).manual_seed(0)
    cands = torch.stack([logits.argmax(-1)] + [pick_tokens(logits, generator) for _ in range(n - 1)], 1)
    if tokenizer.cfg.text_aware and n > 1:
        err = torch.stack([tokenizer.redraw_error(img, z, cands[:, i]) for i in range(n)], 1)  # (B, n)
        logp = caption_logprob(logits, cands)  # (B, n)
        err = err.masked_fill(logp < logp[:, :1] - margin, math.inf)  # candidate 0 is the likeliest
        err[:, 0] *= 1 - gain  # the likeliest's error, discounted: to go first, another must beat it by `gain`
        cands = cands.gather(1, err.argsort(dim=1, stable=True)[..., None].expand_as(cands))
    return cands  # (B, n, K)
