"""Write the notebooks from plain cell lists (keeps them reviewable as code). Run: python notebooks/make_notebooks.py"""
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def write(name: str, cells: list[tuple[str, str]]) -> None:
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, HERE / name)


write("01_sinks_and_massive_activations.ipynb", [
    ("md", "# Attention sinks and massive activations on SmolLM2-135M-Instruct\n"
           "This notebook loads the embedded real model, measures the sink metric of Gu et al. (ICLR'25), "
           "finds the massive activations of Sun et al. (COLM'24) with their ablation check, and turns both "
           "findings into intervention specs that replay through `interp.patch`."),
    ("code", "import torch, interp\nfrom interp.prompts import paragraphs\nfrom probes.sinks import sinks\n"
             "from probes.massive import massive\ntorch.set_num_threads(2)\n"
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
    ("code", "mass = massive(model, paragraphs()[:6])\nprint(mass.summary())\nmass.plot()"),
    ("md", "## 4. From finding to intervention\nThe sink heads become a ZeroTuning-style spec (scale token-0 "
           "attention by γ and renormalise); it replays on any prompt because it addresses `role:bos`."),
    ("code", "spec = sink.to_spec(model=model, gamma=0.6)\nprint(spec.to_json()[:400])\n"
             "b = model.encode('The capital of Italy is')\nbase = model.logits(b)[0, -1]\n"
             "with interp.patch(model, spec):\n    edited = model.logits(b)[0, -1]\n"
             "print('top-1 without:', model.tokenizer.decode(base.argmax()), ' with:', model.tokenizer.decode(edited.argmax()))\n"
             "print('max |Δ logit|:', float((edited - base).abs().max()))"),
    ("code", "result = interp.evaluate(model, spec, 'capitals', limit=60)\nprint(result.summary())"),
])

if __name__ == "__main__":
    print("written")
