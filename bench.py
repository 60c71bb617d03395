"""
Time nano FlowTok: a training step of each stage and sampling, eager vs compiled, fp32 vs bf16.

    python bench.py                                  # the device's default preset, default variants
    python bench.py --preset=B --flow_batch=256      # paper-sized flow transformer (12 x 768, 77 x 16)
    python bench.py --variants=eager-fp32,compiled-bf16 --iters=20
    python bench.py --predict                        # the gpu preset's FLOPs and minutes, on paper
    python bench.py --report                         # GPU acceptance: train, judge, time; one table
    python bench.py --check_compile                  # a compiled (inductor) training step vs eager

Prints one markdown table. Sampling is images/s with the sampling settings (--sample.*: Euler steps,
two passes per step for guidance, the decoder twice for decoder guidance) at batch 64.
"""

import os
import sys
import json
import time
import shlex
import argparse
import subprocess
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
    predict: bool = False         # print each stage's FLOPs and predicted minutes (preset auto: gpu), no timing
    check_compile: bool = False   # one training step of each stage compiled (inductor) vs eager
    report: bool = False          # train the preset within budget_minutes, judge it, time the B flow step
    budget_minutes: float = 9.0   # --report: wall clock for it all; a schedule that does not fit is shortened
    out_dir: str = "out-report"   # --report: train.py's run; report.md lands here, or in $OUT when set
    train_args: str = ""          # --report: more flags for train.py, e.g. "--final_prompts=50"

    def __post_init__(self):
        ft.check_ranges(self, positive=("tokenizer_batch", "flow_batch", "iters", "budget_minutes"))

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = {"": (BenchConfig, "benchmark"), "tokenizer.": (ft.TokenizerConfig, "image tokenizer"),
            "flow.": (ft.FlowConfig, "text side and flow transformer"), "sample.": (ft.SampleConfig, "sampling")}

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

def bench_variant(bc, tokenizer_cfg, flow_cfg, s, compiled, bf16, parts=("tokenizer", "flow", "sampling")):
    """{measurement: (seconds, images/s, FLOP/s or None)} for one variant, of the named parts."""
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

    if "tokenizer" in parts:
        img, captions, _ = world.batch(bc.tokenizer_batch)
        ids = bpe.encode(captions).to(dev)
        dt = timed(step_fn(tokenizer, lambda net: net(img, ids)), bc.iters, dev)
        rows["tokenizer step"] = (dt, bc.tokenizer_batch / dt, tokenizer.flops() * bc.tokenizer_batch / dt)

    img, captions, _ = world.batch(bc.flow_batch)
    ids = bpe.encode(captions).to(dev)
    tokenizer.requires_grad_(False)
    z = tokenizer.latents(img).float()  # the latent pool's case: pictures encoded once
    if "flow" in parts:
        dt = timed(step_fn(model, lambda net: net(ids, z, ids)), bc.iters, dev)
        rows["flow step"] = (dt, bc.flow_batch / dt, model.flops() * bc.flow_batch / dt)
    if "sampling" not in parts:
        return rows

    # sampling: text encoder -> 2 x steps flow passes -> tokenizer decoder (twice, with decoder guidance),
    # then the re-encode rounds (encoder + decoder twice each)
    prompts = (captions * (64 // len(captions) + 1))[:64]
    if compiled:  # the flow transformer is what runs 2 x steps times
        model.flow = torch.compile(model.flow)

    def sample():
        with autocast:
            return ft.text_to_image(tokenizer, model, bpe, prompts, s)
    dt = timed(sample, max(3, bc.iters // 4), dev)
    rows[f"sampling ({s.steps} steps)"] = (dt, 64 / dt, None)
    return rows

def train_settings(preset, *args):
    """{section: settings} that train.py runs a preset with, from their one home: train.py itself, asked
    in a subprocess (drivers never import each other)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), f"--preset={preset}", *args, "--print_settings"],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr.strip().splitlines()[-1])
    return json.loads(r.stdout)

def predict(st, peak):
    """A training run on paper, as a markdown table: each stage's FLOPs per step from the models'
    flops() at their real sizes, and its minutes at 30% and 50% MFU of `peak` FLOP/s."""
    tc = st["train"]
    with torch.device("meta"):  # real sizes, built without memory or time (bpe_vocab: the vocabulary at most)
        tokenizer = ft.ImageTokenizer(ft.TokenizerConfig(**st["tokenizer"]), tc["bpe_vocab"])
        c = tokenizer.cfg
        model = ft.FlowTok(ft.FlowConfig(**st["flow"]), tc["bpe_vocab"], c.num_tokens, c.token_dim)
    pool = 0 if tc["data"] else tc["latent_pool"]  # pictures encoded once; without a pool every flow batch is
    encode, accum = tokenizer.flops(train=False), tc["grad_accum"]
    stages = [("tokenizer", ft.param_count(tokenizer), tokenizer.flops() * tc["tokenizer_batch"] * accum, tc["tokenizer_steps"]),
              (f"latent pool ({pool} pictures, once)", 0, encode * pool, 1),
              ("flow", ft.param_count(model), (model.flops() + (not pool) * encode) * tc["flow_batch"] * accum, tc["flow_steps"])]
    stages.append(("total", 0, None, sum(flops * steps for _, _, flops, steps in stages)))  # total: FLOPs in 'steps'
    lines = [f"Prediction on paper, not a measurement: preset {tc['preset']} at {peak / 1e12:.0f} TFLOP/s peak; "
             "training matmuls only (no data, evaluation or compilation time).",
             "| stage | parameters | GFLOP per step | steps | PFLOP | min at 30% MFU | min at 50% MFU |",
             "|---|---|---|---|---|---|---|"]
    for name, n, flops, steps in stages:
        run = steps if flops is None else flops * steps
        lines.append(f"| {name} | {f'{n / 1e6:.1f}M' if n else '-'} | {'-' if flops is None else f'{flops / 1e9:.1f}'} | "
                     f"{'-' if flops is None else steps} | {run / 1e15:.2f} | {run / (0.3 * peak) / 60:.2f} | "
                     f"{run / (0.5 * peak) / 60:.2f} |")
    return "\n".join(lines)

def timing_rows(bc, tokenizer_cfg, flow_cfg, s, variants, peak, parts=("tokenizer", "flow", "sampling")):
    """(variant, measurement, ms, images/s, TFLOP/s, MFU) as strings, one row per measurement."""
    for v in variants:
        rows = bench_variant(bc, tokenizer_cfg, flow_cfg, s, v.startswith("compiled"), v.endswith("bf16"), parts)
        for name, (dt, ips, flops) in rows.items():
            yield (v, name, f"{1000 * dt:.1f}", f"{ips:.0f}", f"{flops / 1e12:.2f}" if flops else "-",
                   f"{100 * flops / peak:.1f}%" if (flops and peak) else "-")

def report(bc, dev, s, variants, peak, machine):
    """The acceptance run: (c) time the flow step, (a) train the preset end to end in what is left of
    the budget, (b) read its judged final report, (d) one markdown table, printed and written."""
    t0, extra = time.time(), shlex.split(bc.train_args)
    st = train_settings(bc.preset, *extra)
    tc, tokenizer_cfg, flow_cfg = st["train"], ft.TokenizerConfig(**st["tokenizer"]), ft.FlowConfig(**st["flow"])
    print(predict(st, peak or 989e12), flush=True)
    # (c) first, so that training gets whatever time it leaves. B is the paper's size; off CUDA the
    # trained preset's flow is timed instead (a B step takes a CPU seconds)
    tb, tcfg, fcfg, _ = ft.parse_settings(argparse.ArgumentParser(), SECTIONS, [
        f"--preset={'B' if dev.type == 'cuda' else bc.preset}", f"--device={bc.device}", f"--iters={bc.iters}"])[0].values()
    timing = list(timing_rows(tb, tcfg, fcfg, s, variants, peak, ("flow",)))
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # train.py runs next, in its own process
    # (a) the schedule: the preset's eager steps timed now, in train.py's precision (compiled ones are
    # faster); steps get half of the budget left, compiling, the latent pool and evaluations the rest
    bf16 = ft.mixed_precision(dev, tc["bf16"])[0]
    plan = bench_variant(dataclasses.replace(bc, tokenizer_batch=tc["tokenizer_batch"], flow_batch=tc["flow_batch"],
                         iters=3), tokenizer_cfg, flow_cfg, s, False, bf16, ("tokenizer", "flow"))
    need = tc["grad_accum"] * (tc["tokenizer_steps"] * plan["tokenizer step"][0] + tc["flow_steps"] * plan["flow step"][0])
    share = max(0.0, min(1.0, 0.5 * (60 * bc.budget_minutes - (time.time() - t0)) / need))
    steps = {k: max(1, int(share * tc[k])) for k in ("tokenizer_steps", "flow_steps")}
    args = [f"--preset={bc.preset}", f"--out_dir={bc.out_dir}", f"--device={bc.device}",
            *(f"--{k}={v}" for k, v in steps.items()), *extra]
    print(f"schedule: {'full' if share == 1 else f'SHORTENED to {100 * share:.0f}% to fit {bc.budget_minutes:g} min'}"
          f" (eager steps measured: full schedule {need / 60:.1f} min)\npython train.py {' '.join(args)}", flush=True)
    t1 = time.time()
    if subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args]).returncode:
        sys.exit("error: train.py failed (its output is above)")
    with open(os.path.join(bc.out_dir, "report.json")) as f:
        res = json.load(f)
    # (b) + (d)
    recon = "recon" if "recon_seen" in res else "recon_blind"  # with the caption, for a text-aware decoder

    def pair(key, field):
        return f"seen {res[key + '_seen'][field]:.3f} / held-out {res[key + '_heldout'][field]:.3f}"
    rows = [("machine", f"{machine}, torch {torch.__version__}, budget {bc.budget_minutes:g} min"),
            ("schedule", f"preset {bc.preset}: tokenizer {steps['tokenizer_steps']}/{tc['tokenizer_steps']} steps, "
                         f"flow {steps['flow_steps']}/{tc['flow_steps']} " + ("(full)" if share == 1 else
                         "(SHORTENED to fit the budget)")),
            ("train.py, wall clock", f"{(time.time() - t1) / 60:.1f} min (compilation and evaluations included)"),
            ("reconstructions: judge accuracy", pair(recon, "overall")), ("reconstructions: PSNR dB", pair(recon, "psnr"))]
    rows += [(f"{name}: {family}", pair(key, family)) for key, name in (("t2i", "text -> image"), ("i2t", "image -> text"))
             for family in res[f"{key}_seen"]]
    rows += [(f"{'B' if dev.type == 'cuda' else bc.preset} flow step ({fcfg.depth} x {fcfg.width}, batch "
              f"{tb.flow_batch}), {v}", f"{ms} ms, {ips} img/s, {tflops} TFLOP/s, MFU {mfu}")
             for v, _, ms, ips, tflops, mfu in timing]
    table = "| measurement | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    path = os.path.join(os.environ.get("OUT") or bc.out_dir, "report.md")
    with open(path, "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\n\nwritten to {path}; total {(time.time() - t0) / 60:.1f} min")

def check_compile(bc, tokenizer_cfg, flow_cfg, tol=1e-4):
    """A training step of each stage compiled by inductor against eager, from the same weights and the
    same random draws: the loss and every gradient must agree within tol of the largest of them."""
    import torch._inductor.config
    torch._inductor.config.fallback_random = True  # draw with eager's generator: inductor's own draws differ
    dev = ft.pick_device(bc.device)
    img, captions, _ = data.ShapesWorld(tokenizer_cfg.image_size, seed=0, device=dev).batch(bc.tokenizer_batch)
    bpe = ft.TextTokenizer.train(captions, tokenizer_cfg.num_tokens)
    ids, K, C = bpe.encode(captions).to(dev), tokenizer_cfg.num_tokens, tokenizer_cfg.token_dim
    stages = {"tokenizer": (lambda: ft.ImageTokenizer(tokenizer_cfg, bpe.vocab_size), (img, ids)),
              "flow": (lambda: ft.FlowTok(flow_cfg, bpe.vocab_size, K, C), (ids, torch.randn(len(ids), K, C, device=dev), ids))}
    worst = 0.0
    for name, (build, inputs) in stages.items():
        out = []
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build().to(dev)
            torch.manual_seed(1)
            loss, _ = (torch.compile(model) if compiled else model)(*inputs)
            loss.backward()
            out.append(torch.cat([loss.detach().view(1)] + [p.grad.flatten() for p in model.parameters()]))
        err = ((out[1] - out[0]).abs().max() / out[0].abs().max()).item()
        worst = max(worst, err)
        print(f"{name} step: loss eager {out[0][0]:.6f}, compiled {out[1][0]:.6f}; largest difference in the loss "
              f"and gradients {err:.1e} of the largest value (tolerance {tol:g})", flush=True)
    if worst > tol:
        sys.exit(f"error: the compiled step differs from eager by {worst:.1e} > {tol:g}")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configs, cli = ft.parse_settings(p, SECTIONS, argv)
    bc, tokenizer_cfg, flow_cfg, s = configs.values()
    dev = ft.pick_device(bc.device)
    peak = (bc.peak_tflops or (989.0 if dev.type == "cuda" else 0.0)) * 1e12
    if bc.predict:  # on paper: the gpu preset unless another is named, at an H100/H200's peak unless told
        return print(predict(train_settings(cli.get("preset", "gpu")), bc.peak_tflops * 1e12 or 989e12))
    if bc.check_compile:
        return check_compile(bc, tokenizer_cfg, flow_cfg)
    # eager bf16 only where it is faster on this CPU: emulated, one row can take minutes
    variants = bc.variants.split(",") if bc.variants else ["eager-fp32"] + (
        ["eager-bf16", "compiled-fp32", "compiled-bf16"] if dev.type == "cuda" else ["eager-bf16"] * ft.cpu_bf16_is_faster())
    for v in variants:
        if v not in ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16"):
            p.error(f"unknown variant {v!r}: use eager|compiled - fp32|bf16")
    cpu = torch.cpu.get_capabilities().get("cpu_name", "") if dev.type == "cpu" else torch.cuda.get_device_name()
    machine = f"{dev} ({cpu}), {torch.get_num_threads()} threads"
    if bc.report:
        return report(bc, dev, s, variants, peak, machine)
    print(f"{machine}, preset {bc.preset}, torch {torch.__version__}")
    print("| variant | measurement | ms | images/s | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for row in timing_rows(bc, tokenizer_cfg, flow_cfg, s, variants, peak):
        print("| " + " | ".join(row) + " |", flush=True)

if __name__ == "__main__":
    main()
