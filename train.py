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
import math
import copy
import argparse
import dataclasses
from contextlib import nullcontext

import torch

import flowtok as ft
import data
from sample import (save_checkpoint, load_checkpoint, evaluate, evaluate_tokenizer, report, save_grid,
                    CheckpointError)


@dataclasses.dataclass
class TrainConfig:
    preset: str = "auto"          # auto: 'gpu' on CUDA, 'cpu' otherwise
    stage: str = "all"            # all | tokenizer | flow
    out_dir: str = "out"
    device: str = "auto"          # auto: cuda -> mps -> cpu
    seed: int = 1337
    resume: bool = False          # continue from out_dir/ckpt.pt
    hold_out: bool = True         # keep the four held-out colour-shape pairs out of training
    text_tokenizer: str = "bpe"   # bpe (trained on the captions, offline) | gpt2 (needs tiktoken's cache)
    bpe_vocab: int = 512
    # tokenizer stage
    tok_steps: int = 3000
    tok_batch: int = 32
    tok_lr: float = 2e-3
    # flow stage
    flow_steps: int = 3000
    flow_batch: int = 128
    flow_lr: float = 6e-4
    ema_decay: float = 0.999
    # both stages
    warmup: int = 100             # linear warm-up steps
    cooldown: float = 0.2         # fraction of steps at the end with a linear decay to 0 (worth +3 dB)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # logging, evaluation, sampling
    log_interval: int = 50
    eval_interval: int = 1000     # flow steps between evaluations (and sample grids)
    eval_prompts: int = 20        # per family and split, periodic evaluations
    final_prompts: int = 100      # per family and split, the final report
    sample_steps: int = 20        # Euler steps
    cfg_scale: float = 2.0
    from_mean: bool = False       # start sampling at the text latent's mean instead of a sample
    # speed switches (auto = on where it helps: CUDA)
    bf16: str = "auto"
    compile: str = "auto"
    tf32: bool = True


# Named presets: each overrides a few fields. 'cpu' finishes on a 2-core CPU in <= 30 minutes.
PRESETS = {
    "cpu": {},
    "gpu": {"tok_steps": 6000, "tok_batch": 128, "tok_lr": 1e-3, "flow_steps": 8000, "flow_batch": 256,
            "tok.width": 256, "tok.enc_depth": 4, "tok.dec_depth": 6, "flow.width": 384, "flow.depth": 8,
            "flow.n_head": 6, "eval_interval": 2000},
    # for tests and smoke runs: seconds, not a useful model
    "tiny": {"tok_steps": 20, "tok_batch": 8, "flow_steps": 20, "flow_batch": 16, "warmup": 5,
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


def add_fields(parser, cls, prefix, title):
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        kind = str2bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        group.add_argument(f"--{prefix}{f.name}", type=kind, default=None, metavar=f.type if isinstance(f.type, str) else f.type.__name__,
                           help=f"default {f.default!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train nano FlowTok on the shapes world.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    return tc, ft.TokenizerConfig(**split("tok.")), split("flow.")

# -----------------------------------------------------------------------------
# device and speed switches, all in one place


def setup(tc):
    if tc.device == "auto":
        tc.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(tc.device)
    torch.manual_seed(tc.seed)
    torch.set_flush_denormal(True)  # CPU: denormals made steps 3-5x slower at random
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    use_bf16 = (dev.type == "cuda" and torch.cuda.is_bf16_supported()) if tc.bf16 == "auto" else str2bool(tc.bf16)
    use_compile = dev.type == "cuda" if tc.compile == "auto" else str2bool(tc.compile)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    print(f"device {dev} | preset {tc.preset} | bf16 {use_bf16} | compile {use_compile} | threads {torch.get_num_threads()}")
    return dev, autocast, use_compile


def make_optimizer(model, lr, weight_decay, dev):
    # decay only matrices (not biases, norms, embeddings of size 1-D); fused AdamW on CUDA
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=dev.type == "cuda")


def lr_at(step, total, peak, tc):
    """Warm-up, constant, then a linear cool-down over the last `cooldown` fraction of the run."""
    if step < tc.warmup:
        return peak * (step + 1) / tc.warmup
    cool_start = int(total * (1 - tc.cooldown))
    if step >= cool_start:
        return peak * max(0.0, (total - step) / max(1, total - cool_start))
    return peak


class Logger:
    """One line per interval: stage, step, losses, ms/step over the interval, images/s, ETA."""
    def __init__(self, stage, total, batch, start_step):
        self.stage, self.total, self.batch = stage, total, batch
        self.t_start = self.t_last = time.time()
        self.step_start = self.step_last = start_step

    def line(self, step, stats):
        now = time.time()
        ms = 1000 * (now - self.t_last) / max(1, step + 1 - self.step_last)
        eta = (now - self.t_start) / max(1, step + 1 - self.step_start) * (self.total - step - 1)
        self.t_last, self.step_last = now, step + 1
        losses = " ".join(f"{k} {v.item():.4f}" for k, v in stats.items())  # .item() syncs: log time only
        print(f"{self.stage} {step + 1}/{self.total} | {losses} | {ms:.0f} ms/step | "
              f"{self.batch * 1000 / ms:.0f} img/s | ETA {int(eta // 60)}:{int(eta % 60):02d}", flush=True)


# -----------------------------------------------------------------------------
# stage 1: the image tokenizer


def train_tokenizer(tc, tok, world, state, dev, autocast, use_compile):
    opt = make_optimizer(tok, tc.tok_lr, tc.weight_decay, dev)
    step = 0
    if state.get("stage") == "tokenizer":
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    fwd = torch.compile(tok) if use_compile else tok
    log = Logger("tokenizer", tc.tok_steps, tc.tok_batch, step)
    while step < tc.tok_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc.tok_steps, tc.tok_lr, tc)
        img, _, _ = world.batch(tc.tok_batch)
        with autocast:
            loss, stats = fwd(img)
        check_finite(loss, "tokenizer", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), tc.grad_clip)
        opt.step()
        if (step + 1) % tc.log_interval == 0 or step + 1 == tc.tok_steps:
            log.line(step, {"loss": loss, **stats})
        step += 1
        if step % tc.eval_interval == 0 or step == tc.tok_steps:
            state.update(stage="tokenizer", step=step, tokenizer=tok.state_dict(), optimizer=opt.state_dict(),
                         world=world.state_dict(), rng=torch.get_rng_state())
            save_checkpoint(state, tc.out_dir)
    # after training: scale latents to unit std for the flow, measured on fresh training images
    scale = tok.fit_scale([world.batch(256)[0] for _ in range(4)])
    print(f"tokenizer latent scale factor {scale:.4f}")
    state.update(stage="flow", step=0, tokenizer=tok.state_dict(), optimizer=None, world=world.state_dict())
    save_checkpoint(state, tc.out_dir)

# -----------------------------------------------------------------------------
# stage 2: text encoder/decoder + flow transformer on the frozen tokenizer's latents


def check_finite(loss, stage, step):
    if not torch.isfinite(loss):
        sys.exit(f"error: {stage} loss became {loss.item()} at step {step}; the last good checkpoint is kept. "
                 "Lower the learning rate or turn off bf16 (--bf16=False), then --resume.")


def train_flow(tc, tok, model, ema, text_tok, world, state, dev, autocast, use_compile):
    opt = make_optimizer(model, tc.flow_lr, tc.weight_decay, dev)
    step = 0
    if state.get("stage") == "flow" and state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    fwd = torch.compile(model) if use_compile else model
    log = Logger("flow", tc.flow_steps, tc.flow_batch, step)
    t_start = time.time() - state.get("flow_seconds", 0.0)
    tok.eval().requires_grad_(False)
    while step < tc.flow_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc.flow_steps, tc.flow_lr, tc)
        img, captions, specs = world.batch(tc.flow_batch)
        ids = text_tok.encode(captions).to(dev, non_blocking=True)
        ids_i2t = text_tok.encode([data.caption(data.normalize(s)) for s in specs]).to(dev, non_blocking=True)
        with autocast:
            z_img = tok.latents(img).float()
            loss, stats = fwd(ids, z_img, ids_i2t)
        check_finite(loss, "flow", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        # EMA with a warm-up of its decay, so a short run's EMA is not stuck near the init
        decay = min(tc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        if (step + 1) % tc.log_interval == 0 or step + 1 == tc.flow_steps:
            log.line(step, {"loss": loss, **stats})
        step += 1
        if step % tc.eval_interval == 0 or step == tc.flow_steps:
            state.update(stage="flow", step=step, flow=model.state_dict(), ema=ema.state_dict(),
                         optimizer=opt.state_dict(), world=world.state_dict(), rng=torch.get_rng_state(),
                         flow_seconds=time.time() - t_start)
            save_checkpoint(state, tc.out_dir)
            res = evaluate(tok, ema, text_tok, tc, dev, tc.eval_prompts, directions=("t2i",))
            res.update(step=step, minutes=(time.time() - t_start) / 60)
            with open(os.path.join(tc.out_dir, "evals.jsonl"), "a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"eval @ {step} ({res['minutes']:.1f} flow min): " + report(res), flush=True)
            grid_prompts(tok, ema, text_tok, tc, dev, os.path.join(tc.out_dir, f"samples_{step:06d}.png"))
    state.update(stage="done")
    save_checkpoint(state, tc.out_dir)


def grid_prompts(tok, model, text_tok, tc, dev, path, n=16):
    """A labelled grid: fixed prompts (seen and held-out) with the generated picture above each."""
    specs = data.eval_specs("seen", n // 4, seed=7) + data.eval_specs("heldout", n // 4, seed=7)
    specs = specs[:n]
    prompts = [data.caption(s) for s in specs]
    g = torch.Generator(dev).manual_seed(0)
    z = model.generate(text_tok.encode(prompts).to(dev), tc.sample_steps, tc.cfg_scale, tc.from_mean, g)
    save_grid(tok.images(z), prompts, path)

# -----------------------------------------------------------------------------


def main(argv=None):
    tc, tok_cfg, flow_overrides = parse_args(argv)
    dev, autocast, use_compile = setup(tc)
    os.makedirs(tc.out_dir, exist_ok=True)
    t0 = time.time()
    state = {}
    if tc.resume:
        state = load_checkpoint(os.path.join(tc.out_dir, "ckpt.pt"))
        tok_cfg = ft.TokenizerConfig(**state["tok_cfg"])
        torch.set_rng_state(state["rng"])
        print(f"resuming from {tc.out_dir}/ckpt.pt: stage {state['stage']}, step {state['step']}")
    world = data.ShapesWorld(tok_cfg.image_size, hold_out=tc.hold_out, seed=tc.seed, device=dev)
    if state.get("world"):
        world.load_state_dict(state["world"])
    tok = ft.ImageTokenizer(tok_cfg).to(dev)
    print(f"image tokenizer: {ft.param_count(tok) / 1e6:.2f}M parameters, {tok_cfg.num_tokens} x {tok_cfg.token_dim} latent")
    if state.get("tokenizer"):
        tok.load_state_dict(state["tokenizer"])
    state.setdefault("tok_cfg", dataclasses.asdict(tok_cfg))
    state.setdefault("train_cfg", dataclasses.asdict(tc))

    if tc.stage in ("all", "tokenizer") and state.get("stage") in (None, "tokenizer"):
        train_tokenizer(tc, tok, world, state, dev, autocast, use_compile)
        print(f"tokenizer stage done in {(time.time() - t0) / 60:.1f} min")
        res = evaluate_tokenizer(tok, dev, tc.final_prompts)
        print("tokenizer reconstructions: " + report(res), flush=True)
    if tc.stage == "tokenizer":
        return
    if not state.get("tokenizer"):
        sys.exit(f"error: no trained tokenizer in {tc.out_dir}/ckpt.pt: run python train.py --stage=tokenizer first")

    # text tokenizer: trained on a sample of the training captions (seconds), stored in the checkpoint
    if state.get("text_tokenizer"):
        text_tok = ft.TextTokenizer.from_state_dict(state["text_tokenizer"])
    elif tc.text_tokenizer == "bpe":
        text_tok = ft.TextTokenizer.train([data.caption(s) for s in world.sample_specs(20000)],
                                          tok_cfg.num_tokens, tc.bpe_vocab)
    else:
        text_tok = ft.TextTokenizer(tok_cfg.num_tokens, tc.text_tokenizer)
    state["text_tokenizer"] = text_tok.state_dict()
    flow_cfg = ft.FlowConfig(**{**state.get("flow_cfg", flow_overrides), "vocab_size": text_tok.vocab_size,
                                "num_tokens": tok_cfg.num_tokens, "token_dim": tok_cfg.token_dim})
    state["flow_cfg"] = dataclasses.asdict(flow_cfg)
    model = ft.FlowTok(flow_cfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    if state.get("flow"):
        model.load_state_dict(state["flow"])
        ema.load_state_dict(state["ema"])
    print(f"text tokenizer: {text_tok.kind}, vocab {text_tok.vocab_size}; flow model: "
          f"{ft.param_count(model.flow) / 1e6:.2f}M flow transformer, {ft.param_count(model) / 1e6:.2f}M in all")
    if state.get("stage") != "done":
        train_flow(tc, tok, model, ema, text_tok, world, state, dev, autocast, use_compile)
    print(f"flow stage done; {(time.time() - t0) / 60:.1f} min so far")

    res = evaluate(tok, ema, text_tok, tc, dev, tc.final_prompts)
    with open(os.path.join(tc.out_dir, "report.json"), "w") as f:
        json.dump(res, f, indent=1)
    path = os.path.join(tc.out_dir, "samples_final.png")
    grid_prompts(tok, ema, text_tok, tc, dev, path)
    print("final report:\n" + report(res, multiline=True))
    print(f"sample grid: {path}\ntotal time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
