"""
Sample from a trained nano FlowTok.

    python sample.py --prompt "a red circle to the left of a blue square"      # text -> image grid
    python sample.py --prompts_file prompts.txt --num_samples 8 --cfg 3
    python sample.py --image photo.png --image other.jpg                       # image -> text
    python sample.py --recon my_photos/          # the tokenizer's reconstructions: PSNR and a grid
    python sample.py --sweep                # judge accuracy vs Euler steps and CFG scale (table)
    python sample.py --eval [--inverse]     # judge both directions and both round trips

Also home of what train.py shares with it: checkpoint I/O, evaluation with the judge, grids.
"""

import os
import sys
import json
import math
import argparse
import dataclasses
import warnings
from types import SimpleNamespace

import torch
from PIL import Image, ImageDraw, ImageFont

import flowtok as ft
import data

# -----------------------------------------------------------------------------
# checkpoints: atomic writes, weights_only reads, one-line errors


class CheckpointError(Exception):
    pass


def save_checkpoint(state, out_dir, name="ckpt.pt"):
    """Write to a temp file, flush it to disk, then rename over the old one: a crash or kill -9 at
    any moment leaves either the previous checkpoint or the new one, never half of one."""
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train first: python train.py")
    try:
        # weights_only: a checkpoint is data, never code to run
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a nano FlowTok checkpoint ({type(e).__name__}); "
                              "it is damaged or not one of ours: retrain or pick another --ckpt") from None


def saved_config(cls, d, path):
    """A config dataclass from a checkpoint; settings this version does not know, or that the
    checkpoint lacks, are a one-line error."""
    names = {f.name for f in dataclasses.fields(cls)}
    for what, keys in (("unknown", set(d) - names), ("missing", names - set(d))):
        if keys:
            raise CheckpointError(f"{path} was written by another version of nano FlowTok ({what} {cls.__name__} "
                                  f"settings: {', '.join(sorted(keys))}): retrain, or use that version")
    return cls(**d)


def tokenizer_from(state, path, device):
    """The image tokenizer of a checkpoint (any stage), in eval mode."""
    tok = ft.ImageTokenizer(saved_config(ft.TokenizerConfig, state["tok_cfg"], path)).to(device)
    tok.load_state_dict(state["tokenizer"])
    return tok.eval()


def load_models(path, device):
    """Checkpoint -> (tokenizer, EMA flow model, text tokenizer), ready to sample."""
    state = load_checkpoint(path, device)
    if not state.get("ema"):
        raise CheckpointError(f"{path} has no trained flow yet (stage {state.get('stage')!r}): "
                              "finish training: python train.py --resume")
    tok = tokenizer_from(state, path, device)
    model = ft.FlowTok(saved_config(ft.FlowConfig, state["flow_cfg"], path)).to(device)
    model.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in state["ema"].items()})
    text_tok = ft.TextTokenizer.from_state_dict(state["text_tokenizer"])
    return tok, model.eval(), text_tok

# -----------------------------------------------------------------------------
# the two directions, batched


@torch.no_grad()
def text_to_image(tok, model, text_tok, prompts, steps=20, cfg_scale=2.0, from_mean=False, seed=0, dec_guidance=0.0,
                  batch=256):
    dev = tok.scale_factor.device
    g = torch.Generator(dev).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch):
        ids = text_tok.encode(prompts[i:i + batch]).to(dev)
        out.append(tok.images(model.generate(ids, steps, cfg_scale, from_mean, g), ids, dec_guidance))
    return torch.cat(out)


@torch.no_grad()
def image_to_text(tok, model, text_tok, images, steps=20, inverse=None, candidates=1, batch=256):
    """images (B, 3, S, S) in [0, 1] -> list of B captions: the best of `candidates` (see
    flowtok.caption_candidates; 1 = the text decoder's most likely tokens, unchecked)."""
    out = []
    for i in range(0, len(images), batch):
        ids = ft.caption_candidates(tok, model, images[i:i + batch], candidates, steps, inverse)[:, 0]
        out += [text_tok.decode(x) for x in ids]
    return out

# -----------------------------------------------------------------------------
# evaluation with the judge


def eval_images(tok, specs, seed=4321):
    """Fixed ground-truth renders of the evaluation specs."""
    world = data.ShapesWorld(tok.cfg.image_size, seed=seed, device=tok.scale_factor.device)
    return world.render(specs)


def i2t_steps(model, tc, inverse=None):
    """Euler steps for image -> text: tc.i2t_steps on a trained image -> text field (straight: one end
    point per caption), tc.sample_steps when the text -> image field runs backwards (it is not)."""
    backwards = model.cfg.i2t == "inverse" if inverse is None else inverse
    return tc.sample_steps if backwards else tc.i2t_steps


@torch.no_grad()
def evaluate(tok, model, text_tok, tc, dev, n, directions=("t2i", "i2t"), inverse=None):
    """Judge accuracy per family on the seen and held-out splits (n prompts per family each):
    text -> image, and (with 'i2t') image -> text, both round trips, and the text decoder's
    exact-match round trip decode(encode(caption))."""
    res = {}
    for split in ("seen", "heldout"):
        specs = data.eval_specs(split, n)
        prompts = [data.caption(s) for s in specs]
        draw = dict(steps=tc.sample_steps, cfg_scale=tc.cfg_scale, from_mean=tc.from_mean, dec_guidance=tc.dec_guidance)
        imgs = text_to_image(tok, model, text_tok, prompts, **draw)
        res[f"t2i_{split}"] = data.accuracy(data.judge_images(imgs, specs), specs)
        if "i2t" not in directions:
            continue
        read = dict(steps=i2t_steps(model, tc, inverse), inverse=inverse, candidates=tc.i2t_candidates)
        caps = image_to_text(tok, model, text_tok, eval_images(tok, specs), **read)
        res[f"i2t_{split}"] = data.accuracy(data.judge_captions(caps, specs), specs)
        # text -> image -> text: is the caption of the generated image the prompt?
        back = image_to_text(tok, model, text_tok, imgs, **read)
        res[f"t2i2t_{split}"] = data.accuracy(data.judge_captions(back, specs), specs)
        # image -> text -> image: does the picture drawn from the caption pass for the original spec?
        with warnings.catch_warnings():  # the captions are model output: over-long ones are just wrong
            warnings.simplefilter("ignore")
            redrawn = text_to_image(tok, model, text_tok, [c or "?" for c in caps], **draw)
        res[f"i2t2i_{split}"] = data.accuracy(data.judge_images(redrawn, specs), specs)
        ids = text_tok.encode(prompts).to(dev)
        dec = [text_tok.decode(x) for x in model.text_decoder(model.text_encoder(ids)[0]).argmax(-1)]
        res[f"text_roundtrip_{split}"] = data.accuracy([a == b for a, b in zip(dec, prompts)], specs)
    return res


@torch.no_grad()
def evaluate_tokenizer(tok, dev, n, text_tok=None, images=None, captions=None, guidance=0.0):
    """PSNR (and, on the shapes world, judge accuracy) of reconstructions from the posterior mean:
    of the given images, or of the evaluation renders (n per family and split). A text-aware decoder
    reads the captions (as when it draws text -> image, with the decoder guidance `guidance`) if
    text_tok is given; 'recon_blind' decodes the same latents without them: what the latent alone
    holds."""
    def recon_psnr(img, caps):
        ids = text_tok.encode(caps).to(dev) if caps is not None and text_tok is not None else None
        rec = tok.decode(tok.encode(img)[0], ids, guidance).clamp(0, 1)
        mse = (rec - img).pow(2).flatten(1).mean(1)
        return rec, (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    if images is not None:
        return {"recon": {"psnr": recon_psnr(images, captions)[1]}}
    res = {}
    for split in ("seen", "heldout"):
        specs = data.eval_specs(split, n)
        img = eval_images(tok, specs)
        variants = {"recon": [data.caption(s) for s in specs]}
        if tok.cfg.text_aware and text_tok is not None:
            variants["recon_blind"] = None
        for name, caps in variants.items():
            rec, psnr = recon_psnr(img, caps)
            res[f"{name}_{split}"] = {**data.accuracy(data.judge_images(rec, specs), specs), "psnr": psnr}
    return res


def report(res, multiline=False):
    parts = []
    for name, acc in res.items():
        if isinstance(acc, dict):
            parts.append(f"{name}: " + " ".join(f"{k} {v:.3f}" if k != "psnr" else f"psnr {v:.2f}dB"
                                                for k, v in acc.items()))
    return ("\n" if multiline else " | ").join(parts)

# -----------------------------------------------------------------------------
# pictures


def save_grid(images, labels, path, cols=8, cell=128):
    """images (B, 3, S, S) in [0, 1] -> one PNG with each label written under its picture."""
    font = ImageFont.load_default(size=11)
    B = len(images)
    cols = min(cols, B)
    rows = math.ceil(B / cols)
    text_h = 40
    canvas = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, S, S, 3)
    for i in range(B):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        canvas.paste(Image.fromarray(arr[i]).resize((cell, cell), Image.NEAREST), (x, y))
        draw.multiline_text((x + 3, y + cell + 2), wrap(labels[i], 22), fill="black", font=font, spacing=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join((lines + [line])[:3])

# -----------------------------------------------------------------------------


def sweep(tok, model, text_tok, ckpt_dir, n, dev, from_mean, candidates, dec_guidance):
    """Text -> image accuracy vs Euler steps x CFG scale, image -> text accuracy vs steps, and
    accuracy vs training minutes (from evals.jsonl)."""
    print(f"text -> image judge accuracy, {n} prompts per family and split, source: "
          f"{'text-latent mean' if from_mean else 'text-latent sample'}")
    print("| steps | cfg | seen overall | held-out overall | seen single | seen relation | seen count |")
    print("|---|---|---|---|---|---|---|")
    for steps in (1, 2, 4, 8, 20):
        for cfg in (1.0, 2.0, 3.0):
            settings = SimpleNamespace(sample_steps=steps, cfg_scale=cfg, from_mean=from_mean,
                                       dec_guidance=dec_guidance)
            r = evaluate(tok, model, text_tok, settings, dev, n, directions=("t2i",))
            s, h = r["t2i_seen"], r["t2i_heldout"]
            print(f"| {steps} | {cfg:g} | {s['overall']:.3f} | {h['overall']:.3f} | {s['single']:.3f} | "
                  f"{s['relation']:.3f} | {s['count']:.3f} |", flush=True)
    print(f"\nimage -> text exact-caption accuracy vs Euler steps, {n} images per family and split, "
          f"best of {candidates} candidate captions")
    print("| steps | seen overall | held-out overall | seen single | seen relation | seen count |")
    print("|---|---|---|---|---|---|")
    for steps in (1, 2, 4, 8, 20):
        acc = {}
        for split in ("seen", "heldout"):
            specs = data.eval_specs(split, n)
            caps = image_to_text(tok, model, text_tok, eval_images(tok, specs), steps, candidates=candidates)
            acc[split] = data.accuracy(data.judge_captions(caps, specs), specs)
        s = acc["seen"]
        print(f"| {steps} | {s['overall']:.3f} | {acc['heldout']['overall']:.3f} | {s['single']:.3f} | "
              f"{s['relation']:.3f} | {s['count']:.3f} |", flush=True)
    path = os.path.join(ckpt_dir, "evals.jsonl")
    if os.path.exists(path):
        print("\naccuracy vs training minutes (periodic evaluations logged by train.py, with its sampling settings)")
        print("| flow step | flow minutes | total minutes | seen overall | seen single | held-out overall |")
        print("|---|---|---|---|---|---|")
        for line in open(path):
            r = json.loads(line)
            print(f"| {r['step']} | {r['minutes']:.1f} | {r.get('total_minutes', float('nan')):.1f} | "
                  f"{r['t2i_seen']['overall']:.3f} | {r['t2i_seen']['single']:.3f} | {r['t2i_heldout']['overall']:.3f} |")


def image_files(paths):
    """Files as given, folders expanded to the image files in them (sorted)."""
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(exts))
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
def reconstruct(tok, paths, dev, out, batch=256):
    """--recon: the tokenizer's round trip on image files or folders: mean PSNR over all of them, and
    a grid of the first 8 with each reconstruction under its original."""
    imgs, loaded, failed = load_images(image_files(paths), tok.cfg.image_size)
    if not imgs:
        sys.exit("error: no image could be read from --recon")
    imgs = torch.stack(imgs).to(dev)
    psnr = [evaluate_tokenizer(tok, dev, 0, images=imgs[i:i + batch])["recon"]["psnr"] * len(imgs[i:i + batch])
            for i in range(0, len(imgs), batch)]
    blind = " (decoded without captions)" if tok.cfg.text_aware else ""
    print(f"tokenizer reconstruction of {len(imgs)} images: PSNR {sum(psnr) / len(imgs):.2f} dB{blind}")
    n = min(8, len(imgs))
    rec = tok.decode(tok.encode(imgs[:n])[0]).clamp(0, 1)
    save_grid(torch.cat([imgs[:n], rec]), [os.path.basename(p) for p in loaded[:n]] + ["reconstruction"] * n,
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
    p.add_argument("--steps", type=int, default=20,
                   help="Euler steps (text -> image, and image -> text with --inverse)")
    p.add_argument("--i2t_steps", type=int, default=1, help="Euler steps image -> text (its paths are straight)")
    p.add_argument("--candidates", type=int, default=16,
                   help="image -> text: captions drawn per image, ranked by a text-aware tokenizer's redrawing")
    p.add_argument("--dec_guidance", type=float, default=1.0,
                   help="text-aware decoder: guidance towards the caption, x_c + s (x_c - x_none); 0 = none")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--from_mean", action="store_true", help="start at the text latent's mean, not a sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--out", default="samples.png", help="output PNG grid")
    p.add_argument("--sweep", action="store_true", help="print judge accuracy vs steps and CFG scale")
    p.add_argument("--sweep_prompts", type=int, default=50, help="prompts per family and split in --sweep / --eval")
    p.add_argument("--eval", action="store_true",
                   help="judge reconstructions, both directions and both round trips (a report)")
    p.add_argument("--inverse", action="store_true",
                   help="image -> text by running the text -> image field backwards (works for any model)")
    p.add_argument("--device", default="auto")
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
    if min(a.steps, a.i2t_steps, a.num_samples, a.candidates) < 1:
        sys.exit("error: --steps, --i2t_steps, --num_samples and --candidates must be at least 1")
    if a.dec_guidance < 0:
        sys.exit(f"error: --dec_guidance must be >= 0 (0 = none), not {a.dec_guidance}")
    settings = SimpleNamespace(sample_steps=a.steps, i2t_steps=a.i2t_steps, cfg_scale=a.cfg, from_mean=a.from_mean,
                               i2t_candidates=a.candidates, dec_guidance=a.dec_guidance)
    dev = torch.device(a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    torch.set_flush_denormal(True)
    try:
        if a.recon and not (prompts or a.image or a.sweep or a.eval):  # the tokenizer alone will do
            tok = tokenizer_from(load_checkpoint(a.ckpt, dev), a.ckpt, dev)
        else:
            tok, model, text_tok = load_models(a.ckpt, dev)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    recon_out = os.path.splitext(a.out)[0] + "_recon.png" if prompts else a.out  # not over the samples
    failed = reconstruct(tok, a.recon, dev, recon_out) if a.recon else 0
    if a.eval:
        print(report(evaluate_tokenizer(tok, dev, a.sweep_prompts, text_tok, guidance=a.dec_guidance), True))
        print(report(evaluate(tok, model, text_tok, settings, dev, a.sweep_prompts, inverse=a.inverse or None), True))
    if a.sweep:
        sweep(tok, model, text_tok, os.path.dirname(a.ckpt), a.sweep_prompts, dev, a.from_mean, a.candidates,
              a.dec_guidance)
    if prompts:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.formatwarning = lambda msg, *args, **kw: f"warning: {msg}\n"
            labels = [pr for pr in prompts for _ in range(a.num_samples)]
            imgs = text_to_image(tok, model, text_tok, labels, a.steps, a.cfg, a.from_mean, a.seed, a.dec_guidance)
        save_grid(imgs, labels, a.out, cols=a.num_samples if a.num_samples > 1 else 8)
        print(f"saved {len(labels)} samples to {a.out}")
    if a.image:
        imgs, loaded, bad = load_images(a.image, tok.cfg.image_size)
        failed += bad
        for path, img in zip(loaded, imgs):
            img = img.to(dev)
            inverse = a.inverse or None  # None: the model's own way (its i2t mode)
            steps = i2t_steps(model, settings, inverse)
            g = torch.Generator(dev).manual_seed(a.seed)
            cands = ft.caption_candidates(tok, model, img[None], max(a.candidates, a.num_samples), steps, inverse, g)
            caps = list(dict.fromkeys(text_tok.decode(x) for x in cands[0]))  # best first, each once
            print(f"{path}: " + " | ".join(caps[:a.num_samples]))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
