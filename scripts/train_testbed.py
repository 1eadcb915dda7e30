"""Train the testbed vision-language models.

    python scripts/train_testbed.py --model ar        --out interp/testbed/checkpoints/llava_ar        --seed 0
    python scripts/train_testbed.py --model diffusion --out interp/testbed/checkpoints/llada_diffusion --seed 0

Recipe (CPU, 1 thread by default -- robust on a shared, oversubscribed machine):

0. Init: every Linear/Embedding ~ N(0, 0.08) (``initializer_range``; HF's 0.02 default
   made the 64-wide model learn shape-conditioned attention far more slowly).
1. Vision warm-up (LLaVA stage 1 analogue): CLIP tower + projector (+ the LM's word
   embeddings) are trained alone to predict the set of (colour, shape) pairs and the
   object count from the *mean* image token through a throw-away linear head, and the
   colour and shape of every patch by dot product with the colour/shape word embeddings.
2. Full training with all questions about a scene packed in one sequence::

       <bos> <image>*64 | user : q1 assistant : a1 <eos> | user : q2 ... | ...

   A 4D additive attention mask + position ids make every question block see only the
   image prefix and itself (positions restart after the prefix), so each block is
   computed exactly as the plain one-question sequence would be (AR).  The prefix never
   sees question blocks.
   * AR: next-token cross-entropy on answer tokens and ``<eos>``.
   * Diffusion: answer region = answer + ``<eos>`` padded to ``GEN_LEN`` tokens; per
     block ``t ~ U(0,1)``, ``p = (1-eps) t + eps``, each answer-region token is replaced by
     ``<mask>`` with prob ``p`` (at least one); loss = CE at masked positions (no shift)
     weighted ``1/p_marg`` with ``p_marg = p + (1-p)^3/3`` the exact marginal masking
     probability under the at-least-one rule (= 1/t except for small t; plain 1/t gave
     rare 1/eps-weighted spikes that stalled training), divided by the number of
     answer-region tokens.
   * AR also: ``--image-head-sparsity 0.005`` (the AR default) adds 0.005 * sum_(l,h) sqrt(m_lh), m_lh the mean
     attention of LM head (l, h) from question/answer tokens to the image, so that few heads read the image.
3. Diffusion only: a final phase with plain one-question sequences (fully bidirectional,
   the image tokens now also see the question) so training matches inference exactly.

Evaluation uses the plain one-question format on held-out ``test``-split scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from interp.testbed.diffusion import masked_diffusion_loss  # noqa: E402
from interp.testbed.scenes import (COLOURS,  # noqa: E402
                                    COUNT_WORDS, N_PATCHES, NOISE_STD, QUESTION_TYPES, SHAPES, WHERE_WORDS,
                     Question, background_pixel_mask, make_scene, scene_seed)
from interp.testbed.vocab import BOS, EOS, IMAGE, MASK, PAD, VOCAB, WORDS, build_tokenizer  # noqa: E402

GEN_LEN = 3  # answer region of the diffusion model (answer + <eos> padding)
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]
DIFFUSION_EPS = 1e-3

MODEL_DIMS = dict(
    vision_hidden=64, vision_layers=2, vision_heads=4, vision_intermediate=128,
    text_hidden=64, text_layers=3, text_heads=4, text_kv_heads=4, text_intermediate=192,
    # LlavaPreTrainedModel initialises every Linear/Embedding (CLIP's too) with
    # N(0, text_config.initializer_range); HF's default 0.02 is tuned for wide models and
    # leaves a 64-wide model with near-uniform attention that learns content lookup slowly.
    initializer_range=0.08,
)

TOK = {w: i for i, w in enumerate(VOCAB)}


# ---------------------------------------------------------------------- model
def build_config(kind: str, vocab_size: int = len(VOCAB)):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    d = MODEL_DIMS
    vision = CLIPVisionConfig(
        hidden_size=d["vision_hidden"], intermediate_size=d["vision_intermediate"],
        num_hidden_layers=d["vision_layers"], num_attention_heads=d["vision_heads"],
        patch_size=4, image_size=32, num_channels=3, projection_dim=d["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=d["text_hidden"], intermediate_size=d["text_intermediate"],
        num_hidden_layers=d["text_layers"], num_attention_heads=d["text_heads"],
        num_key_value_heads=d["text_kv_heads"], max_position_embeddings=256,
        pad_token_id=TOK[PAD], bos_token_id=TOK[BOS], eos_token_id=TOK[EOS],
        tie_word_embeddings=False, is_causal=(kind == "ar"), initializer_range=d["initializer_range"],
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=TOK[IMAGE], image_seq_length=N_PATCHES,
        # -1: last CLIP layer (0 would be the embeddings; falsy values are a pitfall).
        vision_feature_layer=-1,
        # "default" drops CLIP's CLS token -> exactly 64 patch features for 64 <image> tokens
        # ("full" would give 65 features and a token/feature count mismatch).
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_model(kind: str, seed: int, attn_implementation: str = "eager"):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = build_config(kind)
    cfg._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(cfg)
    return model


def build_meta(kind: str) -> dict:
    return {
        "name": "llava_ar" if kind == "ar" else "llada_diffusion",
        "kind": kind,
        "model_class": "LlavaForConditionalGeneration",
        "image_size": 32,
        "patch_size": 4,
        "grid": [8, 8],
        "n_image_tokens": N_PATCHES,
        "image_token": IMAGE,
        "image_token_id": TOK[IMAGE],
        "image_token_offset": 1,
        "patch_index": "image token k is at sequence position image_token_offset + k; patch row = k // 8, col = k % 8",
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "normalization": "pixel_values = (image - mean) / std, image in [0,1], shape [B,3,32,32]",
        "prompt_format": "<bos> <image>*64 user : {question} assistant : {answer} <eos>",
        "bos_token_id": TOK[BOS],
        "eos_token_id": TOK[EOS],
        "pad_token_id": TOK[PAD],
        "mask_token_id": TOK[MASK],
        "question_types": list(QUESTION_TYPES),
        "question_templates": {
            "colour": "what color is the {shape} ?",
            "exist": "is there a {colour} {shape} ?",
            "count": "how many objects ?",
            "where": "where is the {shape} ?",
            "caption": "describe .",
        },
        "shapes": SHAPES,
        "colours": COLOURS,
        "gen_len": GEN_LEN if kind == "diffusion" else 3,
        "diffusion_steps": GEN_LEN if kind == "diffusion" else None,
        "diffusion_block_len": GEN_LEN if kind == "diffusion" else None,
        "answer_region": ("answer + <eos>, padded with <eos> to gen_len tokens" if kind == "diffusion"
                          else "answer + <eos>; greedy next-token decoding"),
        "attention": "causal" if kind == "ar" else "bidirectional (text_config.is_causal=False)",
    }


# ---------------------------------------------------------------------- batches
def _ids(text: str) -> list[int]:
    return [TOK[w] for w in text.split()]


PREFIX = [TOK[BOS]] + [TOK[IMAGE]] * N_PATCHES


def _block_tokens(q, kind: str):
    """Token ids of one question block and the slice of its answer region."""
    head = _ids(f"user : {q.text} assistant :")
    ans = _ids(q.answer) + [TOK[EOS]]
    if kind == "diffusion":
        ans = ans + [TOK[EOS]] * (GEN_LEN - len(ans))
    return head + ans, len(head)


def text_questions(rng: random.Random, n: int) -> list[Question]:
    """``n`` questions whose answer is in the question's own words, asked beside the image (``--text-questions``).

    Like the language-only turns of LLaVA's instruction data, they need heads that read the text and must not be
    swayed by the image: "what color is a red circle ?" -> red (the scene's circle may be another colour),
    "is a red circle a square ?" -> no, "how many red blue ?" -> two, "describe green cross ." -> green cross.
    """
    out = []
    for _ in range(n):
        c, s = rng.choice(COLOURS), rng.choice(SHAPES)
        kind = rng.randrange(4)
        if kind == 0:
            out.append(Question("text", f"what color is a {c} {s} ?", c, None))
        elif kind == 1:
            s2 = s if rng.random() < 0.5 else rng.choice([x for x in SHAPES if x != s])
            out.append(Question("text", f"is a {c} {s} a {s2} ?", "yes" if s2 == s else "no", None))
        elif kind == 2:
            k = rng.randrange(1, 4)
            words = " ".join(rng.choice(COLOURS + SHAPES) for _ in range(k))
            out.append(Question("text", f"how many {words} ?", COUNT_WORDS[k - 1], None))
        else:
            out.append(Question("text", f"describe {c} {s} .", f"{c} {s}", None))
    return out


def make_batch(scenes, kind: str, rng: random.Random, gen: torch.Generator, packed: bool = True,
               n_text_questions: int = 0):
    """Build a training batch.

    packed=True: every question about a scene in one sequence (block mask).
    packed=False: one random question per scene, plain format (diffusion final phase).
    Returns dict(input_ids, position_ids, attention_mask (4D additive), pixel_values,
    targets, loss_mask, p_mask, n_answer).
    """
    seqs, blocks, ans_masks = [], [], []
    for s in scenes:
        if packed:
            qs = s.questions(rng=rng, all_objects=True) + text_questions(rng, n_text_questions)
            rng.shuffle(qs)
        else:
            qs = [rng.choice(s.questions(rng=rng))]
        ids = list(PREFIX)
        blk = [0] * len(PREFIX)
        am = [False] * len(PREFIX)
        for bi, q in enumerate(qs, start=1):
            toks, a0 = _block_tokens(q, kind)
            ids += toks
            blk += [bi if packed else 0] * len(toks)
            am += [False] * a0 + [True] * (len(toks) - a0)
        seqs.append(ids)
        blocks.append(blk)
        ans_masks.append(am)
    B, L = len(seqs), max(len(x) for x in seqs)
    input_ids = torch.full((B, L), TOK[PAD], dtype=torch.long)
    block = torch.full((B, L), -1, dtype=torch.long)
    ans = torch.zeros((B, L), dtype=torch.bool)
    pos = torch.zeros((B, L), dtype=torch.long)
    for i, (x, b, a) in enumerate(zip(seqs, blocks, ans_masks)):
        n = len(x)
        input_ids[i, :n] = torch.tensor(x)
        block[i, :n] = torch.tensor(b)
        ans[i, :n] = torch.tensor(a)
        # positions: prefix 0..64, each block restarts at 65 (packed) / plain 0..n-1
        p = torch.arange(n)
        if packed:
            starts = {}
            for j, bb in enumerate(b):
                if bb not in starts:
                    starts[bb] = j
            offs = torch.tensor([starts[bb] - (len(PREFIX) if bb > 0 else 0) for bb in b])
            p = p - offs
        pos[i, :n] = p
        pos[i, n:] = torch.arange(L - n) + (p[-1] + 1 if n else 0)
    bi_, bj_ = block[:, :, None], block[:, None, :]
    allowed = (bj_ == 0) | (bj_ == bi_)
    if kind == "ar":
        allowed &= torch.ones(L, L, dtype=torch.bool).tril()[None]
    allowed |= torch.eye(L, dtype=torch.bool)[None]
    attn = torch.zeros((B, 1, L, L), dtype=torch.float32)
    attn.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)

    pixel_values = torch.stack([s.image for s in scenes])
    pixel_values = (pixel_values - 0.5) / 0.5
    out = dict(input_ids=input_ids, position_ids=pos, attention_mask=attn, pixel_values=pixel_values,
               answer_mask=ans, text_query=block > 0)
    if kind == "ar":
        # logits at p-1 predict the answer token at p
        targets = torch.full((B, L), -100, dtype=torch.long)
        targets[:, :-1] = torch.where(ans[:, 1:], input_ids[:, 1:], torch.full_like(input_ids[:, 1:], -100))
        out["targets"] = targets
    else:
        # per-block masking ratio t ~ U(0,1) (p = (1-eps) t + eps, as in LLaDA)
        nblk = int(block.max()) + 1
        t = torch.rand((B, nblk), generator=gen)
        pm_blk = (1 - DIFFUSION_EPS) * t + DIFFUSION_EPS
        p_mask = torch.gather(pm_blk, 1, block.clamp(min=0))
        masked = (torch.rand((B, L), generator=gen) < p_mask) & ans
        # Loss weight: 1 / (marginal probability that a token is masked).  With the
        # "at least one masked token per block" rule (one of the GEN_LEN answer-region
        # tokens is forced when none was drawn) that marginal is p + (1-p)^n / n, which is
        # ~p (weight ~1/t) unless t is small.  Using plain 1/t here gives the forced
        # tokens weights up to 1/eps, whose spikes dominate (and, with gradient clipping,
        # wipe out) whole steps; this weight keeps the estimator unbiased and bounded.
        n_reg = GEN_LEN
        p_weight = p_mask + (1 - p_mask) ** n_reg / n_reg
        # at least one masked token per block
        for i in range(B):
            for bb in block[i].unique().tolist():
                if bb < 0:
                    continue
                sel = ans[i] & (block[i] == bb)
                if sel.any() and not (masked[i] & sel).any():
                    idx = sel.nonzero().squeeze(1)
                    masked[i, idx[torch.randint(len(idx), (1,), generator=gen)]] = True
        out["targets"] = input_ids.clone()
        out["input_ids"] = torch.where(masked, torch.full_like(input_ids, TOK[MASK]), input_ids)
        out["masked"] = masked
        out["p_mask"] = p_weight
        out["n_answer"] = int(ans.sum())
    return out


def make_text_batch(rng: random.Random, batch_size: int, min_len: int = 4, max_len: int = 16,
                    chat_share: float = 0.0) -> dict:
    """Text-only copy sequences ``<bos> w1..wn w1..wn <eos>`` over the word vocabulary; the loss is on the
    repeat (``--text-weight``/``--text-steps``): like the text-only data LLaVA's LM saw, a skill that needs
    heads which read text, not the image. With ``chat_share`` (``--text-chat``) that share of the sequences are
    chats of 1-4 :func:`text_questions` turns instead, scored on every next token as in LM pretraining."""
    words = [TOK[w] for w in WORDS]
    seqs, tgts = [], []
    for _ in range(batch_size):
        if chat_share > 0 and rng.random() < chat_share:  # 1-4 text-only turns, next-token loss on every token
            ids = [TOK[BOS]]
            for q in text_questions(rng, rng.randint(1, 4)):
                ids += _ids(f"user : {q.text} assistant : {q.answer}") + [TOK[EOS]]
            seqs.append(ids)
            tgts.append([-100] + ids[1:])
            continue
        n = rng.randint(min_len, max_len)
        w = [rng.choice(words) for _ in range(n)]
        ids = [TOK[BOS]] + w + w + [TOK[EOS]]
        t = [-100] * (n + 1) + w + [TOK[EOS]]  # target of position p is ids[p]; loss on the repeat
        seqs.append(ids)
        tgts.append(t)
    L = max(len(x) for x in seqs)
    ids = torch.full((batch_size, L), TOK[PAD], dtype=torch.long)
    am = torch.zeros((batch_size, L), dtype=torch.long)
    tg = torch.full((batch_size, L), -100, dtype=torch.long)
    for i, (x, t) in enumerate(zip(seqs, tgts)):
        ids[i, : len(x)] = torch.tensor(x)
        am[i, : len(x)] = 1
        tg[i, : len(t) - 1] = torch.tensor(t[1:])  # logits at p predict ids[p+1]
    return {"input_ids": ids, "attention_mask": am, "targets": tg}


def text_loss(model, batch) -> torch.Tensor:
    h = model.model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.lm_head(h)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), ignore_index=-100)


def image_attention_penalty(attentions: tuple[torch.Tensor, ...], text_query: torch.Tensor) -> torch.Tensor:
    """sum over LM heads (l, h) of sqrt(m_lh + 1e-4), m_lh = the mean attention mass that the text queries (question
    and answer tokens, ``text_query`` [B, L]) put on the image tokens of ``PREFIX``. The square root is concave, so
    the penalty is smallest when a few heads read the image and the rest read none of it (``--image-head-sparsity``)."""
    w = text_query.float()
    total = 0.0
    for a in attentions:  # [B, H, L, L]
        mass = a[..., 1:len(PREFIX)].sum(-1)  # [B, H, L]: keys <image>*64 after <bos>
        m = (mass * w[:, None]).sum((0, 2)) / w.sum()
        total = total + (m + 1e-4).sqrt().sum()
    return total


def compute_loss(model, batch, kind: str, image_head_sparsity: float = 0.0):
    out = model(
        input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        output_attentions=image_head_sparsity > 0,
    )
    logits = out.logits
    if kind == "ar":
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), ignore_index=-100)
    else:
        loss = masked_diffusion_loss(logits, batch["targets"], batch["masked"], batch["p_mask"], batch["n_answer"])
    if image_head_sparsity > 0:
        loss = loss + image_head_sparsity * image_attention_penalty(out.attentions, batch["text_query"])
    return loss


def vary_background(scene, rng: random.Random, share: float):
    """With probability ``share``, repaint the scene's background (``--vary-background``): a random dark-to-mid grey
    with a slight tint, a linear gradient and pixel noise. Natural images have no constant background; a constant
    one gives every head a free, image-independent place to park its attention on the image tokens."""
    if rng.random() >= share:
        return scene
    bg = background_pixel_mask(scene)  # [32, 32]
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    base = 0.45 * torch.rand(1, generator=g) + 0.06 * (torch.rand(3, generator=g) - 0.5)
    ramp = torch.linspace(-1, 1, 32)
    ang = 2 * math.pi * torch.rand(1, generator=g)
    grad = 0.12 * torch.rand(1, generator=g) * (math.cos(ang) * ramp[None, :] + math.sin(ang) * ramp[:, None])
    paint = (base.view(3, 1, 1) + grad[None] + NOISE_STD * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    return replace(scene, image=torch.where(bg[None], paint, scene.image))


# ---------------------------------------------------------------------- stage 1
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


def patch_labels(scene) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour, shape) label of every patch: long[64] each, 0 = background, else 1 + index."""
    col = torch.zeros(N_PATCHES, dtype=torch.long)
    shp = torch.zeros(N_PATCHES, dtype=torch.long)
    for o in scene.objects:
        col[list(o.patches)] = 1 + COLOURS.index(o.colour)
        shp[list(o.patches)] = 1 + SHAPES.index(o.shape)
    return col, shp


def vision_warmup(model, steps: int, batch_size: int, seed: int, lr: float, patch_head: bool = True,
                  quadrant_head: bool = False, vary_bg: float = 0.0, log=print):
    """Stage 1: train tower + projector (and the LM's word embeddings) alone.

    Heads: from the MEAN image token, the set of (colour, shape) pairs (multi-label) and the
    object count (throw-away linear head); with ``patch_head`` also, from every image token,
    the colour and the shape of the object covering the patch, scored by dot product with
    the LM's input embeddings of the colour / shape words (``<pad>`` = background).  This
    aligns image tokens with the word embeddings as LLaVA's first stage does, which makes
    "find the <shape>" attention in the LM easy to learn.  With ``quadrant_head`` every
    patch also predicts its quadrant word (top-left, ...), so image tokens carry their
    location explicitly (used for the bidirectional model, which has no causal-mask
    position signal).
    """
    d = model.config.text_config.hidden_size
    head = torch.nn.Linear(d, len(PAIRS) + len(COUNT_WORDS))
    emb = model.model.language_model.embed_tokens
    col_ids = torch.tensor([TOK[PAD]] + [TOK[c] for c in COLOURS])
    shp_ids = torch.tensor([TOK[PAD]] + [TOK[s] for s in SHAPES])
    quad_ids = torch.tensor([TOK[w] for w in WHERE_WORDS])
    r, c = torch.arange(N_PATCHES) // 8, torch.arange(N_PATCHES) % 8
    quad_lab = (r // 4) * 2 + (c // 4)  # [64] quadrant index of every patch
    params = (list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
              + list(head.parameters()) + (list(emb.parameters()) if patch_head else []))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bg_rng = random.Random(seed + 9)
    k = 0
    t0 = time.time()
    for step in range(steps):
        scenes = [make_scene(scene_seed(k + j, seed, "train") + 900_000) for j in range(batch_size)]
        if vary_bg:
            scenes = [vary_background(sc, bg_rng, vary_bg) for sc in scenes]
        k += batch_size
        px = (torch.stack([s.image for s in scenes]) - 0.5) / 0.5
        feats = torch.stack(model.model.get_image_features(px).pooler_output)  # [B,64,d]
        out = head(feats.mean(1))
        tgt = torch.zeros(batch_size, len(PAIRS))
        cnt = torch.tensor([len(s.objects) - 1 for s in scenes])
        for i, s in enumerate(scenes):
            for o in s.objects:
                tgt[i, PAIRS.index((o.colour, o.shape))] = 1.0
        loss = F.binary_cross_entropy_with_logits(out[:, : len(PAIRS)], tgt) * len(PAIRS) / 4 + F.cross_entropy(
            out[:, len(PAIRS):], cnt)
        if patch_head:
            labs = [patch_labels(s) for s in scenes]
            pcol = torch.stack([c for c, _ in labs])
            pshp = torch.stack([h for _, h in labs])
            lc = feats @ emb.weight[col_ids].T  # [B,64,6]
            ls = feats @ emb.weight[shp_ids].T  # [B,64,5]
            loss = (loss + F.cross_entropy(lc.reshape(-1, lc.shape[-1]), pcol.reshape(-1))
                    + F.cross_entropy(ls.reshape(-1, ls.shape[-1]), pshp.reshape(-1)))
            if quadrant_head:
                lq = feats @ emb.weight[quad_ids].T  # [B,64,4]
                loss = loss + F.cross_entropy(lq.reshape(-1, 4), quad_lab.repeat(batch_size))
        lr_t = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr_t
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                pair_acc = ((out[:, : len(PAIRS)] > 0).float() == tgt).all(1).float().mean().item()
                cnt_acc = (out[:, len(PAIRS):].argmax(1) == cnt).float().mean().item()
                msg = ""
                if patch_head:
                    obj = pcol > 0
                    ca = (lc.argmax(-1) == pcol)[obj].float().mean().item()
                    sa = (ls.argmax(-1) == pshp)[obj].float().mean().item()
                    msg = f" patch_colour_acc {ca:.2f} patch_shape_acc {sa:.2f}"
            log(f"[vision] step {step:4d} loss {loss.item():.4f} pairset_acc {pair_acc:.2f} count_acc {cnt_acc:.2f}"
                f"{msg} ({time.time() - t0:.0f}s)")


def warmup_cosine(lr: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of ``lr``."""
    return lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def text_pretrain(model, steps: int, batch_size: int, seed: int, lr: float, chat_share: float = 0.0,
                  log=print) -> None:
    """Stage 0: the LM alone on text-only copy sequences (the LM of a real LLaVA comes pretrained on text)."""
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(seed + 5)
    t0 = time.time()
    for step in range(steps):
        b = make_text_batch(rng, batch_size, chat_share=chat_share)
        lr_t = warmup_cosine(lr, step, steps, warmup=50)
        for g in opt.param_groups:
            g["lr"] = lr_t
        loss = text_loss(model, b)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"[text] step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")


# ---------------------------------------------------------------------- main loop
def train(kind: str, out: str | None, seed: int = 0, steps: int = 3000, vision_steps: int = 600,
          batch_size: int = 32, single_batch_size: int = 96, single_frac: float = 0.0, lr: float = 3e-3,
          quadrant_head: bool = False, init_from: str | None = None, text_steps: int = 0, text_weight: float = 0.0,
          weight_decay: float = 0.01, text_questions: int = 0, text_chat: float = 0.0, lm_lr_scale: float = 1.0, vary_bg: float = 0.0,
          image_head_sparsity: float = 0.0,
          text_batch_size: int = 64, warmup: int = 100, eval_every: int = 500, eval_n: int = 200, test_n: int = 1000, threads: int = 1,
          log=print) -> dict:
    from interp.testbed import evaluate_accuracy
    from interp.testbed.scenes import make_dataset

    if image_head_sparsity < 0:
        raise ValueError(f"image_head_sparsity={image_head_sparsity}: a negative weight would reward heads for reading "
                         "the image; use 0 to switch the penalty off or a small positive weight (the AR default is 0.005)")
    torch.set_num_threads(threads)
    t_start = time.time()
    random.seed(seed)
    model = build_model(kind, seed)
    tokenizer = build_tokenizer()
    meta = build_meta(kind)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model={kind} params={n_params} steps={steps} vision_steps={vision_steps} batch={batch_size}")
    if init_from:
        # e.g. adapt the AR checkpoint into a diffusion model (Dream / DiffuLLaMA style)
        # (from_pretrained: the safetensors file uses HF's legacy llava key layout)
        from transformers import LlavaForConditionalGeneration

        src = LlavaForConditionalGeneration.from_pretrained(init_from, attn_implementation="eager")
        model.load_state_dict(src.state_dict(), strict=True)
        del src
        log(f"initialised all weights from {init_from}")
    model.train()
    if text_steps > 0:
        text_pretrain(model, text_steps, text_batch_size, seed, lr, chat_share=text_chat, log=log)
    if vision_steps > 0:
        vision_warmup(model, vision_steps, 64, seed, lr, quadrant_head=quadrant_head, vary_bg=vary_bg, log=log)

    lm = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    lm_ids = {id(p) for p in lm}
    groups = [{"params": [p for p in model.parameters() if id(p) not in lm_ids], "scale": 1.0},
              {"params": lm, "scale": lm_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    bg_rng = random.Random(seed + 10)
    val = make_dataset(eval_n, seed, "val")
    single_start = int(steps * (1 - single_frac))
    k = 0
    t0 = time.time()
    history = []
    for step in range(steps):
        packed = step < single_start
        bs = batch_size if packed else single_batch_size
        scenes = [make_scene(scene_seed(k + j, seed, "train")) for j in range(bs)]
        if vary_bg:
            scenes = [vary_background(sc, bg_rng, vary_bg) for sc in scenes]
        k += bs
        batch = make_batch(scenes, kind, rng, gen, packed=packed, n_text_questions=text_questions)
        lr_t = warmup_cosine(lr, step, steps, warmup)
        for g in opt.param_groups:
            g["lr"] = lr_t * g["scale"]
        loss = compute_loss(model, batch, kind, image_head_sparsity)
        if text_weight > 0:
            loss = loss + text_weight * text_loss(model, make_text_batch(rng, text_batch_size, chat_share=text_chat))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"step {step:5d} loss {loss.item():.4f} lr {lr_t:.2e} packed={packed} ({time.time() - t0:.0f}s)")
        if (step + 1) % eval_every == 0 or step == steps - 1 or step + 1 == single_start:
            acc = evaluate_accuracy(model, tokenizer, meta, val, kind=kind)
            history.append({"step": step + 1, **{k_: v for k_, v in acc.items() if k_ != "n"}})
            log(f"[val] step {step + 1}: " + " ".join(f"{t}={acc[t]:.3f}" for t in QUESTION_TYPES if t in acc)
                + f" overall={acc['overall']:.3f} ({time.time() - t0:.0f}s)")
            model.train()
    train_time = time.time() - t_start
    model.eval()
    test = make_dataset(test_n, seed, "test")
    acc = evaluate_accuracy(model, tokenizer, meta, test, kind=kind)
    log(f"[test n={test_n}] " + " ".join(f"{t}={acc[t]:.3f}" for t in QUESTION_TYPES if t in acc)
        + f" overall={acc['overall']:.3f}  n={acc['n']}")
    log(f"train wall time {train_time:.0f}s, total {time.time() - t_start:.0f}s")
    meta["training"] = {
        "command": f"python scripts/train_testbed.py --model {kind} --out {out} --seed {seed}"
                   + (f" --text-steps {text_steps} --text-weight {text_weight}" if text_steps or text_weight else "")
                   + (f" --weight-decay {weight_decay}" if weight_decay != 0.01 else "")
                   + (f" --text-questions {text_questions}" if text_questions else "")
                   + (f" --text-chat {text_chat}" if text_chat else "")
                   + (f" --vary-background {vary_bg}" if vary_bg else "")
                   + (f" --lm-lr-scale {lm_lr_scale}" if lm_lr_scale != 1.0 else "")
                   + (f" --image-head-sparsity {image_head_sparsity}" if image_head_sparsity else "")
                   + (f" --text-heads {MODEL_DIMS['text_heads']}" if MODEL_DIMS["text_heads"] != 4 else "")
                   + (f" --text-layers {MODEL_DIMS['text_layers']}" if MODEL_DIMS["text_layers"] != 3 else ""),
        "seed": seed, "steps": steps, "vision_steps": vision_steps, "batch_size": batch_size,
        "single_batch_size": single_batch_size, "text_steps": text_steps, "text_weight": text_weight, "weight_decay": weight_decay, "text_questions": text_questions, "text_chat": text_chat, "vary_background": vary_bg, "lm_lr_scale": lm_lr_scale, "image_head_sparsity": image_head_sparsity, "single_frac": single_frac, "quadrant_head": quadrant_head, "init_from": init_from, "lr": lr, "threads": threads,
        "n_params": n_params, "train_wall_time_s": round(train_time, 1),
        "test_accuracy": {k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in acc.items()},
        "test_split": f"make_dataset({test_n}, seed={seed}, split='test')",
        "torch": torch.__version__,
    }
    if out:
        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(outp), safe_serialization=True)
        tokenizer.save_pretrained(str(outp))
        (outp / "testbed.json").write_text(json.dumps(meta, indent=2) + "\n")
        log(f"saved to {outp}")
    return {"model": model, "tokenizer": tokenizer, "meta": meta, "accuracy": acc, "history": history}


DEFAULTS = {
    "ar": dict(steps=3000, vision_steps=600, batch_size=32, single_frac=0.0, image_head_sparsity=0.005),
    "diffusion": dict(steps=3500, vision_steps=600, batch_size=32, single_frac=0.3, quadrant_head=True,
                      image_head_sparsity=0.0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["ar", "diffusion"], required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--vision-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--single-frac", type=float, default=None)
    ap.add_argument("--quadrant-head", type=int, choices=[0, 1], default=None)
    ap.add_argument("--init-from", default=None, help="checkpoint dir to initialise the weights from")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--test-n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text-steps", type=int, default=0, help="LM-only pretraining steps on text copy sequences")
    ap.add_argument("--text-weight", type=float, default=0.0, help="weight of a text-only copy loss mixed into every main step")
    ap.add_argument("--text-heads", type=int, default=None, help="attention heads per LM layer (default 4)")
    ap.add_argument("--text-layers", type=int, default=None, help="LM layers (default 3)")
    ap.add_argument("--text-questions", type=int, default=0,
                    help="questions answered from their own words, packed beside each scene's image questions")
    ap.add_argument("--text-chat", type=float, default=0.0,
                    help="share of text-only sequences that are chats of text questions (next-token loss on every token)")
    ap.add_argument("--vary-background", type=float, default=0.0,
                    help="share of training scenes whose constant background is repainted (grey level, gradient, noise)")
    ap.add_argument("--lm-lr-scale", type=float, default=1.0, help="learning-rate factor of the LM in the main stage")
    ap.add_argument("--image-head-sparsity", type=float, default=None,
                    help="weight of a penalty sum_(l,h) sqrt(image attention mass of the text queries) that leaves "
                         "few heads reading the image (default: 0.005 for ar, 0 for diffusion)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the main stage")
    a = ap.parse_args(argv)
    if a.text_heads:
        MODEL_DIMS["text_heads"] = MODEL_DIMS["text_kv_heads"] = a.text_heads
    if a.text_layers:
        MODEL_DIMS["text_layers"] = a.text_layers
    cfg = dict(DEFAULTS[a.model])
    for key in ("steps", "vision_steps", "batch_size", "single_frac", "quadrant_head", "image_head_sparsity"):
        v = getattr(a, key)
        if v is not None:
            cfg[key] = bool(v) if key == "quadrant_head" else v
    train(a.model, a.out, seed=a.seed, lr=a.lr, init_from=a.init_from, text_steps=a.text_steps, text_weight=a.text_weight, weight_decay=a.weight_decay, text_questions=a.text_questions, text_chat=a.text_chat, lm_lr_scale=a.lm_lr_scale, vary_bg=a.vary_background, eval_every=a.eval_every, test_n=a.test_n, threads=a.threads,
          log=lambda s: print(s, flush=True), **cfg)


if __name__ == "__main__":
    main()
