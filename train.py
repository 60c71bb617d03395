"""
Train nano FlowTok: first the 1-D image tokenizer, then the text encoder/decoder and the flow
transformer (both directions) on the frozen tokenizer's latents. The shapes world by default,
your own captioned images with --data.

    python train.py                      # preset chosen by device (printed): gpu, cpu or cpu-fp32
    python train.py --stage=flow --resume
    python train.py -h                   # every setting, with help

Everything lands in --out_dir: ckpt.pt (atomic), samples_*.png, evals.jsonl, report.json, and the
logged losses: log.jsonl, drawn at the end as losses.png.
"""

import os
import sys
import json
import time
import copy
import signal
import argparse
import dataclasses
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image

import flowtok as ft
import data

@dataclasses.dataclass
class TrainConfig:
    preset: str = "auto"          # auto: 'gpu' on CUDA, 'cpu' where bf16 is fast, else 'cpu-fp32'; or a PRESETS name
    stage: str = "all"            # all | tokenizer | flow
    out_dir: str = "out"          # checkpoint, sample grids, evaluations
    device: str = "auto"          # auto: cuda -> mps -> cpu
    seed: int = 1337              # weights, data order and noise
    resume: bool = False          # continue from out_dir/ckpt.pt
    data: str = ""                # your captioned images (imagefolder, .txt or COCO); empty: the shapes world
    image_root: str = ""          # COCO: the image folder, when it is not found next to the annotations
    latent_cache: bool = False    # --data: train the flow on images encoded once (out_dir/latents.npy, memory-mapped)
    latent_pool: int = 40000      # shapes world: the flow trains on this many pictures encoded once
                                  # (0: render and encode every batch, which costs a CPU much of a flow step)
    hold_out: bool = True         # shapes world: keep the four held-out colour-shape pairs out of training
    text_tokenizer: str = "bpe"   # bpe (trained on the captions, offline) | gpt2 (needs tiktoken's cache)
    bpe_vocab: int = 512          # BPE vocabulary size at most (merges stop when no pair repeats)
    # tokenizer stage
    tokenizer_steps: int = 5000   # image tokenizer optimizer steps
    tokenizer_batch: int = 32     # image tokenizer pictures per step (per rank, per micro-step)
    tokenizer_lr: float = 2e-3    # image tokenizer peak learning rate
    # flow stage
    flow_steps: int = 2600        # flow optimizer steps
    flow_batch: int = 128         # flow (caption, picture) pairs per step (per rank, per micro-step)
    flow_lr: float = 1e-3         # flow peak learning rate
    ema_decay: float = 0.999      # EMA of the flow model (what gets sampled); warmed up as (1+step)/(10+step)
    # both stages
    warmup: int = 100             # linear warm-up steps
    cooldown: float = 0.2         # share of steps at the end with a linear decay to 0 (worth +3 dB)
    weight_decay: float = 0.0     # AdamW weight decay (matrices only)
    grad_clip: float = 1.0        # gradient norm clip
    grad_accum: int = 1           # micro-steps per optimizer step
    # logging and evaluation (the sampling settings are --sample.*)
    log_interval: int = 50        # steps between log lines
    eval_interval: int = 250      # steps between checkpoints; for the flow also evaluations and grids
    eval_prompts: int = 20        # prompts per family and split, periodic evaluations (validation prompts)
    final_prompts: int = 100      # prompts per family and split, the final report (test prompts)
    # speed switches; unset = auto
    bf16: bool = None             # bf16 autocast; auto: on CUDA with bf16, and on CPUs where bf16 is measured faster
    fp16: bool = True             # CUDA without bf16: fp16 autocast + GradScaler
    compile: bool = None          # torch.compile; auto: on for CUDA (turn off on Windows or to debug)
    tf32: bool = True             # TF32 matmuls on CUDA
    sdpa: str = "auto"            # attention: auto (SDPA picks; the formula written out under CPU bf16)
                                  # | flash | efficient | math (SDPA kernels) | manual (the formula, no SDPA)
    peak_tflops: float = 0.0      # for MFU; 0 = 989 (H100/H200 bf16 dense) on CUDA, not shown elsewhere
    print_settings: bool = False  # print the settings (defaults, preset, command line) as JSON and exit

    def __post_init__(self):
        ft.check_ranges(self, positive=("bpe_vocab", "tokenizer_steps", "tokenizer_batch", "tokenizer_lr",
                                        "flow_steps", "flow_batch", "flow_lr", "grad_accum", "grad_clip",
                                        "log_interval", "eval_interval", "eval_prompts", "final_prompts"),
                        shares=("ema_decay", "cooldown"))
        for name, choices in (("stage", ("all", "tokenizer", "flow")),
                              ("sdpa", ("auto", "flash", "efficient", "math", "manual"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")

SECTIONS = {"": (TrainConfig, "training (presets: " + ", ".join(ft.PRESETS) + ")"),
            "tokenizer.": (ft.TokenizerConfig, "image tokenizer"),
            "flow.": (ft.FlowConfig, "text encoder/decoder and flow transformer"),
            "sample.": (ft.SampleConfig, "sampling, for evaluations and grids (stored in the checkpoint)")}

def parse_args(argv=None):
    """-> TrainConfig, TokenizerConfig, FlowConfig, SampleConfig, the command line's own settings."""
    p = argparse.ArgumentParser(description="Train nano FlowTok (image tokenizer, then text side and flow). "
                                "Settings: the defaults below, then the preset's overrides, then the command line.")
    configs, cli = ft.parse_settings(p, SECTIONS, argv)
    return (*configs.values(), cli)

# -----------------------------------------------------------------------------
# device, precision, compile, DDP: every speed switch is set here, once

class Run:
    """Where and how every stage runs."""
    def __init__(self, tc):
        self.ddp = "RANK" in os.environ  # launched by torchrun
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0
        dev = ft.pick_device(tc.device)
        if self.ddp:
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            if dev.type == "cuda":
                dev = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
                torch.cuda.set_device(dev)
        self.dev = dev
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        torch.set_flush_denormal(True)  # CPU: denormal floats made steps several times slower at random
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32
        self.bf16, self.fp16, self.autocast, self.scaler = ft.mixed_precision(dev, tc.bf16, tc.fp16)
        why = "--bf16, or the resumed run" if tc.bf16 is not None else "CUDA" if dev.type == "cuda" else \
            "measured faster than fp32 on this CPU" if self.bf16 else "not faster than fp32 on this CPU"
        self.compile = dev.type == "cuda" if tc.compile is None else tc.compile
        # under CPU bf16 the formula written out beats every SDPA kernel here (ft.use_manual_attention says why)
        self.sdpa = "manual" if (tc.sdpa == "auto" and dev.type == "cpu" and self.bf16) else tc.sdpa
        self.peak = (tc.peak_tflops or (989.0 if dev.type == "cuda" else 0.0)) * 1e12
        self.stop = False  # set by Ctrl-C; the loop saves a checkpoint at the next step boundary
        precision = "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"
        self.print(f"device {dev} | preset {tc.preset} | {precision} ({why}) | compile {self.compile} "
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

    def build(self, model):
        """A new model on the device, with this run's attention (for training and evaluation alike)."""
        ft.use_manual_attention(model, self.sdpa == "manual")
        return model.to(self.dev)

    def wrap(self, model):
        """compile, then DDP (in that order, as nanoGPT); the unwrapped model is what gets saved."""
        net = torch.compile(model) if self.compile else model
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        return net

def lr_at(step, total, peak, tc):
    """Warm-up, constant, then a linear cool-down over the last `cooldown` fraction of the run."""
    if step < tc.warmup:
        return peak * (step + 1) / tc.warmup
    cool_start = int(total * (1 - tc.cooldown))  # before it the factor is over 1: peak
    return peak * min(1.0, max(0.0, (total - step) / max(1, total - cool_start)))

def rng_state(dev):
    """The random generators' states for an exact resume: the CPU's, and on CUDA every GPU's (t, the
    noise and the guidance flags are drawn on the device). Tensors: weights_only loads them."""
    return {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if dev.type == "cuda" else []}

def set_rng_state(state, dev):
    torch.set_rng_state(state["rng"])
    if dev.type == "cuda" and state.get("cuda_rng"):  # a CPU checkpoint continued on a GPU has none
        torch.cuda.set_rng_state_all(state["cuda_rng"])

def fit(run, tc, stage, model, loss_fn, flops_per_sample, state, world, ema=None, on_eval=None):
    """The loop both stages share, with tc's {stage}_steps, _batch and _lr: loss_fn(net) draws a batch -> (loss,
    stats); the EMA, if any, follows each step; every eval_interval steps and at the end, rank 0 saves the model,
    the EMA and the loop's state, then calls on_eval(step, t_start)."""
    steps, batch, lr = (getattr(tc, f"{stage}_{k}") for k in ("steps", "batch", "lr"))
    opt = ft.make_optimizer(model, lr, tc.weight_decay, run.dev)
    step, t_start = 0, time.time() - state.get(f"{stage}_seconds", 0.0)  # the stage's clock runs on over resumes
    if state.get("stage") == stage and state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        set_rng_state(state, run.dev)  # here, after every model was built: init draws from it too
    net = run.wrap(model)
    accum, effective = tc.grad_accum, batch * tc.grad_accum * run.world_size
    run.print(f"{stage}: {steps} steps, effective batch {batch} x {accum} accumulation x {run.world_size} ranks "
              f"= {effective}")
    started = last = (time.time(), step)  # ETA: this session's pace; ms/step: each log interval's
    signal.signal(signal.SIGINT, run.interrupt)
    while step < steps and not run.stop:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, tc)
        for micro in range(accum):
            # under DDP, all-reduce the gradients only on the last micro-step
            with nullcontext() if (not run.ddp or micro == accum - 1) else net.no_sync():
                with run.autocast, run.attention():
                    loss, stats = loss_fn(net)
                run.scaler.scale(loss / accum).backward()
        run.scaler.unscale_(opt)
        # foreach: one kernel over all tensors (the CPU's default is a per-tensor loop)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip, foreach=run.dev.type in ("cuda", "cpu"))
        run.scaler.step(opt)
        run.scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema is not None:  # a warmed-up decay, so that a short run's EMA is not stuck near the init
            decay = min(tc.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        logging = step % tc.log_interval == 0 or step == steps
        saving = step % tc.eval_interval == 0 or step == steps or run.stop
        if (logging or saving) and not torch.isfinite(loss):  # a GPU sync: only here, and always before a save
            sys.exit(f"error: {stage} loss became {loss.item()} at step {step}; the last good checkpoint is kept. "
                     "Lower the learning rate or turn off bf16 (--bf16=False), then --resume.")
        if logging:  # one line: losses, ms/step, images/s, MFU, ETA; the losses also to log.jsonl (for losses.png)
            now = time.time()
            stats = {k: v.item() for k, v in {"loss": loss, **stats}.items()}  # .item() syncs: log time only
            dt = (now - last[0]) / max(1, step - last[1])
            eta = (now - started[0]) / max(1, step - started[1]) * (steps - step)
            last = (now, step)
            if run.master:
                with open(os.path.join(tc.out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"stage": stage, "step": step, **stats}) + "\n")
            losses = " ".join(f"{k} {v:.4f}" for k, v in stats.items())
            mfu = f" | mfu {100 * flops_per_sample * batch * accum / dt / run.peak:.1f}%" if run.peak else ""
            run.print(f"{stage} {step}/{steps} | {losses} | {1000 * dt:.0f} ms/step | {effective / dt:.0f} img/s{mfu} "
                      f"| ETA {int(eta // 60)}:{int(eta % 60):02d}")
        if saving and run.master:
            weights = {name: m.state_dict() for name, m in ((stage, model), ("ema", ema)) if m is not None}
            state.update(stage=stage, step=step, **weights, optimizer=opt.state_dict(), world=world.state_dict(),
                         **rng_state(run.dev), **{f"{stage}_seconds": time.time() - t_start})
            ft.save_checkpoint(state, tc.out_dir)
            if on_eval and not run.stop:  # Ctrl-C: saved, nothing more
                on_eval(step, t_start)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if run.stop:
        run.print(f"interrupted: checkpoint saved at {stage} step {step}; continue with --resume")
        sys.exit(130)
    state[f"{stage}_seconds"] = time.time() - t_start

def peek(world, n):
    """n training pairs without advancing the stream, so that looking never changes what a resumed run sees."""
    saved = world.state_dict()
    batch = world.batch(n)
    world.load_state_dict(saved)
    return batch

# -----------------------------------------------------------------------------
# stage 1: the image tokenizer

def train_tokenizer(run, tc, tokenizer, bpe, world, state):
    def loss_fn(net):
        img, captions, _ = world.batch(tc.tokenizer_batch)
        return net(img, bpe.encode(captions).to(run.dev, non_blocking=True))
    fit(run, tc, "tokenizer", tokenizer, loss_fn, tokenizer.flops(), state, world)
    # after training: scale latents to unit std for the flow (rank 0's factor for every rank)
    scale = tokenizer.fit_scale([peek(world, 512)[0]])
    if run.ddp:
        torch.distributed.broadcast(tokenizer.scale_factor, 0)
        scale = tokenizer.scale_factor.item()
    run.print(f"tokenizer latent scale factor {scale:.4f}")
    state.update(stage="flow", step=0, tokenizer=tokenizer.state_dict(), optimizer=None, world=world.state_dict(),
                 **rng_state(run.dev))
    if run.master:
        ft.save_checkpoint(state, tc.out_dir)

# -----------------------------------------------------------------------------
# stage 2: text encoder/decoder + flow transformer on the frozen tokenizer's latents

def train_flow(run, tc, sample_cfg, tokenizer, model, ema, bpe, world, state):
    tokenizer.eval().requires_grad_(False)
    cache = None
    if tc.latent_cache:
        cache = data.LatentCache(world, os.path.join(tc.out_dir, "latents.npy"), tokenizer)
    elif tc.latent_pool and not tc.data:
        with run.autocast:  # the pool's seed lies past every rank's own stream (seed + rank)
            cache = data.WorldPool(world, tokenizer, tc.latent_pool, seed=tc.seed + run.world_size + run.rank)

    def loss_fn(net):
        if cache:  # pre-tokenized: re-sample the stored posterior
            mean, logvar, captions, _ = cache.batch(tc.flow_batch)
            z_img = ft.gaussian_sample(mean, logvar) * tokenizer.scale_factor
        else:
            img, captions, _ = world.batch(tc.flow_batch)
            z_img = tokenizer.latents(img).float()
        ids = bpe.encode(captions).to(run.dev, non_blocking=True)
        # image -> text lands on one phrasing per picture: the relation stated left/above-wise
        i2t = bpe.encode(data.reader_phrasing(captions)).to(run.dev, non_blocking=True)
        return net(ids, z_img, i2t)

    def evaluate(step, t_start):
        grid_prompts(tokenizer, ema, bpe, sample_cfg, tc, os.path.join(tc.out_dir, f"samples_{step:06d}.png"), world)
        if tc.data:  # the judge only knows the shapes world
            return
        # one draw per caption: what training changes (the final report has the read-back check too)
        one_draw = dataclasses.replace(sample_cfg, draws=1)
        res = data.evaluate(tokenizer, ema, bpe, one_draw, tc.eval_prompts, "val", ("t2i",), hold_out=tc.hold_out)
        seconds = time.time() - t_start
        res.update(step=step, minutes=seconds / 60, total_minutes=(seconds + state.get("tokenizer_seconds", 0.0)) / 60)
        with open(os.path.join(tc.out_dir, "evals.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        run.print(f"eval @ {step} ({res['minutes']:.1f} flow min, validation): " + data.report(res))

    # + encoding pictures with the frozen tokenizer, unless they come encoded
    flops = model.flops() + (0 if cache else tokenizer.flops(train=False))
    fit(run, tc, "flow", model, loss_fn, flops, state, world, ema, evaluate)

def grid_prompts(tokenizer, model, bpe, sample_cfg, tc, path, world, n=16):
    """A grid of samples: fixed shapes-world prompts (seen and held-out), or your data's captions."""
    specs = (data.eval_specs("seen", n // 4, "grid") + data.eval_specs("heldout", n // 4, "grid"))[:n]
    prompts = peek(world, n)[1] if tc.data else [data.caption(s) for s in specs]
    imgs = ft.text_to_image(tokenizer, model, bpe, prompts, sample_cfg, read_as=data.reader_phrasing(prompts))
    data.save_grid(imgs, prompts, path)

# -----------------------------------------------------------------------------

def main(argv=None):
    tc, tokenizer_cfg, flow_cfg, sample_cfg, cli = parse_args(argv)
    if tc.print_settings:  # what a preset means, exactly (bench.py reads the schedule from here)
        return print(json.dumps({k.rstrip(".") or "train": dataclasses.asdict(c) for k, c in
                                 zip(SECTIONS, (tc, tokenizer_cfg, flow_cfg, sample_cfg))}))
    t0, state, path = time.time(), {}, os.path.join(tc.out_dir, "ckpt.pt")
    if tc.resume:
        state = ft.load_checkpoint(path)
        if tc.bf16 is None:  # continue in the precision the run started in
            tc = dataclasses.replace(tc, bf16=state.get("bf16"))
    run = Run(tc)
    state["bf16"] = run.bf16
    os.makedirs(tc.out_dir, exist_ok=True)
    for name in ("evals.jsonl", "log.jsonl"):  # a fresh run starts a fresh record
        if run.master and not tc.resume and os.path.exists(os.path.join(tc.out_dir, name)):
            os.remove(os.path.join(tc.out_dir, name))
    if tc.resume:  # a model setting that differs from the checkpoint's is a one-line error
        saved = {f"{part}.{k}": v for part in ("tokenizer", "flow") for k, v in state.get(f"{part}_cfg", {}).items()}
        for key, value in cli.items():
            if key in saved and saved[key] != value:
                sys.exit(f"error: {path} was trained with --{key}={saved[key]}, not {value}: "
                         "drop the flag to resume it, or train anew in another --out_dir")
        tokenizer_cfg = ft.saved_config(ft.TokenizerConfig, state, "tokenizer_cfg", path)
        flow_cfg = ft.saved_config(ft.FlowConfig, state, "flow_cfg", path) if state.get("flow_cfg") else flow_cfg
        if state.get("sample_cfg"):  # the checkpoint's sampling settings, unless the command line sets them
            flags = {k[len("sample."):]: v for k, v in cli.items() if k.startswith("sample.")}
            sample_cfg = dataclasses.replace(ft.saved_config(ft.SampleConfig, state, "sample_cfg", path), **flags)
        run.print(f"resuming from {path}: stage {state['stage']}, step {state['step']}")
        if run.master:
            trim_log(os.path.join(tc.out_dir, "log.jsonl"), state["stage"], state["step"])
    if tc.latent_cache and not tc.data:
        sys.exit("error: --latent_cache needs --data: the shapes world is an endless stream, nothing to cache")
    seed = tc.seed + run.rank  # the training stream: each DDP rank its own
    try:
        world = (data.open_dataset(tc.data, tokenizer_cfg.image_size, seed, run.dev, tc.image_root or None) if tc.data
                 else data.ShapesWorld(tokenizer_cfg.image_size, hold_out=tc.hold_out, seed=seed, device=run.dev))
    except ValueError as e:  # --data that cannot be read
        sys.exit(f"error: {e}")
    if state.get("world") and state.get("data", "") == tc.data:
        world.load_state_dict(state["world"])
    elif state.get("world"):  # e.g. a tokenizer trained on the shapes world, continued on your images
        run.print(f"note: the checkpoint was trained on {state.get('data') or 'the shapes world'}; "
                  f"continuing on {tc.data or 'the shapes world'} from the start of its data order")
    # The text tokenizer first (the image tokenizer's decoder reads captions too): the checkpoint's,
    # or a BPE trained on a sample of the training captions (seconds), or GPT-2's from tiktoken's cache.
    bpe = (ft.TextTokenizer.from_state_dict(state["bpe"]) if state.get("bpe") else
           ft.TextTokenizer(tokenizer_cfg.num_tokens, tc.text_tokenizer) if tc.text_tokenizer != "bpe" else
           ft.TextTokenizer.train(world.captions(), tokenizer_cfg.num_tokens, tc.bpe_vocab))
    tokenizer = run.build(ft.ImageTokenizer(tokenizer_cfg, bpe.vocab_size))
    run.print(f"image tokenizer: {ft.param_count(tokenizer) / 1e6:.2f}M parameters, "
              f"{tokenizer_cfg.num_tokens} x {tokenizer_cfg.token_dim} latent")
    if state.get("tokenizer"):
        ft.load_weights(tokenizer, state["tokenizer"], path)
    state.update(data=tc.data, bpe=bpe.state_dict(), tokenizer_cfg=dataclasses.asdict(tokenizer_cfg),
                 sample_cfg=dataclasses.asdict(sample_cfg))
    state.setdefault("train_cfg", dataclasses.asdict(tc))

    if tc.stage in ("all", "tokenizer") and state.get("stage") in (None, "tokenizer"):
        train_tokenizer(run, tc, tokenizer, bpe, world, state)
        run.print(f"tokenizer stage done in {(time.time() - t0) / 60:.1f} min")
        if run.master and not tc.data:
            res = data.evaluate_tokenizer(tokenizer, tc.eval_prompts, bpe, guidance=sample_cfg.dec_guidance,
                                          hold_out=tc.hold_out)
            run.print("tokenizer reconstructions (validation): " + data.report(res))
    if tc.stage == "tokenizer":
        return plot_losses(run, tc.out_dir)
    if not state.get("tokenizer"):
        sys.exit(f"error: no trained tokenizer in {tc.out_dir}/ckpt.pt: run python train.py --stage=tokenizer first")

    state["flow_cfg"] = dataclasses.asdict(flow_cfg)
    model = run.build(ft.FlowTok(flow_cfg, bpe.vocab_size, tokenizer_cfg.num_tokens, tokenizer_cfg.token_dim))
    ema = copy.deepcopy(model).requires_grad_(False)
    if state.get("flow"):
        ft.load_weights(model, state["flow"], path)
        ft.load_weights(ema, state["ema"], path)
    run.print(f"text tokenizer: {bpe.kind}, vocab {bpe.vocab_size}; flow model: "
              f"{ft.param_count(model.flow) / 1e6:.2f}M flow transformer, {ft.param_count(model) / 1e6:.2f}M in all")
    train_flow(run, tc, sample_cfg, tokenizer, model, ema, bpe, world, state)  # at once if already at flow_steps
    if run.ddp:  # DDP keeps replicas identical; verify it once at the end (an all-gather of weight checksums)
        flat = torch.cat([v.detach().flatten().double() for m in (tokenizer, model) for v in m.state_dict().values()])
        sums = [torch.zeros(2, dtype=torch.float64, device=flat.device) for _ in range(run.world_size)]
        torch.distributed.all_gather(sums, torch.stack([flat.sum(), flat.pow(2).sum()]))
        run.print(f"DDP: weights identical on all {run.world_size} ranks: {all(torch.equal(sums[0], x) for x in sums)}")
    run.print(f"flow stage done; {(time.time() - t0) / 60:.1f} min so far")
    if run.master:  # the sample grid and the report on the test prompts (never used to choose a setting)
        path = os.path.join(tc.out_dir, "samples_final.png")
        grid_prompts(tokenizer, ema, bpe, sample_cfg, tc, path, world)
        if tc.data:  # no judge for free text: a few pictures' reconstructions and captions
            img, caps, _ = peek(world, 8)
            res = data.evaluate_tokenizer(tokenizer, 0, bpe, img, caps, sample_cfg.dec_guidance)
            for truth, said in zip(caps, ft.image_to_text(tokenizer, ema, bpe, img, sample_cfg)):
                print(f"image -> text: {said!r} (its caption: {truth!r})")
        else:
            res = {**data.evaluate_tokenizer(tokenizer, tc.final_prompts, bpe, guidance=sample_cfg.dec_guidance,
                                             split="test", hold_out=tc.hold_out),
                   **data.evaluate(tokenizer, ema, bpe, sample_cfg, tc.final_prompts, "test", hold_out=tc.hold_out)}
        with open(os.path.join(tc.out_dir, "report.json"), "w") as f:
            json.dump(res, f, indent=1)
        print("final report (test prompts):\n" + data.report(res, multiline=True))
        print(f"sample grid: {path}\ntotal time {(time.time() - t0) / 60:.1f} min")
    plot_losses(run, tc.out_dir)

STAGES = ("tokenizer", "flow")

def trim_log(path, stage, step):
    """On resume: drop the log lines of the steps after the checkpoint's, which will run again."""
    if os.path.exists(path):
        rows = [json.loads(l) for l in open(path) if l.endswith("\n")]  # a line cut short by a kill: dropped
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows
                         if (STAGES.index(r["stage"]), r["step"]) <= (STAGES.index(stage), step))

def plot_losses(run, out_dir):
    """out_dir/losses.png: a chart per stage of its logged losses (log scale: they differ by orders of magnitude)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not (run.master and os.path.exists(path)):
        return
    rows = [json.loads(l) for l in open(path)]
    charts = [data.line_chart({k: ([r["step"] for r in mine], [r[k] for r in mine]) for k in mine[0] if k not in
                               ("stage", "step")}, title=f"{stage} stage: the training log", xlabel="step", logy=True)
              for stage in STAGES if (mine := [r for r in rows if r["stage"] == stage])]
    Image.fromarray(np.concatenate([np.asarray(c) for c in charts])).save(os.path.join(out_dir, "losses.png"))
    print(f"loss curves: {os.path.join(out_dir, 'losses.png')}")

if __name__ == "__main__":
    try:
        main()
    except ft.CheckpointError as e:
        sys.exit(f"error: {e}")
