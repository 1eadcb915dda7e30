"""Write the notebooks from plain cell lists (keeps them reviewable as code) and execute them, so they are
committed with their outputs and figures. Run from the repository root:

    .venv/bin/python notebooks/make_notebooks.py            # write and execute every notebook
    .venv/bin/python notebooks/make_notebooks.py 00 04      # only those whose name starts so
"""
import sys
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}


def write(name: str, cells: list[tuple[str, str]]) -> None:
    NOTEBOOKS[name] = cells


def build(name: str, cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbf.NotebookNode, timeout: int = 900) -> nbf.NotebookNode:
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE.parent)}}).execute()
    return nb


write("00_first_steps.ipynb", [
    ("md", "# First steps: capture, a finding, a spec, a patch\n"
           "Everything in interp goes one way: **capture** what the model computes → an **analysis** returns a "
           "**Finding** (a table, metrics, a sentence and a figure) → the finding exports an intervention **Spec** "
           "(versioned JSON) → **`interp.patch`** replays it and `interp.evaluate` measures its effect. This notebook "
           "walks that path once on the embedded SmolLM2-135M-Instruct."),
    ("code", "import torch, interp, viz\nmodel = interp.load('smollm2')  # the embedded GGUF, converted once and cached\nmodel"),
    ("md", "## 1. Capture\nSite names follow TransformerLens (`blocks.{l}.attn.pattern`, `blocks.{l}.resid_post`, …). "
           "Captured patterns equal HF eager `output_attentions`; the model's own output is unchanged."),
    ("code", "prompt = 'The capital of France is Paris. The capital of Italy is'\n"
             "trace = interp.capture(model, prompt, sites=['blocks.*.attn.pattern', 'blocks.*.resid_post', 'logits'])\n"
             "print(trace)\nprint('next token:', repr(model.tokenizer.decode(trace['logits'][0, -1].argmax())))"),
    ("md", "Layer 18, head 6 is an induction head: the last ` is` attends to ` Paris`, the token after the earlier ` is`."),
    ("code", "viz.trace_plot(trace, layer=18, head=6)"),
    ("md", "Token 0 carries a huge residual norm from layer 11 on (massive activations, the mechanism behind the "
           "attention sink):"),
    ("code", "viz.trace_plot(trace, 'resid_post')"),
    ("md", "Reducers keep statistics instead of patterns, so long prompts fit in memory: `KeyMass` gives the mean "
           "attention each key receives, `Entropy` each query's attention entropy."),
    ("code", "t2 = interp.capture(model, prompt, reducers=[interp.KeyMass(), interp.Entropy()])\n"
             "print('mean attention on token 0, layers 0-5 (mean over heads):', "
             "[round(x, 2) for x in t2.stack('attn.key_mean')[:6, 0, :, 0].mean(-1).tolist()])"),
    ("md", "## 2. An analysis returns a Finding\nEvery analysis has the same shape: `analysis(model, inputs, **params)` "
           "→ `Finding`. The finding states its result in one sentence, keeps a tidy table and draws its figure."),
    ("code", "from probes.induction import induction\nf = induction(model)  # repeated random token sequences by default\n"
             "print(f.explain())\nf.top(5)"),
    ("code", "f.plot()"),
    ("md", "## 3. From finding to spec\nThe finding exports the intervention it suggests: here, zero the output of the "
           "top 8 induction heads. A spec is JSON (plus a safetensors sidecar for tensors) and refuses to run on another model."),
    ("code", "spec = f.to_spec(model=model, k=8)\nprint(spec.to_json()[:500])"),
    ("md", "## 4. Patch and measure\n`interp.patch` applies the spec inside a `with` block and restores the model on exit, "
           "even after an error. `Induction.copying_loss` is the loss on tokens that repeat an earlier one."),
    ("code", "from probes.induction import Induction, repeated_tokens\n"
             "ids = {'input_ids': repeated_tokens(model, n=30, batch=8, seed=3)}\n"
             "base = Induction.copying_loss(model, ids)\n"
             "with interp.patch(model, spec):\n    ablated = Induction.copying_loss(model, ids)\n"
             "print(f'loss on repeated tokens: {base.mean():.2f} nats → {ablated.mean():.2f} with the top-8 heads zeroed')"),
    ("md", "## 5. One-off edits: typed builders and hooks\nEach op has a typed builder (`interp.ops.*`); edits compose "
           "into a Spec. For anything the ops do not cover, `interp.patch(model, hooks={site: fn})` runs your own "
           "function on a site's output (not serialisable, and it says so)."),
    ("code", "from interp import ops\n"
             "edit = ops.head_scale(layers=[18], heads=[6], factor=0.0)\n"
             "one = interp.Spec.for_model(model, [edit])\nb = model.encode(prompt)\n"
             "p = lambda lg: torch.softmax(lg[0, -1].float(), -1)[model.tokenizer.encode(' Rome')[0]].item()\n"
             "print(f\"p(' Rome'): {p(model.logits(b)):.3f} plain, {p(model.logits(b, one)):.3f} with head 18.6 zeroed\")\n"
             "def damp_token0(x):\n    x = x.clone(); x[:, 0] *= 0.5; return x\n"
             "with interp.patch(model, hooks={'blocks.11.resid_post': damp_token0}):\n"
             "    print(f\"p(' Rome') with token 0's residual halved after layer 11: {p(model.logits(b)):.3f}\")"),
    ("md", "## 6. Evaluate on a task, with confidence intervals\n`interp.evaluate` scores a shipped task with and "
           "without the spec (paired bootstrap CI of the difference)."),
    ("code", "r = interp.evaluate(model, spec, 'capitals', limit=30)\nprint(r.explain())"),
])


write("01_sinks_and_massive_activations.ipynb", [
    ("md", "# Attention sinks and massive activations on SmolLM2-135M-Instruct\n"
           "This notebook loads the embedded real model, measures the sink metric of Gu et al. (ICLR'25), "
           "finds the massive activations of Sun et al. (COLM'24) with their ablation check, and turns both "
           "findings into intervention specs that replay through `interp.patch`."),
    ("code", "import torch, interp\nfrom interp.prompts import paragraphs\nfrom probes.sinks import sinks\n"
             "from probes.massive import massive\n"
             "model = interp.load('smollm2')\nmodel"),
    ("md", "## 1. Capture\nOne capture gives exact attention patterns (equal to HF eager `output_attentions`) "
           "and residual streams. Reducers keep only statistics, so long prompts fit in memory."),
    ("code", "trace = interp.capture(model, 'The capital of France is', sites=['blocks.*.attn.pattern', 'logits'])\n"
             "A = trace.stack('attn.pattern')  # [layers, batch, heads, query, key]\n"
             "print(A.shape, 'attention of the last token to token 0, mean over heads, by layer:')\n"
             "print(A[:, 0, :, -1, 0].mean(-1).round(decimals=2))"),
    ("md", "## 2. The sink metric\nα_k = mean attention that key k receives from the queries that can see it; "
           "a head has a sink at k when α_k > ε = 0.3. The control is the same length of one repeated token."),
    ("code", "sink = sinks(model, paragraphs()[:6])\nprint(sink.summary())\nsink.top(5)"),
    ("code", "sink.plot()"),
    ("md", "## 3. Massive activations\n|h| > 100 and ≥ 1000 × the layer median. The ablation check sets them to "
           "zero, to their mean, or zeroes as many random dimensions, and reports perplexity."),
    ("code", "mass = massive(model, paragraphs()[:3])\nprint(mass.summary())\nmass.plot()"),
    ("md", "## 4. From finding to intervention\nThe sink heads become a ZeroTuning-style spec (scale token-0 "
           "attention by γ and renormalise); it replays on any prompt because it addresses `role:bos`."),
    ("code", "spec = sink.to_spec(model=model, gamma=0.6)\nprint(spec.to_json()[:400])\n"
             "b = model.encode('The capital of Italy is')\nbase = model.logits(b)[0, -1]\n"
             "with interp.patch(model, spec):\n    edited = model.logits(b)[0, -1]\n"
             "print('top-1 without:', model.tokenizer.decode(base.argmax()), ' with:', model.tokenizer.decode(edited.argmax()))\n"
             "print(f'max |Δ logit|: {float((edited - base).abs().max()):.3f}')"),
    ("code", "result = interp.evaluate(model, spec, 'capitals', limit=30)\nprint(result.explain())"),
])

write("02_vision_heads_and_sinks.ipynb", [
    ("md", "# Vision heads, visual sinks, attention localisation and knockout on a VLM with a real language model\n"
           "`smol_llava` is SmolLM2-135M-Instruct (the embedded model, lightly tuned with LoRA on its query/value "
           "projections) reading 16 image tokens from a small trained vision tower, in the LLaVA recipe. It answers "
           "questions about synthetic scenes whose object patches are known exactly, so every map can be scored "
           "against ground truth. Training and held-out accuracy: `interp/testbed/TRAINING.md`; numbers on more "
           "scenes: `probes/VISION_RESULTS.md` §5 (`scripts/smol_vlm_results.py`)."),
    ("code", "import torch, interp\nfrom interp.testbed import load_testbed, build_inputs\n"
             "from interp.testbed.items import encode_items, answer_ids\nfrom interp.testbed.localize import localisation_items\n"
             "from probes import image_attention as ia, visual_sinks as vs, vhd as vhd_mod\nfrom probes.knockout import knockout\n"
             "from interp.tasks import bootstrap_ci\n"
             "hf, tok, meta = load_testbed('smol_llava')\nmodel = interp.load(hf, tokenizer=tok, name='smol_llava')\n"
             "print(meta['training']['test_accuracy'])\n"
             "items = localisation_items(8, seed=0)  # held-out scenes, questions about one object\nmodel, len(items)"),
    ("md", "## 1. Vision-aware heads (VHD, He et al. ACL'25)\nVHD = ‖O^{l,h}(with image) − O^{l,h}(without image)‖ at "
           "the answer position; the paper finds few heads per layer reading the image (max/median > 3)."),
    ("code", "scene, q = items[0]\nf_vhd = vhd_mod.vhd(model, build_inputs(tok, meta, scene, q))\n"
             "print(q.text, '->', f_vhd.metrics['answer'])\nprint('max/median by layer:', f_vhd.metrics['max_over_median_by_layer'])\n"
             "f_vhd.table.pivot(index='layer', columns='head', values='score').round(2)"),
    ("md", "## 2. Visual sinks (Kang et al. ICLR'25)\nφ(x_j) = max_{c∈D_sink} |RMSNorm(x_j)_c| with D_sink the massive "
           "dimensions calibrated at the first token (SmolLM2's dims 507 and 247); τ scaled to the model width."),
    ("code", "f_vs = vs.visual_sinks(model, items)\nprint(f_vs.summary())\nf_vs.table.round(3)"),
    ("md", "## 3. Where does the answer query look? Attention-to-image maps per layer and head\n"
           "Pointing game and energy in box against the question's object, next to random and all-objects maps."),
    ("code", "f_ia = ia.image_attention(model, items, occlusion=False)\nprint(f_ia.summary())\nf_ia.plot()"),
    ("md", "## 4. Attention knockout (Zhang et al. CVPR'25)\nBlock the image → the answer position, and the question → "
           "the answer position, in 5-layer windows; Δ% of the answer's probability, items the model gets right only."),
    ("code", "b = encode_items(model, items)\nedges = [('role:image', 'role:query'), ('role:question', 'role:query')]\n"
             "f_ko = knockout(model, inputs=b, edges=edges, window=5, layers=list(range(2, model.n_layers, 5)),\n"
             "                answers=answer_ids(model, items).tolist(), progress=False)\n"
             "print(f_ko.explain())\nf_ko.plot()"),
    ("md", "## 5. From findings to specs, evaluated on held-out scenes\nPAI from the localising layers, VHR from the VHD "
           "heads; `interp.evaluate` scores each on the `testbed_vqa` task (its items are written in this model's "
           "prompt template and patch grid)."),
    ("code", "specs = {'PAI': f_ia.to_spec(model=model, alpha=0.5), 'VHR': f_vhd.to_spec(model=model, alpha=2.0, last_n=2)}\n"
             "for name, spec in specs.items():\n"
             "    m = interp.evaluate(model, spec, 'testbed_vqa', limit=40).metrics\n"
             "    print(f\"{name}: accuracy {m['without']:.3f} -> {m['with']:.3f} (Δ {m['delta']:+.3f}, CI [{m['delta_ci'][0]:+.3f}, {m['delta_ci'][1]:+.3f}])\")"),
])

write("03_attribution.ipynb", [
    ("md", "# Attribution on SmolLM2: saliency flow, Step-Saliency, Shapley values of prompt spans\n"
           "Gradients come from one capture with `grad=True`; no analysis hooks the model itself."),
    ("code", "import torch, interp\nfrom attribution.saliency import saliency\n"
             "from attribution.step_saliency import EXAMPLES, step_saliency\nfrom attribution.shapley import shapley\n"
             "model = interp.load('smollm2')"),
    ("md", "## 1. Attention × gradient\nI^l = (1/H) Σ_h |A ⊙ ∂L/∂A| (Step-Saliency) or |Σ_h A ⊙ ∂L/∂A| (Label Words)."),
    ("code", "sal = saliency(model, 'The capital of France is Paris. The capital of Italy is Rome.', head_reduce='mean_abs')\n"
             "print(sal.summary())\nsal.plot()"),
    ("md", "## 2. Step-Saliency on a short chain of thought\nSteps: the question, thinking sentences, summary "
           "paragraphs; M^l[a, b] = mean saliency from step a to step b. Causal attention makes M lower-triangular."),
    ("code", "ex = EXAMPLES[0]\nstep = step_saliency(model, ex['question'], ex['thinking'], ex['summary'])\n"
             "print(step.summary())\nstep.plot()"),
    ("code", "oeb = step.to_spec(model=model, method='oeb')\nprint(len(oeb.edits), 'OEB edits in layers', oeb.edits[0]['layers'])"),
    ("md", "## 3. Shapley values of the expressions in a few-shot prompt\nv(S) = log p(answer | prompt with only the "
           "expressions in S kept); exact enumeration for a handful of players, efficiency checked."),
    ("code", "text = 'Q: 2 + 3 = 5. Q: 4 + 4 = 8. Q: 6 + 1 = 7. Q: 3 + 5 ='\n"
             "sh = shapley(model, text, ' 8', players='expressions')\nprint(sh.summary())\nsh.plot()"),
    ("md", "## 4. LLaVA-CAM on the vision-language testbed\nGrad-CAM on the image-token hidden states of every "
           "layer (α_c = mean_u ∂y/∂F_{u,c}, CAM = Σ_c α_c F_c), here the `attn_x_grad` map (last-token attention × "
           "|gradient × activation|, the variant that beats the question-blind all-objects map in "
           "`attribution/RESULTS.md`), with the attention share of the image per layer and the cliff layer."),
    ("code", "from attribution.cam import cam\nfrom interp.testbed import build_inputs, load_testbed, make_dataset\n"
             "hf, tok, meta = load_testbed('llava_ar')\nvlm = interp.load(hf, tokenizer=tok, name='testbed-llava-ar')\n"
             "scene = make_dataset(1, seed=5, split='test')[0]\nq = scene.question('colour')\n"
             "c = cam(vlm, build_inputs(tok, meta, scene, q), method='attn_x_grad', image=scene.image)\n"
             "print(q.text, '->', c.metrics['target'])\nprint(c.summary())\nc.plot()"),
    ("md", "## 5. Diffusion-CAM on the masked-diffusion testbed\nDecode, then a contrastive Grad-CAM at a recorded "
           "denoising step, refined by AKD, DACG, CBA and SICD (each can be switched off)."),
    ("code", "from attribution.diffusion_cam import diffusion_cam\n"
             "hf2, tok2, meta2 = load_testbed('llada_diffusion')\ndlm = interp.load(hf2, tokenizer=tok2, name='testbed-llada')\n"
             "d = diffusion_cam(dlm, build_inputs(tok2, meta2, scene, q), gen_len=meta2['gen_len'], image=scene.image)\n"
             "print(d.summary())\nd.plot()"),
])

write("04_circuits.ipynb", [
    ("md", "# Which heads and layers? Causal selection on SmolLM2\n"
           "Four tools answer the question an intervention starts from, on factual recall (\"The capital of France "
           "is\" → \" Paris\"): direct logit attribution (what writes the answer), activation patching (what "
           "carries the difference between a clean and a corrupted prompt), attribution patching (the same from "
           "two forwards and one backward) and information-flow routes (how the answer position gathers "
           "its information, from one forward pass). Each returns a Finding and exports a spec."),
    ("code", "import torch, interp, viz\nmodel = interp.load('smollm2')\n"
             "clean, corrupt = 'The capital of France is', 'The capital of Italy is'\n"
             "paris, rome = ' Paris', ' Rome'"),
    ("md", "## 1. Direct logit attribution\nEach head's, MLP's and the embedding's contribution to "
           "logit(Paris) − logit(Rome), through the final norm with its scale frozen; the parts sum to the "
           "logit difference exactly."),
    ("code", "from probes.dla import dla\nf_dla = dla(model, clean, target=paris, foil=rome)\n"
             "print(f_dla.explain())\nf_dla.plot()"),
    ("md", "## 2. Activation patching\nRun the corrupted prompt, restore one clean activation at a time "
           "(residual stream, attention and MLP outputs by layer and position, and each head), and score the "
           "recovered logit difference (1 = fully restored)."),
    ("code", "from probes.patching import patching\n"
             "f_p = patching(model, clean, corrupted=corrupt, answers=paris, foils=rome, sites=['resid_pre', 'attn.out', 'mlp.out'])\n"
             "print(f_p.explain())\nf_p.plot()"),
    ("md", "## 3. Attribution patching (AtP, AtP*)\nA first-order estimate of every head's patching effect at every "
           "position from two forwards and one backward; AtP* fixes the attention-softmax saturation (QK fix) and "
           "adds GradDrop."),
    ("code", "from attribution.atp import atp\nf_atp = atp(model, clean, corrupted=corrupt, answers=paris, foils=rome, graddrop=False)\n"
             "print(f_atp.explain())\nf_atp.plot()"),
    ("md", "## 4. Information-flow routes\nFrom one forward pass: which (layer, head, token) edges carry information "
           "into the last position, kept when their importance exceeds τ = 0.04 (Ferrando & Voita 2024)."),
    ("code", "from probes.routes import routes\nf_r = routes(model, clean)\nprint(f_r.explain())\nf_r.plot()"),
    ("md", "## 5. From a finding to a measured intervention\nCut the route (knock out its attention edges) and "
           "compare with as many random edges; then remove the top DLA heads."),
    ("code", "b = model.encode(clean)\npid = model.tokenizer.encode(paris)[0]\n"
             "p = lambda *specs: torch.softmax(model.logits(b, *specs)[0, -1].float(), -1)[pid].item()\n"
             "cut = f_r.to_spec(model=model, mode='cut')\ntop = f_dla.to_spec(model=model, k=5)\n"
             "print(f'p(Paris): {p():.3f} plain, {p(cut):.3f} with the route cut, {p(top):.3f} without the top-5 DLA heads')"),
])


if __name__ == "__main__":
    wanted = sys.argv[1:]
    for name, cells in NOTEBOOKS.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        nb = execute(build(name, cells))
        nbf.write(nb, HERE / name)
        print(f"wrote {HERE / name} (executed)")
