"""
Time nano FlowTok: a training step of each stage and sampling, eager vs compiled, fp32 vs bf16 (--variants); one
markdown table. Sampling is finished pictures/s of 64 captions with the sampling settings (--sample.*: Euler steps,
two passes a step for guidance, the decoder twice for decoder guidance, the re-encode rounds, the draws read back).

    python bench.py                                  # the device's default preset, default variants
    python bench.py --preset=B --flow_batch=256      # paper-sized flow transformer (12 x 768, 77 x 16)
    python bench.py --predict                        # the gpu preset's FLOPs and minutes, on paper
    python bench.py --report                         # GPU acceptance: train, judge, time; one table
    python bench.py --check_compile                  # a compiled (inductor) training step vs eager
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

import torch

import data
import flowtok as ft

@dataclasses.dataclass
class BenchConfig:
    preset: str = "auto"          # model sizes and batches of a flowtok.PRESETS entry; auto: as train.py picks
    device: str = "auto"          # auto: cuda -> mps -> cpu
    tokenizer_batch: int = 32     # pictures per tokenizer step (the cpu preset's)
    flow_batch: int = 128         # (caption, picture) pairs per flow step (the cpu preset's)
    variants: str = ""            # comma list of {eager,compiled}-{fp32,bf16}; empty: all four on CUDA, else eager
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
VARIANTS = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16")

def timed(fn, iters, dev):
    """Median seconds per call after 3 warm-up calls (the first calls compile, allocate, autotune)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for _ in range(3 + iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times[3:])[iters // 2]

def build(tokenizer_cfg, flow_cfg, dev):
    """The shapes world, a BPE trained on its captions and both models, all from seed 0."""
    torch.manual_seed(0)
    world = data.ShapesWorld(tokenizer_cfg.image_size, seed=0, device=dev)
    bpe = ft.TextTokenizer.train([data.caption(x) for x in world.sample_specs(2000)], tokenizer_cfg.num_tokens)
    tokenizer = ft.ImageTokenizer(tokenizer_cfg, bpe.vocab_size).to(dev)
    model = ft.FlowTok(flow_cfg, bpe.vocab_size, tokenizer_cfg.num_tokens, tokenizer_cfg.token_dim).to(dev)
    return world, bpe, tokenizer, model

def bench_variant(bc, tokenizer_cfg, flow_cfg, s, compiled, bf16, parts=("tokenizer", "flow", "sampling")):
    """{measurement: (seconds, images/s, FLOP/s or None)} for one variant, of the named parts."""
    dev = ft.pick_device(bc.device)
    autocast = ft.mixed_precision(dev, bf16)[2]
    world, bpe, tokenizer, model = build(tokenizer_cfg, flow_cfg, dev)
    for m in (tokenizer, model):
        ft.use_manual_attention(m, bf16 and dev.type == "cpu")  # as train.py does
    rows = {}

    def train_step(name, module, inputs, n):  # a training step on n pictures, timed
        opt = ft.make_optimizer(module, 1e-4, 0.0, dev)
        net = torch.compile(module) if compiled else module
        def step():
            with autocast:
                loss, _ = net(*inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = timed(step, bc.iters, dev)
        rows[name] = (dt, n / dt, module.flops() * n / dt)

    if "tokenizer" in parts:
        img, captions, _ = world.batch(bc.tokenizer_batch)
        train_step("tokenizer step", tokenizer, (img, bpe.encode(captions).to(dev)), bc.tokenizer_batch)
    img, captions, _ = world.batch(bc.flow_batch)
    ids = bpe.encode(captions).to(dev)
    z = tokenizer.requires_grad_(False).latents(img).float()  # the latent pool's case: pictures encoded once
    if "flow" in parts:
        train_step("flow step", model, (ids, z, ids), bc.flow_batch)
    if "sampling" in parts:  # text encoder -> 2 x steps flow passes -> decoder (twice, decoder guidance),
        prompts = (captions * (64 // len(captions) + 1))[:64]  # then the re-encode rounds
        if compiled:  # the flow transformer is what runs 2 x steps times
            model.flow = torch.compile(model.flow)
        def sample():
            with autocast:
                return ft.text_to_image(tokenizer, model, bpe, prompts, s)
        dt = timed(sample, max(3, bc.iters // 4), dev)
        rows[f"sampling ({s.steps} steps, best of {s.draws})"] = (dt, 64 / dt, None)
    return rows

def timing_rows(bc, tokenizer_cfg, flow_cfg, s, variants, peak, parts=("tokenizer", "flow", "sampling")):
    """(variant, measurement, ms, images/s, TFLOP/s, MFU) as strings, one row per measurement."""
    for v in variants:
        rows = bench_variant(bc, tokenizer_cfg, flow_cfg, s, v.startswith("compiled"), v.endswith("bf16"), parts)
        for name, (dt, ips, flops) in rows.items():
            yield (v, name, f"{1000 * dt:.1f}", f"{ips:.0f}", f"{flops / 1e12:.2f}" if flops else "-",
                   f"{100 * flops / peak:.1f}%" if (flops and peak) else "-")

def train_settings(preset, *args):
    """{section: settings} that train.py runs a preset with, from their one home: train.py itself, asked
    in a subprocess (drivers never import each other)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), f"--preset={preset}", *args,
                        "--print_settings"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr.strip().splitlines()[-1])
    return json.loads(r.stdout)

def predict(st, peak):
    """A training run on paper, as a markdown table: each stage's FLOPs per step from the models' flops() at
    their real sizes, and its minutes at 30% and 50% MFU of `peak` FLOP/s."""
    tc = st["train"]
    with torch.device("meta"):  # real sizes, built without memory or time (bpe_vocab: the vocabulary at most)
        tokenizer = ft.ImageTokenizer(ft.TokenizerConfig(**st["tokenizer"]), tc["bpe_vocab"])
        c = tokenizer.cfg
        model = ft.FlowTok(ft.FlowConfig(**st["flow"]), tc["bpe_vocab"], c.num_tokens, c.token_dim)
    pool, encode, accum = 0 if tc["data"] else tc["latent_pool"], tokenizer.flops(train=False), tc["grad_accum"]
    flow = (model.flops() + (not pool) * encode) * tc["flow_batch"] * accum  # no pool: each flow batch is encoded
    stages = [("tokenizer", ft.param_count(tokenizer), tokenizer.flops() * tc["tokenizer_batch"] * accum,
               tc["tokenizer_steps"]), (f"latent pool ({pool} pictures, once)", 0, encode * pool, 1),
              ("flow", ft.param_count(model), flow, tc["flow_steps"])]
    run = lambda flops: f"{flops / 1e15:.2f} | {flops / (0.3 * peak) / 60:.2f} | {flops / (0.5 * peak) / 60:.2f} |"
    lines = [f"Prediction on paper, not a measurement: preset {tc['preset']} at {peak / 1e12:.0f} TFLOP/s peak; "
             "training matmuls only (no data, evaluation or compilation time).",
             "| stage | parameters | GFLOP per step | steps | PFLOP | min at 30% MFU | min at 50% MFU |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {f'{n / 1e6:.1f}M' if n else '-'} | {flops / 1e9:.1f} | {steps} | {run(flops * steps)}"
              for name, n, flops, steps in stages]
    return "\n".join(lines + [f"| total | - | - | - | {run(sum(flops * steps for _, _, flops, steps in stages))}"])

def report(bc, dev, s, variants, peak, machine):
    """The acceptance run: time the flow step, train the preset end to end in what is left of the budget, and
    put its judged final report and the timings in one markdown table, printed and written."""
    t0, extra = time.time(), shlex.split(bc.train_args)
    st = train_settings(bc.preset, *extra)
    tc, tokenizer_cfg, flow_cfg = st["train"], ft.TokenizerConfig(**st["tokenizer"]), ft.FlowConfig(**st["flow"])
    print(predict(st, peak or 989e12), flush=True)
    # The timings first, so that training gets whatever time they leave: on CUDA of B, the paper's size; elsewhere
    # of the trained preset's flow (a B step takes a CPU seconds).
    timed_preset = "B" if dev.type == "cuda" else bc.preset
    tb, tcfg, fcfg, _ = ft.parse_settings(argparse.ArgumentParser(), SECTIONS, [
        f"--preset={timed_preset}", f"--device={bc.device}", f"--iters={bc.iters}"])[0].values()
    timing = list(timing_rows(tb, tcfg, fcfg, s, variants, peak, ("flow",)))
    torch.cuda.empty_cache()  # train.py runs next, in its own process (a no-op without CUDA)
    # The schedule: the preset's eager steps timed now, in train.py's precision (compiled ones are faster);
    # steps get half of the budget left, compiling, the latent pool and evaluations the rest.
    plan = bench_variant(dataclasses.replace(bc, tokenizer_batch=tc["tokenizer_batch"], flow_batch=tc["flow_batch"],
                                             iters=3), tokenizer_cfg, flow_cfg, s, False,
                         ft.mixed_precision(dev, tc["bf16"])[0], ("tokenizer", "flow"))
    need = tc["grad_accum"] * (tc["tokenizer_steps"] * plan["tokenizer step"][0]
                               + tc["flow_steps"] * plan["flow step"][0])
    share = max(0.0, min(1.0, 0.5 * (60 * bc.budget_minutes - (time.time() - t0)) / need))
    steps = {k: max(1, int(share * tc[k])) for k in ("tokenizer_steps", "flow_steps")}
    args = [f"--preset={bc.preset}", f"--out_dir={bc.out_dir}", f"--device={bc.device}",
            *(f"--{k}={v}" for k, v in steps.items()), *extra]
    fits = "full" if share == 1 else f"SHORTENED to {100 * share:.0f}% to fit {bc.budget_minutes:g} min"
    print(f"schedule: {fits} (eager steps measured: full schedule {need / 60:.1f} min)\n"
          f"python train.py {' '.join(args)}", flush=True)
    t1 = time.time()
    if subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args]).returncode:
        sys.exit("error: train.py failed (its output is above)")
    with open(os.path.join(bc.out_dir, "report.json")) as f:
        res = json.load(f)
    recon = "recon" if "recon_seen" in res else "recon_blind"  # with the caption, for a text-aware decoder
    pair = lambda key, field: f"seen {res[key + '_seen'][field]:.3f} / held-out {res[key + '_heldout'][field]:.3f}"
    rows = [("machine", f"{machine}, torch {torch.__version__}, budget {bc.budget_minutes:g} min"),
            ("schedule", f"preset {bc.preset}: tokenizer {steps['tokenizer_steps']}/{tc['tokenizer_steps']} steps, "
                         f"flow {steps['flow_steps']}/{tc['flow_steps']} "
                         + ("(full)" if share == 1 else "(SHORTENED to fit the budget)")),
            ("train.py, wall clock", f"{(time.time() - t1) / 60:.1f} min (compilation and evaluations included)"),
            ("reconstructions: judge accuracy", pair(recon, "overall")),
            ("reconstructions: PSNR dB", pair(recon, "psnr")),
            *((f"{name}: {family}", pair(key, family))
              for key, name in (("t2i", "text -> image"), ("i2t", "image -> text")) for family in res[f"{key}_seen"]),
            *((f"{timed_preset} flow step ({fcfg.depth} x {fcfg.width}, batch {tb.flow_batch}), {v}",
               f"{ms} ms, {ips} img/s, {tflops} TFLOP/s, MFU {mfu}") for v, _, ms, ips, tflops, mfu in timing)]
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
    K, C = tokenizer_cfg.num_tokens, tokenizer_cfg.token_dim
    out = {"tokenizer": [], "flow": []}  # per stage: the loss and every gradient, flat, eager then compiled
    for compiled in (False, True):
        world, bpe, tokenizer, model = build(tokenizer_cfg, flow_cfg, dev)
        img, captions, _ = world.batch(bc.tokenizer_batch)
        ids = bpe.encode(captions).to(dev)
        for name, module, inputs in (("tokenizer", tokenizer, (img, ids)),
                                     ("flow", model, (ids, torch.randn(len(ids), K, C, device=dev), ids))):
            torch.manual_seed(1)
            loss, _ = (torch.compile(module) if compiled else module)(*inputs)
            loss.backward()
            out[name].append(torch.cat([loss.detach().view(1)] + [p.grad.flatten() for p in module.parameters()]))
    errors = {name: ((b - a).abs().max() / a.abs().max()).item() for name, (a, b) in out.items()}
    for name, (a, b) in out.items():
        print(f"{name} step: loss eager {a[0]:.6f}, compiled {b[0]:.6f}; largest difference in the loss "
              f"and gradients {errors[name]:.1e} of the largest value (tolerance {tol:g})", flush=True)
    if max(errors.values()) > tol:
        sys.exit(f"error: the compiled step differs from eager by {max(errors.values()):.1e} > {tol:g}")

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
    default = VARIANTS if dev.type == "cuda" else VARIANTS[:1 + ft.cpu_bf16_is_faster()]
    variants = bc.variants.split(",") if bc.variants else default
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variant {unknown[0]!r}: use eager|compiled - fp32|bf16")
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
