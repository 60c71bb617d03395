"""
Time nano FlowTok: a training step of each stage and sampling, eager vs compiled, fp32 vs bf16.

    python bench.py                                  # the device's default preset, default variants
    python bench.py --preset=B --flow_batch=256      # paper-sized flow transformer (12 x 768, 77 x 16)
    python bench.py --variants=eager-fp32,compiled-bf16 --iters=20

Any train.py setting can be passed through. Prints one markdown table. Sampling is images/s at
--sample_steps Euler steps (20) with CFG (two passes per step) at batch 64, decoder included.
"""

import sys
import time
import argparse
import dataclasses

import torch

import flowtok as ft
import data
import train


def timed(fn, iters, dev):
    """Median seconds per call after warm-up (the first calls compile, allocate, autotune)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_variant(tc, tok_cfg, flow_overrides, compiled, bf16, iters):
    tc.compile, tc.bf16 = str(compiled), str(bf16)
    run = train.Run(tc)
    dev = run.dev
    world = data.ShapesWorld(tok_cfg.image_size, seed=0, device=dev)
    text_tok = ft.TextTokenizer.train([data.caption(s) for s in world.sample_specs(2000)], tok_cfg.num_tokens)
    tok = ft.ImageTokenizer(dataclasses.replace(tok_cfg, vocab_size=text_tok.vocab_size)).to(dev)
    model = ft.FlowTok(ft.FlowConfig(**{**flow_overrides, "vocab_size": text_tok.vocab_size,
                                        "num_tokens": tok_cfg.num_tokens, "token_dim": tok_cfg.token_dim})).to(dev)
    rows = {}

    def step_fn(module, loss_fn, lr):
        opt = train.make_optimizer(module, lr, 0.0, dev)
        net = run.wrap(module)

        def step():
            with run.autocast, run.attention():
                loss, _ = loss_fn(net)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    img, captions, _ = world.batch(tc.tok_batch)
    ids = text_tok.encode(captions).to(dev)
    dt = timed(step_fn(tok, lambda net: net(img, ids), tc.tok_lr), iters, dev)
    rows["tokenizer step"] = (dt, tc.tok_batch / dt, tok.flops() * tc.tok_batch / dt)

    img, captions, _ = world.batch(tc.flow_batch)
    ids = text_tok.encode(captions).to(dev)
    tok.requires_grad_(False)

    def flow_loss(net):
        return net(ids, tok.latents(img).float(), ids)
    dt = timed(step_fn(model, flow_loss, tc.flow_lr), iters, dev)
    rows["flow step"] = (dt, tc.flow_batch / dt, (model.flops() + tok.flops(train=False)) * tc.flow_batch / dt)
    # what --latent_cache saves: the same step with the image latents already computed
    z = tok.latents(img).float()
    dt = timed(step_fn(model, lambda net: net(ids, z, ids), tc.flow_lr), iters, dev)
    rows["flow step, cached latents"] = (dt, tc.flow_batch / dt, model.flops() * tc.flow_batch / dt)

    # sampling: text encoder -> 2 x steps flow passes (CFG) -> tokenizer decoder (twice, with decoder
    # guidance), batch 64
    sample_ids = text_tok.encode(captions[:64] * (64 // len(captions[:64]) + 1))[:64].to(dev)
    if run.compile:  # the flow transformer is what runs 2 x steps times; nothing is saved here
        model.flow = torch.compile(model.flow)

    @torch.no_grad()
    def sample():
        with run.autocast:
            z = model.generate(sample_ids, tc.sample_steps, tc.cfg_scale).float()
            return tok.images(z, sample_ids, tc.dec_guidance)
    dt = timed(sample, max(3, iters // 4), dev)
    rows[f"sampling ({tc.sample_steps} steps, cfg)"] = (dt, 64 / dt, None)
    return run, rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=None,
                   help="comma list of eager-fp32, eager-bf16, compiled-fp32, compiled-bf16 "
                        "(default: all four on CUDA, eager-fp32 and eager-bf16 elsewhere)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement (median)")
    args, rest = p.parse_known_args()
    tc, tok_cfg, flow_overrides, _ = train.parse_args(rest)
    cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda")
    variants = args.variants.split(",") if args.variants else \
        (["eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16"] if cuda else ["eager-fp32", "eager-bf16"])
    print("| variant | measurement | ms | images/s | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for v in variants:
        mode, precision = v.split("-")
        if mode not in ("eager", "compiled") or precision not in ("fp32", "bf16"):
            sys.exit(f"error: unknown variant {v!r}: use eager|compiled - fp32|bf16")
        run, rows = bench_variant(tc, tok_cfg, dict(flow_overrides), mode == "compiled", precision == "bf16",
                                  args.iters)
        for name, (dt, ips, flops) in rows.items():
            tflops = f"{flops / 1e12:.2f}" if flops else "-"
            mfu = f"{100 * flops / run.peak:.1f}%" if (flops and run.peak) else "-"
            print(f"| {v} | {name} | {1000 * dt:.1f} | {ips:.0f} | {tflops} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
