"""
Sample from a trained nano FlowTok; the sampling settings default to the checkpoint's, their flags override them.

    python sample.py --prompt "a red circle to the left of a blue square"   # text -> image (or --prompts_file)
    python sample.py --image photo.png --image my_photos/   # image -> text; with --edit "a blue circle": redrawn
    python sample.py --trajectory --prompt "a large red square"   # x_t decoded at each Euler step (or --image)
    python sample.py --interpolate "a small red circle" "a large blue square" --num_samples 8
    python sample.py --recon my_photos/   # the image tokenizer's reconstructions: PSNR and a grid
    python sample.py --eval   # judge both directions, test prompts (--edit_eval 100: caption edits; --sweep: settings)
"""

import os
import sys
import json
import argparse
import dataclasses
import warnings
import math

import torch

import flowtok as ft
import data

def table(title, *columns):  # a markdown table's title and header; row() prints its rows
    print(f"{title}\n| {' | '.join(columns)} |\n" + "|---" * len(columns) + "|")

def row(*cells):
    print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |", flush=True)

def sweep(tokenizer, model, bpe, s, ckpt_dir, n, split):
    """Judge accuracy vs the sampling settings, a table each: text -> image vs Euler steps x guidance and vs
    draws, image -> text vs Euler steps and vs the check's margin and gain, and accuracy vs training minutes
    (train.py's evals.jsonl, if beside the checkpoint); charts of them in ckpt_dir."""
    dev, all_steps, guidances = tokenizer.scale_factor.device, (1, 2, 4, 8, 20), (1.0, 2.0, 3.0)
    seen = ("seen overall", "held-out overall", "seen single", "seen relation", "seen count")
    cells = lambda a, held: (a["overall"], held["overall"], a["single"], a["relation"], a["count"])  # seen's columns
    def t2i_row(*head, **settings):  # the judge's text -> image results with these settings -> seen overall
        r = data.evaluate(tokenizer, model, bpe, dataclasses.replace(s, **settings), n, split, ("t2i",))
        row(*head, *cells(r["t2i_seen"], r["t2i_heldout"]))
        return r["t2i_seen"]["overall"]
    def i2t_accuracy(soft=False, pairs="seen", **settings):  # of the captions read from the split's renders
        specs = data.eval_specs(pairs, n, split)
        imgs = data.eval_images(tokenizer.cfg.image_size, specs, split, dev, soft)
        read = ft.image_to_text(tokenizer, model, bpe, imgs, dataclasses.replace(s, **settings))
        return data.accuracy(data.judge_captions(read, specs), specs)

    table(f"text -> image judge accuracy, {split} prompts, {n} per family and split, one draw per caption, source: "
          f"{'text-latent mean' if s.from_mean else 'text-latent sample'}", "steps", "guidance", *seen)
    t2i = {(st, g): t2i_row(st, f"{g:g}", steps=st, guidance=g, draws=1) for st in all_steps for g in guidances}
    table(f"\ntext -> image judge accuracy vs draws per caption (the one read back likeliest kept), {split} prompts, "
          f"{s.steps} Euler steps, guidance {s.guidance:g}", "draws", *seen)
    for draws in (1, 2, 4, 8, 16):
        t2i_row(draws, draws=draws)
    table(f"\nimage -> text exact-caption accuracy vs Euler steps, {split} pictures, {n} per family and split, "
          f"best of {s.candidates} candidate captions", "steps", *seen)
    i2t = []
    for st in all_steps:
        acc = [i2t_accuracy(False, pairs, i2t_steps=st) for pairs in ("seen", "heldout")]
        i2t.append(acc[0]["overall"])
        row(st, *cells(*acc))
    table(f"\nimage -> text exact-caption accuracy vs the check's margin (nats below the likeliest caption) and "
          f"gain (share of the likeliest's redraw error to beat), {split} pictures of the world's renderer and of "
          f"the soft one, {s.i2t_steps} Euler step(s); candidates 1: the likeliest", "candidates", "check margin",
          "check gain", "seen", "held-out", "seen, soft renders", "held-out, soft renders")
    rules = [(1, 0.0, 0.0)] + [(s.candidates, m, 0.0) for m in (0.0, 1.0, 2.0, 4.0, math.inf)] + \
        [(s.candidates, s.check_margin, g) for g in (0.02, 0.05, 0.1, 0.2)]
    for c, m, g in rules:
        row(c, f"{m:g}", f"{g:g}", *(i2t_accuracy(soft, pairs, candidates=c, check_margin=m, check_gain=g)["overall"]
                                     for soft in (False, True) for pairs in ("seen", "heldout")))
    by_steps = {f"t2i, guidance {g:g}": (all_steps, [t2i[st, g] for st in all_steps]) for g in guidances}
    by_guidance = {f"t2i, {st} steps": (guidances, [t2i[st, g] for g in guidances]) for st in all_steps}
    charts = [("sweep_steps.png", {**by_steps, "i2t": (all_steps, i2t)}, "Euler steps",
               f"accuracy vs Euler steps ({split}, seen)"),
              ("sweep_guidance.png", by_guidance, "guidance scale",
               f"text -> image accuracy vs guidance ({split}, seen)")]
    path = os.path.join(ckpt_dir, "evals.jsonl")  # train.py's periodic evaluations (validation prompts)
    if os.path.exists(path):
        table("\naccuracy vs training minutes (periodic evaluations logged by train.py, validation prompts)",
              "flow step", "flow minutes", "total minutes", "seen overall", "seen single", "held-out overall")
        evals = [json.loads(line) for line in open(path)]
        for r in evals:
            row(r["step"], f"{r['minutes']:.1f}", f"{r['total_minutes']:.1f}", r["t2i_seen"]["overall"],
                r["t2i_seen"]["single"], r["t2i_heldout"]["overall"])
        curves = {"t2i seen": ("t2i_seen", "overall"), "t2i seen single": ("t2i_seen", "single"),
                  "t2i held-out": ("t2i_heldout", "overall")}
        minutes = [r["total_minutes"] for r in evals]
        charts.append(("accuracy_vs_minutes.png", {name: (minutes, [r[key][part] for r in evals]) for name, (key, part)
                                                   in curves.items()}, "training minutes",
                       "text -> image accuracy vs training (val, seen and held-out)"))
    for name, series, xlabel, title in charts:
        data.line_chart(series, os.path.join(ckpt_dir, name), title, xlabel, "accuracy", (0, 1))
        print(f"chart: {os.path.join(ckpt_dir, name)}")

def load_images(paths, size, dev):
    """Files, and folders' image files (sorted). Loads what loads; a one-line error on stderr for each
    file that does not. -> (images (N, 3, S, S) on dev, or None; their paths; number failed)."""
    files = [f for p in paths for f in (sorted(os.path.join(p, x) for x in os.listdir(p) if x.lower().endswith(
        data.IMAGE_EXTS)) if os.path.isdir(p) else [p])]
    imgs, loaded = [], []
    for path in files:
        try:
            imgs.append(data.load_image(path, size))
            loaded.append(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
    return torch.stack(imgs).to(dev) if imgs else None, loaded, len(files) - len(loaded)

@torch.no_grad()
def reconstruct(tokenizer, paths, dev, out, batch=256):
    """--recon: the tokenizer's round trip on image files or folders: the mean PSNR of all, and a grid of
    the first 8 with each reconstruction under its original. -> the number of files that failed."""
    imgs, loaded, failed = load_images(paths, tokenizer.cfg.image_size, dev)
    if imgs is None:
        sys.exit("error: no image could be read from --recon")
    psnr = [data.evaluate_tokenizer(tokenizer, 0, images=imgs[i:i + batch])["recon"]["psnr"] * len(imgs[i:i + batch])
            for i in range(0, len(imgs), batch)]
    blind = " (decoded without captions)" if tokenizer.cfg.text_aware else ""
    print(f"tokenizer reconstruction of {len(imgs)} images: PSNR {sum(psnr) / len(imgs):.2f} dB{blind}")
    n = min(8, len(imgs))
    rec = tokenizer.decode(tokenizer.encode(imgs[:n])[0]).clamp(0, 1)
    data.save_grid(torch.cat([imgs[:n], rec]), [os.path.basename(p) for p in loaded[:n]] + ["reconstruction"] * n,
                   out, cols=n)
    print(f"saved originals and reconstructions to {out}")
    return failed

# -----------------------------------------------------------------------------
# watching the flow: trajectories, interpolation, caption edits

@torch.no_grad()
def trajectory(tokenizer, model, bpe, s, out, prompts=(), imgs=None, seed=0):
    """--trajectory: a row per prompt (text -> image) or picture (image -> text), a column per Euler step, each
    the picture decoded from x_t, from an image with the caption read from x_t too; as a .gif beside out."""
    dev, xs = tokenizer.scale_factor.device, []
    if prompts:  # the sampler's own path and decoding: the last column is --prompt's picture
        ids = bpe.encode(prompts).to(dev)
        model.generate(ids, s.steps, s.guidance, s.from_mean, torch.Generator(dev).manual_seed(seed), xs)
        texts = [list(prompts)] + [[""] * len(prompts)] * s.steps  # [step][row]
    else:  # image -> text has no caption to give the decoder
        ids = None
        ft.euler(lambda x, t: model.velocity(x, t, direction=1), tokenizer.latents(imgs, sample=False),
                 s.i2t_steps, trace=xs)
        texts = [[bpe.decode(r) for r in model.text_decoder(x).argmax(-1)] for x in xs]
    frames = [tokenizer.images(x, ids, s.dec_guidance) for x in xs]  # (steps + 1) x (B, 3, S, S)
    labels = [[f"t={i / (len(xs) - 1):.2f}" + (f": {x}" if x else "") for i, x in enumerate(row)]
              for row in zip(*texts)]  # [row][step]
    data.save_grid(torch.stack(frames, 1).flatten(0, 1), sum(labels, []), out, cols=len(xs))
    gif = [data.save_grid(f, [row[i] for row in labels], None) for i, f in enumerate(frames)]
    gif[0].save(os.path.splitext(out)[0] + ".gif", save_all=True, append_images=gif[1:], duration=500, loop=0)
    return texts

@torch.no_grad()
def interpolation(tokenizer, model, bpe, s, captions, n, seed=0):
    """--interpolate: n pictures drawn from sources on the line between two captions' text latents, one noise."""
    dev = tokenizer.scale_factor.device
    mean, logvar = model.text_encoder(bpe.encode(captions).to(dev))  # (2, K, C)
    # Linear between the two Gaussians, means and sigmas alike, with the noise --prompt draws for the first
    # caption with this seed. (Slerp keeps the norm of two independent noise draws; here there is one.)
    w = torch.linspace(0, 1, n, device=dev).view(n, 1, 1)
    eps = torch.randn(mean[:1].shape, device=dev, generator=torch.Generator(dev).manual_seed(seed))
    x0 = torch.lerp(mean[0], mean[1], w) + (0 if s.from_mean else torch.lerp(*(0.5 * logvar).exp(), w) * eps)
    # Decoded without a caption: a text-aware decoder reading either caption would change the picture too.
    imgs = tokenizer.images(ft.euler(lambda x, t: ft.guided(model, x, t, s.guidance), x0, s.steps))
    return imgs, [f"w={x:.2f}" + (f": {captions[round(x)]}" if x in (0, 1) else "") for x in w.view(-1).tolist()]

@torch.no_grad()
def edit(tokenizer, model, bpe, s, imgs, captions):
    """Caption editing: read each picture's caption, run the text -> image path backwards from its latent to
    the source x0 that draws it, and put that source's noise, eps = (x0 - mean) / sigma under the caption read,
    around the new caption's mean and sigma. -> captions read, the round trip's pictures, edited pictures."""
    dev, B = tokenizer.scale_factor.device, len(imgs)
    read = ft.image_to_text(tokenizer, model, bpe, imgs, s)
    with warnings.catch_warnings():  # a caption read is model output: an over-long one is just wrong
        warnings.simplefilter("ignore")
        ids = bpe.encode(read + list(captions)).to(dev)
    mean, logvar = model.text_encoder(ids)  # (2B, K, C): the captions read, then the new ones
    std = (0.5 * logvar).exp()
    guided = lambda x, t: ft.guided(model, x, t, s.guidance)  # the field text -> image sampling follows
    eps = (ft.euler(guided, tokenizer.latents(imgs, sample=False), s.steps, 1.0, 0.0) - mean[:B]) / std[:B]
    drawn = tokenizer.images(ft.euler(guided, mean + std * torch.cat([eps, eps]), s.steps), ids, s.dec_guidance)
    return read, drawn[:B], drawn[B:]

def edited(spec, kind):
    """A single-object spec with `kind` ('color', 'shape' or 'size') changed to the next value keeping a seen pair."""
    (color, shape), = spec.objects
    now = {"color": color, "shape": shape, "size": spec.size}
    values = {"color": data.COLOR_NAMES, "shape": data.SHAPES, "size": data.SIZES}[kind]
    i = values.index(now[kind])
    new = (data.Spec("single", ((n["color"], n["shape"]),), n["size"])
           for n in ({**now, kind: v} for v in values[i + 1:] + values[:i]))
    return next(x for x in new if not data.is_held_out(x))

@torch.no_grad()
def edit_eval(tokenizer, model, bpe, s, n, split, seed):
    """--edit_eval: n single-object edits per attribute kind of a split's renders, judged; beside
    them fresh drawings of the same new captions (nothing of the picture kept), for comparison."""
    specs = data.eval_specs("seen", n, split)[:n]  # the single family comes first
    imgs = data.eval_images(tokenizer.cfg.image_size, specs, split, tokenizer.scale_factor.device)
    near = data.SIZE_FRACTION["small"] * tokenizer.cfg.image_size  # a small object's radius
    table(f"caption edits of {n} {split} renders per attribute; position kept: centre moved <= {near:.1f} px",
          "edited", "drawn from", "caption read right", "shows the new caption", "other two attributes kept",
          "position kept")
    for kind in ("color", "shape", "size"):
        new = [edited(x, kind) for x in specs]
        caps = [data.caption(x) for x in new]
        read, _, out = edit(tokenizer, model, bpe, s, imgs, caps)
        read_ok = sum(data.judge_captions(read, specs)) / n
        fresh = ft.text_to_image(tokenizer, model, bpe, caps, dataclasses.replace(s, draws=1), seed)  # as the edit
        for source, pics in (("the inverted source", out), ("a fresh source", fresh)):
            objs = [(a, b[0]) for a, b in zip(data.find_objects(imgs), data.find_objects(pics)) if len(b) == 1]
            others = sum(all(a[0][k] == b[k] for k in ("color", "shape", "size") if k != kind) for a, b in objs)
            kept = sum(math.hypot(a[0]["cx"] - b["cx"], a[0]["cy"] - b["cy"]) <= near for a, b in objs)
            row(kind, source, f"{read_ok:.2f}", f"{sum(data.judge_images(pics, new)) / n:.2f}", f"{others / n:.2f}",
                f"{kept / n:.2f}")

def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a trained nano FlowTok (text -> image, image -> text).")
    many = dict(action="append", default=[])  # a repeatable flag
    p.add_argument("--prompt", **many, help="a caption to draw (repeatable)")
    p.add_argument("--prompts_file", help="a text file with one caption per line")
    p.add_argument("--image", **many, help="an image, or a folder of them, to caption (repeatable)")
    p.add_argument("--recon", **many, help="an image or folder the tokenizer reconstructs: PSNR, a grid (repeatable)")
    p.add_argument("--num_samples", type=int, default=4, help="pictures per prompt / captions per image")
    p.add_argument("--seed", type=int, default=0, help="the noise of the text latents drawn from")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--out", default="samples.png", help="output PNG grid")
    p.add_argument("--eval", action="store_true", help="judge reconstructions, both directions and both round trips")
    p.add_argument("--sweep", action="store_true", help="judge accuracy vs Euler steps and guidance (tables)")
    p.add_argument("--eval_prompts", type=int, default=100, help="prompts per family and split in --eval / --sweep")
    p.add_argument("--split", choices=("val", "test"),
                   help="evaluation prompts: --eval uses test, --sweep val (choose settings on val only)")
    p.add_argument("--trajectory", action="store_true", help="with --prompt or --image: the picture (and, from "
                   "an image, the caption) read from x_t at every Euler step, one row each, and a .gif")
    p.add_argument("--interpolate", nargs="+", default=[], metavar="CAPTION", help="two captions: --num_samples "
                   "pictures drawn from text latents on the line between theirs, with the same noise")
    p.add_argument("--edit", metavar="CAPTION", help="with --image: read its caption, then draw the picture "
                   "again from its own inverted source under this caption (original | read | edited)")
    p.add_argument("--edit_eval", type=int, default=0, metavar="N",
                   help="judge N single-object caption edits per attribute kind on shapes-world renders")
    p.add_argument("--device", default="auto", help="auto: cuda -> mps -> cpu")
    ft.add_fields(p, ft.SampleConfig, "", "sampling settings (default: the checkpoint's)")
    a = p.parse_args(argv)
    prompts = list(a.prompt)
    if a.prompts_file and os.path.exists(a.prompts_file):
        with open(a.prompts_file, encoding="utf-8", errors="replace") as f:
            prompts += [l.strip() for l in f if l.strip()]
    pictures = (prompts, a.interpolate, a.image and (a.edit or a.trajectory))  # the modes that write --out
    needs_flow = prompts or a.image or a.sweep or a.eval or a.interpolate or a.edit_eval  # --recon: the tokenizer
    for wrong, message in (  # the first that applies, as one line
            (a.prompts_file and not os.path.exists(a.prompts_file), f"prompts file {a.prompts_file} not found"),
            (any(not x.strip() for x in a.prompt), 'empty prompt: give a caption, e.g. --prompt "a small red circle"'),
            (a.edit and not a.image, '--edit needs the picture to edit: --image PATH --edit "new caption"'),
            (not (needs_flow or a.recon), "nothing to do: give --prompt TEXT, --prompts_file FILE, --image PATH, "
                                          "--recon PATH, --interpolate A B, --edit_eval N, --sweep or --eval"),
            (len(a.interpolate) not in (0, 2), f"--interpolate takes two captions, not {len(a.interpolate)}: "
                                               '--interpolate "a small red circle" "a large blue square"'),
            (sum(map(bool, pictures)) > 1, "one picture per run: --prompt, --interpolate, or --image with --edit / "
                                           "--trajectory"),
            (min(a.num_samples, a.eval_prompts) < 1, "--num_samples and --eval_prompts must be at least 1")):
        if wrong:
            sys.exit(f"error: {message}")
    overrides = {f.name: v for f in dataclasses.fields(ft.SampleConfig) if (v := getattr(a, f.name)) is not None}
    ft.build_config(ft.SampleConfig, overrides, "", p)  # range errors before a checkpoint is read
    dev = ft.pick_device(a.device)
    torch.set_flush_denormal(True)
    try:  # --recon alone needs only the image tokenizer, which a checkpoint of any stage holds
        tokenizer, model, bpe, s = ft.load_models(a.ckpt, dev) if needs_flow else \
            (ft.tokenizer_from(ft.load_checkpoint(a.ckpt, dev), a.ckpt, dev), None, None, None)
    except ft.CheckpointError as e:
        sys.exit(f"error: {e}")
    s = dataclasses.replace(s, **overrides) if needs_flow else None
    recon_out = os.path.splitext(a.out)[0] + "_recon.png" if any(pictures) else a.out  # not over the picture
    failed = reconstruct(tokenizer, a.recon, dev, recon_out) if a.recon else 0
    if a.eval:
        split = a.split or "test"
        print(f"{split} prompts, {a.eval_prompts} per family and split; sampling: {s}")
        print(data.report({**data.evaluate_tokenizer(tokenizer, a.eval_prompts, bpe, guidance=s.dec_guidance,
                                                     split=split),
                           **data.evaluate(tokenizer, model, bpe, s, a.eval_prompts, split)}, True))
    if a.sweep:
        sweep(tokenizer, model, bpe, s, os.path.dirname(a.ckpt), a.eval_prompts, a.split or "val")
    if a.edit_eval:
        edit_eval(tokenizer, model, bpe, s, a.edit_eval, a.split or "test", a.seed)
    if a.interpolate:
        imgs, labels = interpolation(tokenizer, model, bpe, s, a.interpolate, a.num_samples, a.seed)
        data.save_grid(imgs, labels, a.out, cols=a.num_samples)
        print(f"saved {a.num_samples} pictures between the two captions to {a.out}")
    if prompts and a.trajectory:
        trajectory(tokenizer, model, bpe, s, a.out, prompts, seed=a.seed)
        print(f"saved the paths of {len(prompts)} prompts to {a.out} and its .gif")
    elif prompts:
        with warnings.catch_warnings():  # each over-long prompt: one line saying it was truncated
            warnings.simplefilter("always")
            warnings.formatwarning = lambda msg, *args, **kw: f"warning: {msg}\n"
            labels = [pr for pr in prompts for _ in range(a.num_samples)]
            imgs = ft.text_to_image(tokenizer, model, bpe, labels, s, a.seed, read_as=data.reader_phrasing(labels))
        data.save_grid(imgs, labels, a.out, cols=a.num_samples if a.num_samples > 1 else 8)
        print(f"saved {len(labels)} samples to {a.out}")
    if a.image:
        imgs, loaded, bad = load_images(a.image, tokenizer.cfg.image_size, dev)
        if imgs is None:
            sys.exit(1)  # load_images said why
        failed += bad
        if a.edit:
            read, redrawn, edits = edit(tokenizer, model, bpe, s, imgs, [a.edit] * len(imgs))
            for path, caption in zip(loaded, read):
                print(f"{path}: read {caption!r}, drawn as {a.edit!r}")
            labels = [x for path, c in zip(loaded, read) for x in (f"original: {os.path.basename(path)}",
                                                                   f"read: {c}", f"edit: {a.edit}")]
            data.save_grid(torch.stack([imgs, redrawn, edits], 1).flatten(0, 1), labels, a.out, cols=3)
            print(f"saved original | read caption | edited to {a.out}")
        elif a.trajectory:
            for path, row in zip(loaded, zip(*trajectory(tokenizer, model, bpe, s, a.out, imgs=imgs))):
                print(f"{path}: " + " -> ".join(f"{x!r}" for x in row))
            print(f"saved the image -> text paths to {a.out} and its .gif")
        else:
            for path, img in zip(loaded, imgs):
                cands = ft.caption_candidates(tokenizer, model, img[None], max(s.candidates, a.num_samples),
                                              s.i2t_steps, torch.Generator(dev).manual_seed(a.seed), s.check_margin,
                                              s.check_gain)
                caps = list(dict.fromkeys(bpe.decode(x) for x in cands[0]))  # best first, each once
                print(f"{path}: " + " | ".join(caps[:a.num_samples]))
    if failed:
        sys.exit(1)

if __name__ == "__main__":
    main()
