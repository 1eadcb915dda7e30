"""Train ``smol_llava``: a CLIP-style vision tower + LLaVA projector on the embedded SmolLM2-135M-Instruct (LoRA).

    # the committed weights (interp/testbed/TRAINING.md)
    python scripts/train_vlm_testbed.py --out interp/testbed/checkpoints/smol_llava --seed 0 --stage1-target words \
        --stage1-steps 500 --stage1-batch 32 --steps 1100 --batch-size 8 --lr 1e-3 --schedule constant \
        --lora-rank 8 --eval-every 100 --eval-n 30 --test-n 0 --threads 1
    # held-out accuracy in parts run side by side (test scenes 0..199), then summed into testbed.json
    for s in 0 100; do python scripts/train_vlm_testbed.py --out interp/testbed/checkpoints/smol_llava \
        --eval-part $s 100 /tmp/part$s.json & done; wait
    python scripts/train_vlm_testbed.py --out interp/testbed/checkpoints/smol_llava --merge /tmp/part*.json

Recipe (LLaVA's two stages; CPU, 1 thread for bit-for-bit determinism; SmolLM2's own weights stay frozen):

1. Alignment, no LM forward or backward. Every projected patch token f_k (576-d) is scored against SmolLM2's input
   embeddings E of the words describing its 8x8-pixel patch: cross-entropy of ``s * cos(f_k, E[w])`` over the
   colour words (+ " black" for background), the shape words (+ " black"), " top"/" bottom" and " left"/" right"
   (the patch's quadrant), s = 10, plus ``(|f_k| / mean|E| - 1)^2`` so the tokens live at the embeddings' scale.
   The label of a patch is the object with most foreground pixels in it (background if none).
2. Instruction tuning through the LM: one question per scene (uniform over colour / exist / count /
   where / caption, all answerable objects), next-token cross-entropy on the answer tokens and ``<|im_end|>``;
   gradients reach the vision tower, the projector and (``--lora-rank r``) rank-r LoRA factors on ``q_proj`` and
   ``v_proj`` of every LM layer (without LoRA a frozen SmolLM2 learns the answer format but not the image).

Only ``vision.safetensors`` (tower + projector), ``config.json`` and ``testbed.json`` are written; the LM is the
embedded GGUF at load time (``interp.model.assemble_vlm``).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from interp.testbed.scenes import (COLOURS, SHAPES, background_pixel_mask, make_dataset,  # noqa: E402
                                   make_scene, scene_seed)
from interp.testbed.smol import (IMAGE_MEAN, IMAGE_STD, N_SMOL_IMAGE_TOKENS, SMOL_GRID, SMOL_PATCH,  # noqa: E402
                                 build_config, build_meta)

STAGE1_SCALE = 10.0
LORA_TARGETS = ("q_proj", "v_proj")


def build_model(seed: int):
    """(llava, tokenizer): SmolLM2 (frozen, requires_grad False) + a fresh vision tower and projector."""
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    import interp
    smol = interp.load("smollm2")
    lm, tok = smol.hf, smol.tokenizer
    for p in lm.parameters():
        p.requires_grad_(False)
    cfg = build_config(lm.config)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    torch.manual_seed(seed)
    model.model.vision_tower = CLIPVisionModel(cfg.vision_config)
    model.model.multi_modal_projector = LlavaMultiModalProjector(cfg)
    return model, tok


class LoRALinear(torch.nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with ``A`` [r, in] (Gaussian, std 1/sqrt(in)) and ``B`` [out, r] (zeros,
    so training starts from the frozen LM exactly); ``interp.model.assemble_vlm`` merges ``W + (alpha/r) B A``."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(model, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """Wrap ``targets`` (e.g. q_proj, v_proj) of every LM layer in :class:`LoRALinear` (the LM's own weights stay frozen)."""
    for layer in model.model.language_model.layers:
        for t in targets:
            setattr(layer.self_attn, t, LoRALinear(getattr(layer.self_attn, t), rank, alpha))


def vision_params(model) -> list[torch.nn.Parameter]:
    lora = [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    return list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters()) + lora


def vision_state(model) -> dict:
    """The trained tensors: vision tower, projector and (when used) the LoRA factors, keyed by the LM module they
    adapt (``model.language_model.layers.{i}.self_attn.q_proj.lora_A``)."""
    return {k.replace(".base.", "."): v.detach().contiguous() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or k.endswith((".lora_A", ".lora_B"))}


def pixel_values(scenes) -> torch.Tensor:
    px = torch.stack([s.image for s in scenes])
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (px - mean) / std


def patch_labels(scene) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour, shape) label of each of the 16 patches: 0 = background, else 1 + index (most foreground pixels)."""
    fg = ~background_pixel_mask(scene)  # [32, 32]
    counts = torch.zeros(len(scene.objects), N_SMOL_IMAGE_TOKENS)
    for i, o in enumerate(scene.objects):
        m = torch.zeros(32, 32, dtype=torch.bool)
        x0, y0, x1, y1 = o.box
        m[y0:y1, x0:x1] = True
        m &= fg
        counts[i] = m.view(SMOL_GRID, SMOL_PATCH, SMOL_GRID, SMOL_PATCH).sum((1, 3)).reshape(-1).float()
    col = torch.zeros(N_SMOL_IMAGE_TOKENS, dtype=torch.long)
    shp = torch.zeros(N_SMOL_IMAGE_TOKENS, dtype=torch.long)
    best = counts.argmax(0)
    has = counts.max(0).values > 0
    for k in range(N_SMOL_IMAGE_TOKENS):
        if has[k]:
            o = scene.objects[int(best[k])]
            col[k] = 1 + COLOURS.index(o.colour)
            shp[k] = 1 + SHAPES.index(o.shape)
    return col, shp


def word_id(tok, word: str) -> int:
    return tok(word, add_special_tokens=False)["input_ids"][0]


QUADRANT_SLOTS = ("colour", "shape", "vert", "horiz")  # the 2x2 patch block of a quadrant, row-major


def word_targets(scene) -> list[str]:
    """``--stage1 words``: the word each of the 16 image tokens should become. Quadrant q (its 2x2 block of 8x8-pixel
    patches) holds [colour, shape / vertical, horizontal] of its object (" nothing" twice when it is empty): the
    image reads like a caption laid out on the grid, e.g. " red circle | top left"."""
    from interp.testbed.vocab import WHERE_WORDS
    out = [""] * N_SMOL_IMAGE_TOKENS
    by_q = {o.quadrant: o for o in scene.objects}
    for q, name in enumerate(WHERE_WORDS):
        qr, qc = divmod(q, 2)
        o = by_q.get(name)
        v, h = name.split("-")
        words = [(" " + o.colour) if o else " nothing", (" " + o.shape) if o else " nothing", " " + v, " " + h]
        for j, w in enumerate(words):
            r, c = 2 * qr + j // 2, 2 * qc + j % 2
            out[r * SMOL_GRID + c] = w
    return out


def stage1_words(model, tok, steps: int, batch_size: int, seed: int, lr: float, log=print) -> None:
    """Stage 1, ``words`` targets: every image token -> the exact input embedding of its word (MSE, relative to the
    embeddings' mean squared norm) + cross-entropy of 10 cos over the candidate words."""
    E = model.model.language_model.embed_tokens.weight.detach()
    vocab = [" nothing", " top", " bottom", " left", " right"] + [" " + c for c in COLOURS] + [" " + s for s in SHAPES]
    ids = torch.tensor([word_id(tok, w) for w in vocab])
    W = E[ids]
    Wn = F.normalize(W, dim=-1)
    scale2 = W.pow(2).sum(-1).mean()
    params = vision_params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        scenes = [make_scene(scene_seed(step * batch_size + j, seed, "train") + 700_000) for j in range(batch_size)]
        feats = torch.stack(model.model.get_image_features(pixel_values(scenes)).pooler_output)  # [B,16,576]
        lab = torch.tensor([[vocab.index(w) for w in word_targets(s)] for s in scenes])  # [B,16]
        logits = STAGE1_SCALE * F.normalize(feats, dim=-1) @ Wn.T
        loss = F.cross_entropy(logits.reshape(-1, len(vocab)), lab.reshape(-1)) + \
            (feats - W[lab]).pow(2).sum(-1).mean() / scale2
        lr_t = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr_t
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                acc = (logits.argmax(-1) == lab).float().mean().item()
                rel = ((feats - W[lab]).pow(2).sum(-1).mean() / scale2).item()
            log(f"[stage1 words] step {step:4d} loss {loss.item():.4f} word acc {acc:.3f} rel mse {rel:.3f} "
                f"({time.time() - t0:.0f}s)", flush=True)


def stage1(model, tok, steps: int, batch_size: int, seed: int, lr: float, log=print) -> None:
    E = model.model.language_model.embed_tokens.weight.detach()
    e_norm = E.norm(dim=-1).mean()
    cands = {
        "colour": [" black"] + [" " + c for c in COLOURS],
        "shape": [" black"] + [" " + s for s in SHAPES],
        "vert": [" top", " bottom"],
        "horiz": [" left", " right"],
    }
    W = {k: F.normalize(E[torch.tensor([word_id(tok, w) for w in v])], dim=-1) for k, v in cands.items()}
    r, c = torch.arange(N_SMOL_IMAGE_TOKENS) // SMOL_GRID, torch.arange(N_SMOL_IMAGE_TOKENS) % SMOL_GRID
    vert = (r >= SMOL_GRID // 2).long()
    horiz = (c >= SMOL_GRID // 2).long()
    params = vision_params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        scenes = [make_scene(scene_seed(step * batch_size + j, seed, "train") + 700_000) for j in range(batch_size)]
        feats = torch.stack(model.model.get_image_features(pixel_values(scenes)).pooler_output)  # [B,16,576]
        fn = F.normalize(feats, dim=-1)
        labs = [patch_labels(s) for s in scenes]
        pcol = torch.stack([a for a, _ in labs])
        pshp = torch.stack([b for _, b in labs])
        lc = STAGE1_SCALE * fn @ W["colour"].T
        ls = STAGE1_SCALE * fn @ W["shape"].T
        lv = STAGE1_SCALE * fn @ W["vert"].T
        lh = STAGE1_SCALE * fn @ W["horiz"].T
        loss = (F.cross_entropy(lc.reshape(-1, lc.shape[-1]), pcol.reshape(-1))
                + F.cross_entropy(ls.reshape(-1, ls.shape[-1]), pshp.reshape(-1))
                + F.cross_entropy(lv.reshape(-1, 2), vert.repeat(batch_size))
                + F.cross_entropy(lh.reshape(-1, 2), horiz.repeat(batch_size))
                + ((feats.norm(dim=-1) / e_norm - 1) ** 2).mean())
        lr_t = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr_t
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                obj = pcol > 0
                ca = (lc.argmax(-1) == pcol)[obj].float().mean().item()
                sa = (ls.argmax(-1) == pshp)[obj].float().mean().item()
                ba = (lc.argmax(-1) == pcol)[~obj].float().mean().item()
            log(f"[stage1] step {step:4d} loss {loss.item():.4f} colour {ca:.2f} shape {sa:.2f} background {ba:.2f} "
                f"norm {feats.norm(dim=-1).mean().item() / e_norm.item():.2f} ({time.time() - t0:.0f}s)", flush=True)


def encode_batch(tok, meta: dict, scenes, questions) -> dict:
    """Right-padded prompt+answer ids, attention mask, and the target of every position (-100 off the answer)."""
    from interp.testbed import prompt_text
    seqs, starts = [], []
    for q in questions:
        p = tok(prompt_text(meta, q.text), add_special_tokens=False)["input_ids"]
        full = tok(prompt_text(meta, q.text, q.answer), add_special_tokens=False)["input_ids"]
        assert full[: len(p)] == p, (q.text, q.answer)
        seqs.append(full)
        starts.append(len(p))
    B, L = len(seqs), max(len(x) for x in seqs)
    ids = torch.full((B, L), meta["pad_token_id"], dtype=torch.long)
    am = torch.zeros((B, L), dtype=torch.long)
    tgt = torch.full((B, L), -100, dtype=torch.long)
    for i, (x, a0) in enumerate(zip(seqs, starts)):
        ids[i, : len(x)] = torch.tensor(x)
        am[i, : len(x)] = 1
        tgt[i, a0 - 1 : len(x) - 1] = torch.tensor(x[a0:])  # hidden state at p predicts token p+1
    return {"input_ids": ids, "attention_mask": am, "targets": tgt, "pixel_values": pixel_values(scenes)}


def stage2_loss(model, batch) -> torch.Tensor:
    h = model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    sel = batch["targets"] != -100
    logits = model.lm_head(h[sel])  # only the answer positions go through the 49k-word head
    return F.cross_entropy(logits, batch["targets"][sel])


def sample_questions(scenes, rng: random.Random):
    from interp.testbed.scenes import QUESTION_TYPES
    out = []
    for s in scenes:
        while True:
            qt = rng.choice(QUESTION_TYPES)
            qs = [q for q in s.questions(rng=rng, qtypes=(qt,), all_objects=True)]
            if qs:
                out.append(rng.choice(qs))
                break
    return out


def train(out: str | None, seed: int = 0, stage1_steps: int = 1500, stage1_batch: int = 64, stage1_lr: float = 2e-3,
          steps: int = 300, batch_size: int = 8, lr: float = 1e-3, warmup: int = 20, eval_every: int = 100,
          eval_n: int = 40, test_n: int = 300, threads: int = 1, time_only: int = 0, stage1_target: str = "patch",
          lora_rank: int = 0, lora_alpha: float = 16.0, schedule: str = "cosine", log=print) -> dict:
    from interp.testbed import evaluate_accuracy

    torch.set_num_threads(threads)
    random.seed(seed)
    t_start = time.time()
    model, tok = build_model(seed)
    model.train()
    model.model.language_model.eval()  # no dropout anyway; the LM is frozen
    meta = build_meta()
    meta["image_tokens"] = ("stage 1 'words': quadrant q's 2x2 patch block is trained towards the words [colour, shape / "
                            "vertical, horizontal] of its object (' nothing' if empty)" if stage1_target == "words" else
                            "stage 1 'patch': each patch token aligned with the colour, shape and quadrant words of its patch")
    n_train = sum(p.numel() for p in vision_params(model))
    log(f"smol_llava: trained params {n_train}, stage1 {stage1_steps}x{stage1_batch}, stage2 {steps}x{batch_size}",
        flush=True)
    if time_only:
        if lora_rank:
            add_lora(model, lora_rank, lora_alpha, LORA_TARGETS)
        rng = random.Random(seed)
        params = vision_params(model)
        opt = torch.optim.AdamW(vision_params(model), lr=lr)
        for i in range(time_only):
            t0 = time.time()
            scenes = [make_scene(scene_seed(i * batch_size + j, seed, "train")) for j in range(batch_size)]
            b = encode_batch(tok, meta, scenes, sample_questions(scenes, rng))
            loss = stage2_loss(model, b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log(f"stage2 step {i}: {time.time() - t0:.2f}s, L={b['input_ids'].shape[1]}, loss {loss.item():.3f}",
                flush=True)
        t0 = time.time()
        stage1(model, tok, 20, stage1_batch, seed, stage1_lr, log=lambda *a, **k: None)
        log(f"stage1: {(time.time() - t0) / 20:.3f}s/step", flush=True)
        return {}
    t1 = time.time()
    (stage1_words if stage1_target == "words" else stage1)(model, tok, stage1_steps, stage1_batch, seed, stage1_lr,
                                                            log=log)
    stage1_s = time.time() - t1
    val = make_dataset(eval_n, seed=seed, split="val")
    acc = evaluate_accuracy(model, tok, meta, val)
    log(f"[stage1 done] val {json.dumps({k: round(v, 3) for k, v in acc.items() if k != 'n'})}", flush=True)
    if lora_rank:
        torch.manual_seed(seed + 2)
        add_lora(model, lora_rank, lora_alpha, LORA_TARGETS)
        meta["language_model_training"] = (f"LoRA rank {lora_rank} (alpha {lora_alpha}) on {', '.join(LORA_TARGETS)} of "
                                           "every layer, merged into the GGUF weights at load time; no other LM "
                                           "weight is trained")
        meta["lora"] = {"rank": lora_rank, "alpha": lora_alpha, "targets": list(LORA_TARGETS)}
    params = vision_params(model)
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed + 1)
    t2 = time.time()
    for step in range(steps):
        scenes = [make_scene(scene_seed(step * batch_size + j, seed, "train")) for j in range(batch_size)]
        batch = encode_batch(tok, meta, scenes, sample_questions(scenes, rng))
        loss = stage2_loss(model, batch)
        decay = 1.0 if schedule == "constant" else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps))
        lr_t = lr * min(1.0, (step + 1) / warmup) * decay
        for g in opt.param_groups:
            g["lr"] = lr_t
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0:
            log(f"[stage2] step {step:4d} loss {loss.item():.4f} ({time.time() - t2:.0f}s)", flush=True)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            acc = evaluate_accuracy(model, tok, meta, val)
            log(f"[stage2] step {step + 1} val {json.dumps({k: round(v, 3) for k, v in acc.items() if k != 'n'})}",
                flush=True)
            if out:
                save(model, meta, out, {})
    stage2_s = time.time() - t2
    train_s = time.time() - t_start
    log(f"training done in {train_s:.0f}s (stage1 {stage1_s:.0f}s, stage2 {stage2_s:.0f}s)", flush=True)
    info = {
        "command": "python " + " ".join(sys.argv),
        "seed": seed, "stage1_target": stage1_target, "stage1_steps": stage1_steps, "stage1_batch": stage1_batch, "stage1_lr": stage1_lr,
        "steps": steps, "batch_size": batch_size, "lr": lr, "threads": threads,
        "n_trained_params": n_train, "lm": (f"LoRA rank {lora_rank}" if lora_rank else "frozen"),
        "lora_rank": lora_rank, "lora_alpha": lora_alpha, "schedule": schedule,
        "stage1_wall_time_s": round(stage1_s, 1), "stage2_wall_time_s": round(stage2_s, 1),
        "train_wall_time_s": round(train_s, 1), "torch": torch.__version__,
    }
    if out:
        save(model, meta, out, info)
    if test_n:
        t3 = time.time()
        test = make_dataset(test_n, seed=0, split="test")
        acc = evaluate_accuracy(model, tok, meta, test)
        info["test_accuracy"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in acc.items()}
        info["test_split"] = f"make_dataset({test_n}, seed=0, split='test')"
        info["test_wall_time_s"] = round(time.time() - t3, 1)
        log(f"test {json.dumps(info['test_accuracy'])}", flush=True)
        if out:
            save(model, meta, out, info)
    return info


def save(model, meta: dict, out: str, info: dict) -> None:
    from safetensors.torch import save_file
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    save_file(vision_state(model), str(d / "vision.safetensors"))
    cfg = model.config.to_dict()
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    m = dict(meta)
    if info:
        m["training"] = info
    (d / "testbed.json").write_text(json.dumps(m, indent=2) + "\n")


def eval_part(checkpoint: str, start: int, n: int, out: str, threads: int = 1) -> dict:
    """Held-out accuracy on test scenes ``start .. start+n-1`` (``make_dataset(.., seed=0, split='test')``'s scenes):
    per type the counts correct and asked, written to ``out`` (parts run side by side, then ``--merge``)."""
    from collections import Counter

    from interp.testbed import evaluate_accuracy, load_testbed
    torch.set_num_threads(threads)
    model, tok, meta = load_testbed(checkpoint)
    scenes = [make_scene(scene_seed(i, 0, "test")) for i in range(start, start + n)]
    acc = evaluate_accuracy(model, tok, meta, scenes, return_predictions=True)
    right, asked = Counter(), Counter()
    for _, q, pred in acc["predictions"]:
        asked[q.qtype] += 1
        right[q.qtype] += int(pred == q.answer)
    res = {"start": start, "n": n, "right": dict(right), "asked": dict(asked),
           "examples": [[q.text, q.answer, pred] for _, q, pred in acc["predictions"][:12]]}
    Path(out).write_text(json.dumps(res, indent=1))
    return res


def merge_parts(checkpoint: str, parts: list[str], wall_s: float | None = None) -> dict:
    """Sum the ``--eval-part`` counts into ``testbed.json``'s ``training.test_accuracy``."""
    from collections import Counter
    right, asked, n, starts = Counter(), Counter(), 0, []
    for f in parts:
        r = json.loads(Path(f).read_text())
        right.update(r["right"])
        asked.update(r["asked"])
        n += r["n"]
        starts.append((r["start"], r["n"]))
    starts.sort()
    assert starts[0][0] == 0 and all(a + m == b for (a, m), (b, _) in zip(starts, starts[1:])), starts
    from interp.testbed.scenes import QUESTION_TYPES
    acc = {t: round(right[t] / asked[t], 4) for t in QUESTION_TYPES if asked[t]}
    acc["overall"] = round(sum(right.values()) / sum(asked.values()), 4)
    acc["n"] = dict(asked)
    d = Path(checkpoint)
    meta = json.loads((d / "testbed.json").read_text())
    meta.setdefault("training", {})["test_accuracy"] = acc
    meta["training"]["test_split"] = f"make_dataset({n}, seed=0, split='test')"
    if wall_s is not None:
        meta["training"]["test_wall_time_s"] = wall_s
    (d / "testbed.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(acc))
    return acc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="checkpoint folder (vision.safetensors, config.json, testbed.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init and the training scenes")
    ap.add_argument("--stage1-steps", type=int, default=1500, help="alignment steps (no LM pass)")
    ap.add_argument("--stage1-target", choices=("patch", "words"), default="patch",
                    help="patch: align each patch token with its patch's colour/shape/quadrant words (cosine); words: "
                         "make quadrant q's four tokens the embeddings of [colour, shape, vertical, horizontal] words")
    ap.add_argument("--stage1-batch", type=int, default=64, help="images per alignment step")
    ap.add_argument("--stage1-lr", type=float, default=2e-3, help="alignment learning rate")
    ap.add_argument("--steps", type=int, default=300, help="instruction steps through the frozen LM")
    ap.add_argument("--batch-size", type=int, default=8, help="scenes (one question each) per instruction step")
    ap.add_argument("--lr", type=float, default=1e-3, help="instruction-stage learning rate (warm-up, cosine)")
    ap.add_argument("--eval-every", type=int, default=100, help="validation every N instruction steps")
    ap.add_argument("--eval-n", type=int, default=40, help="validation scenes")
    ap.add_argument("--test-n", type=int, default=300, help="held-out test scenes evaluated at the end")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-for-bit deterministic)")
    ap.add_argument("--lora-rank", type=int, default=0, help="stage 2: LoRA rank on q_proj/v_proj of every LM layer "
                    "(0: the LM stays frozen)")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (scale = alpha / rank)")
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                    help="stage-2 learning rate after warm-up (constant: a run stopped at step k equals --steps k)")
    ap.add_argument("--time", type=int, default=0, help="only time N instruction steps and 20 alignment steps")
    ap.add_argument("--eval-part", nargs=3, metavar=("START", "N", "OUT"), default=None,
                    help="only evaluate --out on test scenes START..START+N-1, counts to the json file OUT")
    ap.add_argument("--merge", nargs="+", default=None, help="sum --eval-part files into --out's testbed.json")
    ap.add_argument("--merge-wall", type=float, default=None, help="test wall time (s) to record with --merge")
    a = ap.parse_args(argv)
    if a.eval_part:
        eval_part(a.out, int(a.eval_part[0]), int(a.eval_part[1]), a.eval_part[2], a.threads)
        return
    if a.merge:
        merge_parts(a.out, a.merge, a.merge_wall)
        return
    train(a.out, seed=a.seed, stage1_steps=a.stage1_steps, stage1_batch=a.stage1_batch, stage1_lr=a.stage1_lr,
          steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every, eval_n=a.eval_n,
          test_n=a.test_n, threads=a.threads, time_only=a.time, stage1_target=a.stage1_target,
          lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, schedule=a.schedule)


if __name__ == "__main__":
    main()
