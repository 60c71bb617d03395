"""
Time nano FlowTok: a training step of each stage and sampling, eager vs compiled, fp32 vs bf16.

    python bench.py                                  # the device's default preset, default variants
    python bench.py --preset=B --flow_batch=256      # paper-sized flow transformer (12 x 768, 77 x 16)
    python bench.py --variants=eager-fp32,compiled-bf16 --iters=20

Prints one markdown table. Sampling is images/s with the sampling settings (--sample.*: Euler steps,
two passes per step for guidance, the decoder twice for decoder guidance) at batch 64.
"""

import time
import argparse
import dataclasses

import torch

import flowtok as ft
import data


@dataclasses.dataclass
class BenchConfig:
    preset: str = "auto"          # model sizes and batches of a flowtok.PRESETS entry; auto: gpu on CUDA, else cpu
    device: str = "auto"          # auto: cuda -> mps -> cpu
    tokenizer_batch: int = 32     # pictures per tokenizer step (the cpu preset's)
    flow_batch: int = 128         # (caption, picture) pairs per flow step (the cpu preset's)
    variants: str = ""            # comma list of eager-fp32, eager-bf16, compiled-fp32, compiled-bf16
                                  # (empty: all four on CUDA, the two eager ones elsewhere)
    iters: int = 10               # timed iterations per measurement (median)
    peak_tflops: float = 0.0      # for MFU; 0 = 989 (H100/H200 bf16 dense) on CUDA, not shown elsewhere

    def __post_init__(self):
        ft.check_ranges(self, positive=("tokenizer_batch", "flow_batch", "iters"))


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


def bench_variant(bc, tokenizer_cfg, flow_cfg, s, compiled, bf16):
    """{measurement: (seconds, images/s, FLOP/s or None)} for one variant."""
    dev = ft.pick_device(bc.device)
    torch.manual_seed(0)
    _, _, autocast, _ = ft.mixed_precision(dev, bf16)
    world = data.ShapesWorld(tokenizer_cfg.image_size, seed=0, device=dev)
    bpe = ft.TextTokenizer.train([data.caption(x) for x in world.sample_specs(2000)], tokenizer_cfg.num_tokens)
    tokenizer = ft.ImageTokenizer(tokenizer_cfg, bpe.vocab_size).to(dev)
    model = ft.FlowTok(flow_cfg, bpe.vocab_size, tokenizer_cfg.num_tokens, tokenizer_cfg.token_dim).to(dev)
    for m in (tokenizer, model):
        ft.use_manual_attention(m, bf16 and dev.type == "cpu")  # as train.py does
    rows = {}

    def step_fn(module, loss_fn):
        opt = ft.make_optimizer(module, 1e-4, 0.0, dev)
        net = torch.compile(module) if compiled else module

        def step():
            with autocast:
                loss, _ = loss_fn(net)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    img, captions, _ = world.batch(bc.tokenizer_batch)
    ids = bpe.encode(captions).to(dev)
    dt = timed(step_fn(tokenizer, lambda net: net(img, ids)), bc.iters, dev)
    rows["tokenizer step"] = (dt, bc.tokenizer_batch / dt, tokenizer.flops() * bc.tokenizer_batch / dt)

    img, captions, _ = world.batch(bc.flow_batch)
    ids = bpe.encode(captions).to(dev)
    tokenizer.requires_grad_(False)
    z = tokenizer.latents(img).float()  # the latent pool's case: pictures encoded once
    dt = timed(step_fn(model, lambda net: net(ids, z, ids)), bc.iters, dev)
    rows["flow step"] = (dt, bc.flow_batch / dt, model.flops() * bc.flow_batch / dt)

    # sampling: text encoder -> 2 x steps flow passes -> tokenizer decoder (twice, with decoder guidance)
    sample_ids = bpe.encode((captions * (64 // len(captions) + 1))[:64]).to(dev)
    if compiled:  # the flow transformer is what runs 2 x steps times
        model.flow = torch.compile(model.flow)

    @torch.no_grad()
    def sample():
        with autocast:
            z = model.generate(sample_ids, s.steps, s.guidance).float()
            return tokenizer.images(z, sample_ids, s.dec_guidance)
    dt = timed(sample, max(3, bc.iters // 4), dev)
    rows[f"sampling ({s.steps} steps)"] = (dt, 64 / dt, None)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = {"": (BenchConfig, "benchmark"), "tokenizer.": (ft.TokenizerConfig, "image tokenizer"),
                "flow.": (ft.FlowConfig, "text side and flow transformer"), "sample.": (ft.SampleConfig, "sampling")}
    (bc, tokenizer_cfg, flow_cfg, s), _ = ft.parse_settings(p, sections, argv)
    dev = ft.pick_device(bc.device)
    variants = bc.variants.split(",") if bc.variants else \
        ["eager-fp32", "eager-bf16"] + (["compiled-fp32", "compiled-bf16"] if dev.type == "cuda" else [])
    for v in variants:
        if v not in ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16"):
            p.error(f"unknown variant {v!r}: use eager|compiled - fp32|bf16")
    peak = (bc.peak_tflops or (989.0 if dev.type == "cuda" else 0.0)) * 1e12
    cpu = torch.cpu.get_capabilities().get("cpu_name", "") if dev.type == "cpu" else torch.cuda.get_device_name()
    print(f"{dev} ({cpu}), {torch.get_num_threads()} threads, preset {bc.preset}, torch {torch.__version__}")
    print("| variant | measurement | ms | images/s | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for v in variants:
        rows = bench_variant(bc, tokenizer_cfg, flow_cfg, s, v.startswith("compiled"), v.endswith("bf16"))
        for name, (dt, ips, flops) in rows.items():
            tflops = f"{flops / 1e12:.2f}" if flops else "-"
            mfu = f"{100 * flops / peak:.1f}%" if (flops and peak) else "-"
            print(f"| {v} | {name} | {1000 * dt:.1f} | {ips:.0f} | {tflops} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
