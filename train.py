"""
Train nano FlowTok on the built-in shapes world: first the 1-D image tokenizer, then the text
encoder/decoder and the flow transformer (both directions) on the frozen tokenizer's latents.

    python train.py                      # preset chosen by device (printed): cpu or gpu
    python train.py --preset=cpu --stage=flow --resume
    python train.py -h                   # every setting, with help

Everything lands in --out_dir: ckpt.pt (atomic), samples_*.png, evals.jsonl.
"""

import os
import sys
import json
import time
import copy
import re
import signal
import inspect
import argparse
import dataclasses
from contextlib import nullcontext

import torch

import flowtok as ft
import data
from sample import (save_checkpoint, load_checkpoint, evaluate, evaluate_tokenizer, report, save_grid,
                    text_to_image, image_to_text, i2t_steps, saved_config, CheckpointError)


@dataclasses.dataclass
class TrainConfig:
    preset: str = "auto"          # auto: 'gpu' on CUDA, 'cpu' otherwise
    stage: str = "all"            # all | tokenizer | flow
    out_dir: str = "out"          # checkpoint, sample grids, evaluations
    device: str = "auto"          # auto: cuda -> mps -> cpu
    seed: int = 1337              # weights, data order and noise
    resume: bool = False          # continue from out_dir/ckpt.pt
    data: str = ""                # your captioned images (imagefolder, .txt or COCO); empty: the shapes world
    image_root: str = ""          # COCO: the image folder, when it is not found next to the annotations
    latent_cache: bool = False    # --data: encode the images once (out_dir/latents.npy, memory-mapped), train the flow on it
    latent_pool: int = 40000      # shapes world: the flow trains on this many pictures encoded once (0: render and
                                  # encode every batch; on a CPU that is 20-40 % of a flow step)
    hold_out: bool = True         # shapes world: keep the four held-out colour-shape pairs out of training
    text_tokenizer: str = "bpe"   # bpe (trained on the captions, offline) | gpt2 (needs tiktoken's cache)
    bpe_vocab: int = 512          # BPE vocabulary size at most (merges stop when no pair repeats)
    # tokenizer stage
    tok_steps: int = 4000         # tokenizer optimizer steps
    tok_batch: int = 32           # tokenizer images per step (per rank, per micro-step)
    tok_lr: float = 2e-3          # tokenizer peak learning rate
    # flow stage
    flow_steps: int = 1300        # flow optimizer steps
    flow_batch: int = 128         # flow (caption, image) pairs per step (per rank, per micro-step)
    flow_lr: float = 1e-3         # flow peak learning rate
    ema_decay: float = 0.999      # EMA of the flow model (what gets sampled); warmed up as (1+step)/(10+step)
    # both stages
    warmup: int = 100             # linear warm-up steps
    cooldown: float = 0.2         # fraction of steps at the end with a linear decay to 0 (worth +3 dB)
    weight_decay: float = 0.0     # AdamW weight decay (matrices only)
    grad_clip: float = 1.0        # gradient norm clip
    # logging, evaluation, sampling
    log_interval: int = 50        # steps between log lines
    eval_interval: int = 250      # steps between checkpoints; for the flow also evaluations and grids
    eval_prompts: int = 20        # per family and split, periodic evaluations
    final_prompts: int = 100      # per family and split, the final report
    sample_steps: int = 20        # Euler steps
    i2t_steps: int = 1            # Euler steps image -> text: one end point per caption makes its paths
                                  # straight (the backwards 'inverse' field uses sample_steps)
    i2t_candidates: int = 16      # image -> text: captions drawn per image, the one a text-aware tokenizer
                                  # redraws the picture best from kept (1 = the most likely, unchecked)
    cfg_scale: float = 2.0
    dec_guidance: float = 1.0     # text-aware decoder: guidance towards the caption, x_c + s (x_c - x_none); 0 = none
    from_mean: bool = False       # start sampling at the text latent's mean instead of a sample
    # speed switches (auto = on where it helps: CUDA; bf16 also on AMX CPUs)
    bf16: str = "auto"            # bf16 autocast; auto: on where CUDA supports it, and on CPUs with AMX
    fp16: str = "True"            # CUDA without bf16: fp16 autocast + GradScaler
    compile: str = "auto"         # torch.compile; auto: on for CUDA (--compile=False on Windows / to debug)
    tf32: bool = True             # TF32 matmuls on CUDA
    sdpa: str = "auto"            # attention: auto (PyTorch's SDPA picks; manual under CPU bf16) | flash | efficient
                                  # | math (SDPA kernels) | manual (the formula written out, no SDPA)
    grad_accum: int = 1           # micro-steps per optimizer step
    peak_tflops: float = 0.0      # for MFU; 0 = 989 (H100/H200 bf16 dense) on CUDA, not shown elsewhere


# Named presets: each overrides a few fields. 'cpu' finishes on a 2-core CPU in <= 30 minutes.
PRESETS = {
    "cpu": {},
    "gpu": {"tok_steps": 6000, "tok_batch": 128, "tok_lr": 1e-3, "flow_steps": 8000, "flow_batch": 256,
            "tok.width": 256, "tok.enc_depth": 4, "tok.dec_depth": 6, "flow.width": 384, "flow.depth": 8,
            "flow.n_head": 6, "eval_interval": 2000},
    # the paper's shapes: 256 px, patch 16, K = 77 tokens x C = 16 channels, flow transformer sizes of
    # FlowTok-B / XL / H (Tab. 1); for bench.py and real-data training on a GPU
    **{name: {"tok.image_size": 256, "tok.patch_size": 16, "tok.num_tokens": 77, "tok.token_dim": 16,
              "tok.width": 768, "tok.enc_depth": 12, "tok.dec_depth": 12, "tok.n_head": 12,
              "flow.width": w, "flow.depth": d, "flow.n_head": h, "flow.text_width": 512, "flow.text_depth": 6,
              "tok_batch": 32, "flow_batch": 256, "tok_lr": 1e-4, "flow_lr": 4e-4}
       for name, (w, d, h) in {"B": (768, 12, 12), "XL": (1152, 28, 16), "H": (1280, 36, 20)}.items()},
    # your own photos on a CPU, in minutes: 64 px, longer captions (K = 32); C = 8, as its README figures were measured
    "photo64": {"tok.num_tokens": 32, "tok.token_dim": 8, "tok.kl_weight": 1e-5, "tok_steps": 3000, "flow_steps": 1500,
                "eval_interval": 500},
    # for tests and smoke runs: seconds, not a useful model
    "tiny": {"tok_steps": 20, "tok_batch": 8, "flow_steps": 20, "flow_batch": 16, "warmup": 5, "latent_pool": 64,
             "tok.width": 32, "tok.enc_depth": 1, "tok.dec_depth": 1, "tok.n_head": 2,
             "flow.width": 32, "flow.depth": 1, "flow.n_head": 2, "flow.text_width": 32, "flow.text_depth": 1,
             "log_interval": 5, "eval_interval": 10, "eval_prompts": 2, "final_prompts": 2, "sample_steps": 2},
}

# -----------------------------------------------------------------------------
# configuration: dataclass defaults <- preset <- command line


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def field_help(cls):
    """The comment after each field of a config dataclass: its --help text (one source of truth)."""
    return {m[1]: m[2] for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M)}


def add_fields(parser, cls, prefix, title):
    """One flag per dataclass field: --name=value (booleans also as a bare --name)."""
    group = parser.add_argument_group(title)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        name = getattr(f.type, "__name__", f.type)
        extra = {"nargs": "?", "const": True} if name == "bool" else {}
        group.add_argument(f"--{prefix}{f.name}", type=str2bool if name == "bool" else f.type, default=None,
                           metavar=name, help=f"{helps.get(f.name, '')} (default {f.default!r})", **extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train nano FlowTok (tokenizer, then text side and flow). Settings: "
                                "the defaults below, then the preset's overrides, then the command line.")
    add_fields(p, TrainConfig, "", "training (presets: " + ", ".join(PRESETS) + ")")
    add_fields(p, ft.TokenizerConfig, "tok.", "image tokenizer")
    add_fields(p, ft.FlowConfig, "flow.", "text encoder/decoder and flow transformer")
    args = vars(p.parse_args(argv))
    cli = {k: v for k, v in args.items() if v is not None}
    preset = cli.get("preset", "auto")
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        p.error(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)} or auto")
    settings = {**PRESETS[preset], **cli, "preset": preset}
    split = lambda prefix: {k[len(prefix):]: v for k, v in settings.items() if k.startswith(prefix)}
    tc = TrainConfig(**{k: v for k, v in settings.items() if "." not in k})
    if tc.stage not in ("all", "tokenizer", "flow"):
        p.error(f"--stage must be all, tokenizer or flow, not {tc.stage!r}")
    tok_cfg = ft.TokenizerConfig(**split("tok."))
    if tc.latent_pool < 0:
        p.error(f"--latent_pool must be >= 0 (0 = render and encode every flow batch), not {tc.latent_pool}")
    if not 0 <= tok_cfg.text_drop <= 1:
        p.error(f"--tok.text_drop is a share of captions, between 0 and 1, not {tok_cfg.text_drop}")
    if tc.dec_guidance < 0:
        p.error(f"--dec_guidance must be >= 0 (0 = none), not {tc.dec_guidance}")
    if tc.i2t_candidates < 1:
        p.error(f"--i2t_candidates must be >= 1 (1 = the most likely caption, unchecked), not {tc.i2t_candidates}")
    if tok_cfg.edge_weight < 0:  # a weight below -1 would make the loss reward errors on outlines
        p.error(f"--tok.edge_weight must be >= 0 (0 = plain MSE), not {tok_cfg.edge_weight}")
    return tc, tok_cfg, split("flow."), cli

# -----------------------------------------------------------------------------
# device, precision, compile, DDP: every speed switch is set here, once


class Run:
    """What every stage needs to know about where and how it runs."""
    def __init__(self, tc):
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.ddp = "RANK" in os.environ  # launched by torchrun
        if tc.device == "auto":
            tc.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if self.ddp:
            import torch.distributed as dist
            dist.init_process_group("nccl" if tc.device.startswith("cuda") else "gloo")
            if tc.device.startswith("cuda"):
                tc.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
                torch.cuda.set_device(tc.device)
        self.master = self.rank == 0
        self.dev = dev = torch.device(tc.device)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        torch.set_flush_denormal(True)  # CPU: denormals made steps 3-5x slower at random
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tc.tf32
            torch.backends.cudnn.allow_tf32 = tc.tf32
        cuda_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        # CPUs with AMX multiply bf16 ~4x faster than fp32 (690 vs 183 GFLOP/s on the 2-core dev
        # machine at the flow's matrix sizes); CPUs without AMX are not measured and stay in fp32.
        cpu_bf16 = dev.type == "cpu" and getattr(torch.cpu, "get_capabilities", dict)().get("amx_bf16", False)
        self.bf16 = (cuda_bf16 or cpu_bf16) if tc.bf16 == "auto" else str2bool(tc.bf16)
        # GPUs without bf16: fp16 autocast, with a GradScaler against gradient underflow
        self.fp16 = dev.type == "cuda" and not self.bf16 and str2bool(tc.fp16)
        dtype = torch.bfloat16 if self.bf16 else torch.float16
        self.autocast = torch.autocast(dev.type, dtype=dtype) if (self.bf16 or self.fp16) else nullcontext()
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.fp16)
        self.compile = dev.type == "cuda" if tc.compile == "auto" else str2bool(tc.compile)
        if tc.sdpa not in ("auto", "flash", "efficient", "math", "manual"):
            sys.exit(f"error: --sdpa must be auto, flash, efficient, math or manual, not {tc.sdpa!r}")
        # Under CPU bf16 the formula written out beats every SDPA kernel at our sequence lengths
        # (16-80): a tokenizer step 150-167 ms against 205-237 with SDPA's math kernel, whose
        # masking checks cost that much, while the fused kernel's bf16 backward is ~4x slower still.
        self.sdpa = "manual" if (tc.sdpa == "auto" and dev.type == "cpu" and self.bf16) else tc.sdpa
        ft.Attention.manual = self.sdpa == "manual"
        self.peak = (tc.peak_tflops or (989.0 if dev.type == "cuda" else 0.0)) * 1e12
        self.stop = False  # set by Ctrl-C; the loop saves a checkpoint at the next step boundary
        self.print(f"device {dev} | preset {tc.preset} | bf16 {self.bf16} | fp16 {self.fp16} | compile {self.compile} "
                   f"| tf32 {tc.tf32} | sdpa {self.sdpa} | threads {torch.get_num_threads()} | ranks {self.world_size}")

    def interrupt(self, *_):
        """Ctrl-C: finish the current step, save, exit. A second Ctrl-C stops at once."""
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        self.print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

    def attention(self):
        """The SDPA kernel for the model's attention: a fresh context each step."""
        if self.sdpa in ("auto", "manual"):
            return nullcontext()
        from torch.nn.attention import sdpa_kernel, SDPBackend
        return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                            "math": SDPBackend.MATH}[self.sdpa])

    def print(self, *args):
        if self.master:
            print(*args, flush=True)

    def wrap(self, model):
        """compile, then DDP (in that order, as nanoGPT); the unwrapped model is what gets saved."""
        net = torch.compile(model) if self.compile else model
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        return net


def make_optimizer(model, lr, weight_decay, dev):
    # decay only matrices (not biases, norms). Fused AdamW on CUDA and on CPU: with plain AdamW's
    # per-tensor loop a 2-core CPU flow step took 1166 ms, fused 1035 ms, with the same losses.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=dev.type in ("cuda", "cpu"))


def lr_at(step, total, peak, tc):
    """Warm-up, constant, then a linear cool-down over the last `cooldown` fraction of the run."""
    if step < tc.warmup:
        return peak * (step + 1) / tc.warmup
    cool_start = int(total * (1 - tc.cooldown))
    if step >= cool_start:
        return peak * max(0.0, (total - step) / max(1, total - cool_start))
    return peak


class Logger:
    """One line per interval: stage, step, losses, ms/step over the interval, images/s, MFU, ETA."""
    def __init__(self, run, stage, total, batch, flops_per_step, start_step):
        self.run, self.stage, self.total, self.batch, self.flops = run, stage, total, batch, flops_per_step
        self.t_start = self.t_last = time.time()
        self.step_start = self.step_last = start_step

    def line(self, step, stats):
        now = time.time()
        dt = (now - self.t_last) / max(1, step + 1 - self.step_last)
        eta = (now - self.t_start) / max(1, step + 1 - self.step_start) * (self.total - step - 1)
        self.t_last, self.step_last = now, step + 1
        losses = " ".join(f"{k} {v.item():.4f}" for k, v in stats.items())  # .item() syncs: log time only
        mfu = f" | mfu {100 * self.flops / dt / self.run.peak:.1f}%" if self.run.peak else ""
        self.run.print(f"{self.stage} {step + 1}/{self.total} | {losses} | {1000 * dt:.0f} ms/step | "
                       f"{self.batch / dt:.0f} img/s{mfu} | ETA {int(eta // 60)}:{int(eta % 60):02d}")


def check_finite(loss, stage, step):
    if not torch.isfinite(loss):
        sys.exit(f"error: {stage} loss became {loss.item()} at step {step}; the last good checkpoint is kept. "
                 "Lower the learning rate or turn off bf16 (--bf16=False), then --resume.")


def clip_gradients(model, max_norm):
    """Clip the gradient norm, the tokenizer's GAN discriminator (if any) apart from the rest: its
    hinge-loss gradients are large, and in one norm they would shrink every tokenizer step."""
    for disc in (False, True):
        params = [p for n, p in model.named_parameters() if n.startswith("disc.") == disc]
        if params:  # foreach: one kernel over all tensors (CPU's default is a per-tensor loop)
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=params[0].device.type in ("cuda", "cpu"))


def fit(run, tc, stage, model, loss_fn, steps, batch, lr, state, flops_per_sample, on_step=None, on_save=None):
    """The training loop both stages share. loss_fn(net, step) draws a batch and returns (loss, stats).
    on_step(step) runs after each optimizer step (EMA); on_save(step, opt) every eval_interval
    steps and at the end (checkpoint, evaluation). Resumes from `state` when it is this stage's."""
    opt = make_optimizer(model, lr, tc.weight_decay, run.dev)
    step = 0
    if state.get("stage") == stage and state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])  # here, after every model was built: init draws from it too
    net = run.wrap(model)
    accum = tc.grad_accum
    run.print(f"{stage}: {steps} steps, effective batch {batch} x {accum} accumulation x {run.world_size} ranks "
              f"= {batch * accum * run.world_size}")
    log = Logger(run, stage, steps, batch * accum * run.world_size, flops_per_sample * batch * accum, step)
    signal.signal(signal.SIGINT, run.interrupt)
    while step < steps and not run.stop:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, tc)
        for micro in range(accum):
            # under DDP, all-reduce the gradients only on the last micro-step
            sync = nullcontext() if (not run.ddp or micro == accum - 1) else net.no_sync()
            with sync:
                with run.autocast, run.attention():
                    loss, stats = loss_fn(net, step)
                run.scaler.scale(loss / accum).backward()
        run.scaler.unscale_(opt)
        clip_gradients(model, tc.grad_clip)
        run.scaler.step(opt)
        run.scaler.update()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step)
        step += 1
        logging = step % tc.log_interval == 0 or step == steps
        saving = (step % tc.eval_interval == 0 or step == steps or run.stop) and on_save
        if logging or saving:  # checking the loss syncs a GPU: only here, and always before a save
            check_finite(loss, stage, step)
        if logging:
            log.line(step - 1, {"loss": loss, **stats})
        if saving:
            on_save(step, opt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if run.stop:
        run.print(f"interrupted: checkpoint saved at {stage} step {step}; continue with --resume")
        sys.exit(130)

def make_world(tc, tok_cfg, run):
    """The training stream: the shapes world, or your captioned images (--data). Each DDP rank draws
    its own data (a stream sharded by seed)."""
    if not tc.data:
        return data.ShapesWorld(tok_cfg.image_size, hold_out=tc.hold_out, seed=tc.seed + run.rank, device=run.dev)
    try:
        return data.open_dataset(tc.data, tok_cfg.image_size, tc.seed + run.rank, run.dev, tc.image_root or None)
    except ValueError as e:
        sys.exit(f"error: {e}")


def peek(world, n):
    """n training pairs without advancing the stream (its state is saved and restored), so that
    looking at the data never changes what a resumed run sees."""
    saved = world.state_dict()
    batch = world.batch(n)
    world.load_state_dict(saved)
    return batch

# -----------------------------------------------------------------------------
# stage 1: the image tokenizer


def train_tokenizer(run, tc, tok, text_tok, world, state):
    def on_save(step, opt):
        if run.master:
            state.update(stage="tokenizer", step=step, tokenizer=tok.state_dict(), optimizer=opt.state_dict(),
                         world=world.state_dict(), rng=torch.get_rng_state(), tok_seconds=time.time() - t_start)
            save_checkpoint(state, tc.out_dir)

    def loss_fn(net, step):
        img, captions, _ = world.batch(tc.tok_batch)
        return net(img, text_tok.encode(captions).to(run.dev, non_blocking=True), step)

    t_start = time.time() - state.get("tok_seconds", 0.0)
    fit(run, tc, "tokenizer", tok, loss_fn, tc.tok_steps, tc.tok_batch, tc.tok_lr, state, tok.flops(),
        on_save=on_save)
    state["tok_seconds"] = time.time() - t_start
    # after training: scale latents to unit std for the flow (rank 0's factor for every rank)
    scale = tok.fit_scale([peek(world, 512)[0]])
    if run.ddp:
        torch.distributed.broadcast(tok.scale_factor, 0)
        scale = tok.scale_factor.item()
    run.print(f"tokenizer latent scale factor {scale:.4f}")
    state.update(stage="flow", step=0, tokenizer=tok.state_dict(), optimizer=None, world=world.state_dict(),
                 rng=torch.get_rng_state())
    if run.master:
        save_checkpoint(state, tc.out_dir)

# -----------------------------------------------------------------------------
# stage 2: text encoder/decoder + flow transformer on the frozen tokenizer's latents


def train_flow(run, tc, tok, model, ema, text_tok, world, state):
    tok.eval().requires_grad_(False)
    t_start = time.time() - state.get("flow_seconds", 0.0)

    cache = None
    if tc.latent_cache:
        cache = data.LatentCache(world, os.path.join(tc.out_dir, "latents.npy"), tok)
    elif tc.latent_pool and not tc.data:
        with run.autocast:  # the pool's seed lies past every rank's own stream (seed + rank)
            cache = data.WorldPool(world, tok, tc.latent_pool, seed=tc.seed + run.world_size + run.rank)

    def loss_fn(net, step):
        if cache:  # pre-tokenized: re-sample the stored posterior
            mean, logvar, captions, specs = cache.batch(tc.flow_batch)
            z_img = ft.gaussian_sample(mean, logvar) * tok.scale_factor
        else:
            img, captions, specs = world.batch(tc.flow_batch)
            z_img = tok.latents(img).float()
        ids = text_tok.encode(captions).to(run.dev, non_blocking=True)
        # image -> text lands on one phrasing per picture: the relation stated left/above-wise
        i2t = [data.caption(data.normalize(s)) if s else c for s, c in zip(specs, captions)]
        ids_i2t = text_tok.encode(i2t).to(run.dev, non_blocking=True)
        return net(ids, z_img, ids_i2t)

    def on_step(step):
        # EMA with a warm-up of its decay, so a short run's EMA is not stuck near the init
        decay = min(tc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)

    def on_save(step, opt):
        if not run.master:
            return
        state.update(stage="flow", step=step, flow=model.state_dict(), ema=ema.state_dict(),
                     optimizer=opt.state_dict(), world=world.state_dict(), rng=torch.get_rng_state(),
                     flow_seconds=time.time() - t_start)
        save_checkpoint(state, tc.out_dir)
        if run.stop:  # Ctrl-C: saved, nothing more
            return
        grid_prompts(tok, ema, text_tok, tc, run.dev, os.path.join(tc.out_dir, f"samples_{step:06d}.png"), world)
        if tc.data:  # the judge only knows the shapes world
            return
        res = evaluate(tok, ema, text_tok, tc, run.dev, tc.eval_prompts, directions=("t2i",))
        res.update(step=step, minutes=(time.time() - t_start) / 60, total_minutes=(
            time.time() - t_start + state.get("tok_seconds", 0.0)) / 60)
        with open(os.path.join(tc.out_dir, "evals.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        run.print(f"eval @ {step} ({res['minutes']:.1f} flow min): " + report(res))

    flops = model.flops() + (0 if cache else tok.flops(train=False))  # + encoding images with the frozen tokenizer
    fit(run, tc, "flow", model, loss_fn, tc.flow_steps, tc.flow_batch, tc.flow_lr, state, flops, on_step, on_save)


def grid_prompts(tok, model, text_tok, tc, dev, path, world, n=16):
    """A labelled grid, the generated picture above each prompt: fixed shapes-world prompts (seen
    and held-out), or captions from your data."""
    if tc.data:
        prompts = peek(world, n)[1]
    else:
        specs = (data.eval_specs("seen", n // 4, seed=7) + data.eval_specs("heldout", n // 4, seed=7))[:n]
        prompts = [data.caption(s) for s in specs]
    imgs = text_to_image(tok, model, text_tok, prompts, tc.sample_steps, tc.cfg_scale, tc.from_mean,
                         dec_guidance=tc.dec_guidance)
    save_grid(imgs, prompts, path)


def check_same_model(cli, state, path):
    """--resume with a model setting that differs from the checkpoint's is a one-line error."""
    saved = {f"tok.{k}": v for k, v in state["tok_cfg"].items()}
    saved.update({f"flow.{k}": v for k, v in state.get("flow_cfg", {}).items()})
    for key, value in cli.items():
        if key in saved and saved[key] != value:
            sys.exit(f"error: {path} was trained with --{key}={saved[key]}, not {value}: "
                     "drop the flag to resume it, or train anew in another --out_dir")


def check_ranks_in_sync(run, *models):
    """DDP keeps replicas identical; verify it once at the end (one all-gather of a checksum of
    every weight and buffer)."""
    import torch.distributed as dist
    flat = torch.cat([v.detach().flatten().double() for m in models for v in m.state_dict().values()])
    sums = [torch.zeros(2, dtype=torch.float64, device=flat.device) for _ in range(run.world_size)]
    dist.all_gather(sums, torch.stack([flat.sum(), flat.pow(2).sum()]))
    same = all(torch.equal(sums[0], x) for x in sums)
    run.print(f"DDP: weights identical on all {run.world_size} ranks: {same}")

# -----------------------------------------------------------------------------


def main(argv=None):
    tc, tok_cfg, flow_overrides, cli = parse_args(argv)
    run = Run(tc)
    os.makedirs(tc.out_dir, exist_ok=True)
    if run.master and not tc.resume and os.path.exists(os.path.join(tc.out_dir, "evals.jsonl")):
        os.remove(os.path.join(tc.out_dir, "evals.jsonl"))  # a fresh run starts a fresh record
    t0 = time.time()
    state = {}
    if tc.resume:
        path = os.path.join(tc.out_dir, "ckpt.pt")
        state = load_checkpoint(path)
        tok_cfg = saved_config(ft.TokenizerConfig, state["tok_cfg"], path)
        check_same_model(cli, state, path)
        run.print(f"resuming from {tc.out_dir}/ckpt.pt: stage {state['stage']}, step {state['step']}")
    world = make_world(tc, tok_cfg, run)
    if tc.latent_cache and not tc.data:
        sys.exit("error: --latent_cache needs --data: the shapes world is an endless stream, nothing to cache")
    if state.get("world") and state.get("data", "") == tc.data:
        world.load_state_dict(state["world"])
    elif state.get("world"):  # e.g. a tokenizer trained on the shapes world, continued on your images
        run.print(f"note: the checkpoint was trained on {state.get('data') or 'the shapes world'}; "
                  f"continuing on {tc.data or 'the shapes world'} from the start of its data order")
    state["data"] = tc.data
    # text tokenizer: trained on a sample of the training captions (seconds), stored in the checkpoint;
    # first, since the image tokenizer's decoder reads captions too
    if state.get("text_tokenizer"):
        text_tok = ft.TextTokenizer.from_state_dict(state["text_tokenizer"])
    elif tc.text_tokenizer == "bpe":
        text_tok = ft.TextTokenizer.train(world.captions(), tok_cfg.num_tokens, tc.bpe_vocab)
    else:
        text_tok = ft.TextTokenizer(tok_cfg.num_tokens, tc.text_tokenizer)
    state["text_tokenizer"] = text_tok.state_dict()
    tok_cfg = dataclasses.replace(tok_cfg, vocab_size=text_tok.vocab_size)
    tok = ft.ImageTokenizer(tok_cfg).to(run.dev)
    run.print(f"image tokenizer: {ft.param_count(tok) / 1e6:.2f}M parameters, "
              f"{tok_cfg.num_tokens} x {tok_cfg.token_dim} latent")
    if state.get("tokenizer"):
        tok.load_state_dict(state["tokenizer"])
    state.setdefault("tok_cfg", dataclasses.asdict(tok_cfg))
    state.setdefault("train_cfg", dataclasses.asdict(tc))

    if tc.stage in ("all", "tokenizer") and state.get("stage") in (None, "tokenizer"):
        train_tokenizer(run, tc, tok, text_tok, world, state)
        run.print(f"tokenizer stage done in {(time.time() - t0) / 60:.1f} min")
        if run.master:
            img, captions, _ = peek(world, 256) if tc.data else (None, None, None)
            res = evaluate_tokenizer(tok, run.dev, tc.final_prompts, text_tok, img, captions, tc.dec_guidance)
            run.print("tokenizer reconstructions: " + report(res))
    if tc.stage == "tokenizer":
        return
    if not state.get("tokenizer"):
        sys.exit(f"error: no trained tokenizer in {tc.out_dir}/ckpt.pt: run python train.py --stage=tokenizer first")

    flow_cfg = ft.FlowConfig(**{**state.get("flow_cfg", flow_overrides), "vocab_size": text_tok.vocab_size,
                                "num_tokens": tok_cfg.num_tokens, "token_dim": tok_cfg.token_dim})
    state["flow_cfg"] = dataclasses.asdict(flow_cfg)
    model = ft.FlowTok(flow_cfg).to(run.dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    if state.get("flow"):
        model.load_state_dict(state["flow"])
        ema.load_state_dict(state["ema"])
    run.print(f"text tokenizer: {text_tok.kind}, vocab {text_tok.vocab_size}; flow model: "
              f"{ft.param_count(model.flow) / 1e6:.2f}M flow transformer, {ft.param_count(model) / 1e6:.2f}M in all")
    train_flow(run, tc, tok, model, ema, text_tok, world, state)  # returns at once if already at flow_steps
    if run.ddp:
        check_ranks_in_sync(run, tok, model)
    run.print(f"flow stage done; {(time.time() - t0) / 60:.1f} min so far")
    if not run.master:
        return
    path = os.path.join(tc.out_dir, "samples_final.png")
    grid_prompts(tok, ema, text_tok, tc, run.dev, path, world)
    if tc.data:  # no judge for free text: reconstruction quality, and captions for a few of your images
        img, caps, _ = peek(world, 8)
        res = evaluate_tokenizer(tok, run.dev, 0, text_tok, img, caps, tc.dec_guidance)
        for truth, said in zip(caps, image_to_text(tok, ema, text_tok, img, i2t_steps(ema, tc),
                                                   candidates=tc.i2t_candidates)):
            print(f"image -> text: {said!r} (its caption: {truth!r})")
    else:
        res = evaluate(tok, ema, text_tok, tc, run.dev, tc.final_prompts)
    with open(os.path.join(tc.out_dir, "report.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("final report:\n" + report(res, multiline=True))
    print(f"sample grid: {path}\ntotal time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
