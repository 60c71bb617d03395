"""
Sample from a trained nano FlowTok.

    python sample.py --prompt "a red circle to the left of a blue square"      # text -> image grid
    python sample.py --prompts_file prompts.txt --num_samples 8 --guidance 3
    python sample.py --image photo.png --image other.jpg                       # image -> text
    python sample.py --recon my_photos/      # the tokenizer's reconstructions: PSNR and a grid
    python sample.py --eval                  # judge both directions and round trips (test prompts)
    python sample.py --sweep                 # accuracy vs Euler steps and guidance (validation prompts)

The sampling settings default to the ones stored in the checkpoint; their flags override them.
"""

import os
import sys
import json
import argparse
import dataclasses
import warnings

import torch

import flowtok as ft
import data


def sweep(tokenizer, model, bpe, s, ckpt_dir, n, split):
    """Text -> image accuracy vs Euler steps x guidance, image -> text accuracy vs steps, and
    accuracy vs training minutes (from evals.jsonl): a table each."""
    print(f"text -> image judge accuracy, {split} prompts, {n} per family and split, source: "
          f"{'text-latent mean' if s.from_mean else 'text-latent sample'}")
    print("| steps | guidance | seen overall | held-out overall | seen single | seen relation | seen count |")
    print("|---|---|---|---|---|---|---|")
    for steps in (1, 2, 4, 8, 20):
        for guidance in (1.0, 2.0, 3.0):
            r = data.evaluate(tokenizer, model, bpe, dataclasses.replace(s, steps=steps, guidance=guidance), n,
                              split, directions=("t2i",))
            a, h = r["t2i_seen"], r["t2i_heldout"]
            print(f"| {steps} | {guidance:g} | {a['overall']:.3f} | {h['overall']:.3f} | {a['single']:.3f} | "
                  f"{a['relation']:.3f} | {a['count']:.3f} |", flush=True)
    print(f"\nimage -> text exact-caption accuracy vs Euler steps, {split} pictures, {n} per family and split, "
          f"best of {s.candidates} candidate captions")
    print("| steps | seen overall | held-out overall | seen single | seen relation | seen count |")
    print("|---|---|---|---|---|---|")
    dev = tokenizer.scale_factor.device
    for steps in (1, 2, 4, 8, 20):
        acc = {}
        for pairs in ("seen", "heldout"):
            specs = data.eval_specs(pairs, n, split)
            caps = ft.image_to_text(tokenizer, model, bpe, data.eval_images(tokenizer.cfg.image_size, specs, split, dev),
                                    dataclasses.replace(s, i2t_steps=steps))
            acc[pairs] = data.accuracy(data.judge_captions(caps, specs), specs)
        a = acc["seen"]
        print(f"| {steps} | {a['overall']:.3f} | {acc['heldout']['overall']:.3f} | {a['single']:.3f} | "
              f"{a['relation']:.3f} | {a['count']:.3f} |", flush=True)
    path = os.path.join(ckpt_dir, "evals.jsonl")
    if os.path.exists(path):
        print("\naccuracy vs training minutes (periodic evaluations logged by train.py, validation prompts)")
        print("| flow step | flow minutes | total minutes | seen overall | seen single | held-out overall |")
        print("|---|---|---|---|---|---|")
        for line in open(path):
            r = json.loads(line)
            print(f"| {r['step']} | {r['minutes']:.1f} | {r.get('total_minutes', float('nan')):.1f} | "
                  f"{r['t2i_seen']['overall']:.3f} | {r['t2i_seen']['single']:.3f} | {r['t2i_heldout']['overall']:.3f} |")


def image_files(paths):
    """Files as given, folders expanded to the image files in them (sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(data.IMAGE_EXTS))
        else:
            out.append(p)
    return out


def load_images(paths, size):
    """Load what loads; a one-line error on stderr for each file that does not. -> (images, their
    paths, number failed)."""
    imgs, loaded, failed = [], [], 0
    for path in paths:
        try:
            imgs.append(data.load_image(path, size))
            loaded.append(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return imgs, loaded, failed


@torch.no_grad()
def reconstruct(tokenizer, paths, dev, out, batch=256):
    """--recon: the tokenizer's round trip on image files or folders: mean PSNR over all of them, and
    a grid of the first 8 with each reconstruction under its original."""
    imgs, loaded, failed = load_images(image_files(paths), tokenizer.cfg.image_size)
    if not imgs:
        sys.exit("error: no image could be read from --recon")
    imgs = torch.stack(imgs).to(dev)
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a trained nano FlowTok (text -> image, image -> text).")
    p.add_argument("--prompt", action="append", default=[], help="a caption to draw (repeatable)")
    p.add_argument("--prompts_file", help="a text file with one caption per line")
    p.add_argument("--image", action="append", default=[], help="an image to caption (repeatable)")
    p.add_argument("--recon", action="append", default=[],
                   help="an image or folder to reconstruct with the tokenizer: PSNR and a grid (repeatable)")
    p.add_argument("--num_samples", type=int, default=4, help="pictures per prompt / captions per image")
    p.add_argument("--seed", type=int, default=0, help="the noise of the text latents drawn from")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--out", default="samples.png", help="output PNG grid")
    p.add_argument("--eval", action="store_true",
                   help="judge reconstructions, both directions and both round trips (a report)")
    p.add_argument("--sweep", action="store_true", help="judge accuracy vs Euler steps and guidance (tables)")
    p.add_argument("--eval_prompts", type=int, default=50, help="prompts per family and split in --eval / --sweep")
    p.add_argument("--split", choices=("val", "test"), default=None,
                   help="evaluation prompts: --eval uses test, --sweep val (choose settings on val only)")
    p.add_argument("--inverse", action="store_true",
                   help="image -> text by running the text -> image field backwards (a baseline)")
    p.add_argument("--device", default="auto")
    ft.add_fields(p, ft.SampleConfig, "", "sampling settings (default: the checkpoint's)")
    a = p.parse_args(argv)
    prompts = list(a.prompt)
    if a.prompts_file:
        if not os.path.exists(a.prompts_file):
            sys.exit(f"error: prompts file {a.prompts_file} not found")
        prompts += [l.strip() for l in open(a.prompts_file, encoding="utf-8", errors="replace") if l.strip()]
    if any(not x.strip() for x in a.prompt):
        sys.exit("error: empty prompt: give a caption, e.g. --prompt \"a small red circle\"")
    if not (prompts or a.image or a.sweep or a.eval or a.recon):
        sys.exit("error: nothing to do: give --prompt TEXT, --prompts_file FILE, --image PATH, --recon PATH, "
                 "--sweep or --eval")
    if min(a.num_samples, a.eval_prompts) < 1:
        sys.exit("error: --num_samples and --eval_prompts must be at least 1")
    overrides = {f.name: getattr(a, f.name) for f in dataclasses.fields(ft.SampleConfig) if getattr(a, f.name) is not None}
    ft.build_config(ft.SampleConfig, overrides, "", p)  # range errors before a checkpoint is read
    dev = ft.pick_device(a.device)
    torch.set_flush_denormal(True)
    try:
        if a.recon and not (prompts or a.image or a.sweep or a.eval):  # the tokenizer alone will do
            tokenizer = ft.tokenizer_from(ft.load_checkpoint(a.ckpt, dev), a.ckpt, dev)
        else:
            tokenizer, model, bpe, saved = ft.load_models(a.ckpt, dev)
            s = dataclasses.replace(saved, **overrides)
    except ft.CheckpointError as e:
        sys.exit(f"error: {e}")
    recon_out = os.path.splitext(a.out)[0] + "_recon.png" if prompts else a.out  # not over the samples
    failed = reconstruct(tokenizer, a.recon, dev, recon_out) if a.recon else 0
    if a.eval:
        split = a.split or "test"
        print(f"{split} prompts, {a.eval_prompts} per family and split; sampling: {s}")
        print(data.report(data.evaluate_tokenizer(tokenizer, a.eval_prompts, bpe, guidance=s.dec_guidance,
                                                  split=split), True))
        print(data.report(data.evaluate(tokenizer, model, bpe, s, a.eval_prompts, split, inverse=a.inverse), True))
    if a.sweep:
        sweep(tokenizer, model, bpe, s, os.path.dirname(a.ckpt), a.eval_prompts, a.split or "val")
    if prompts:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.formatwarning = lambda msg, *args, **kw: f"warning: {msg}\n"
            labels = [pr for pr in prompts for _ in range(a.num_samples)]
            imgs = ft.text_to_image(tokenizer, model, bpe, labels, s, a.seed)
        data.save_grid(imgs, labels, a.out, cols=a.num_samples if a.num_samples > 1 else 8)
        print(f"saved {len(labels)} samples to {a.out}")
    if a.image:
        imgs, loaded, bad = load_images(a.image, tokenizer.cfg.image_size)
        failed += bad
        for path, img in zip(loaded, imgs):
            g = torch.Generator(dev).manual_seed(a.seed)
            cands = ft.caption_candidates(tokenizer, model, img[None].to(dev), max(s.candidates, a.num_samples),
                                          s.steps if a.inverse else s.i2t_steps, a.inverse, g)
            caps = list(dict.fromkeys(bpe.decode(x) for x in cands[0]))  # best first, each once
            print(f"{path}: " + " | ".join(caps[:a.num_samples]))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
