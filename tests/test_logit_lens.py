"""Logit lens (METHODS.md §9a) on the embedded SmolLM2."""
import torch

from probes.logit_lens import lens_logits, logit_lens

FACTS = [("The capital of France is", " Paris"), ("The capital of Germany is", " Berlin"),
         ("The capital of Japan is", " Tokyo"), ("The capital of Italy is", " Rome"),
         ("The Eiffel Tower is located in the city of", " Paris"),
         ("The largest planet in the solar system is", " Jupiter"),
         ("The currency of the United Kingdom is the", " pound"), ("The opposite of hot is", " cold")]


def test_last_layer_is_the_models_logits(smol):
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there"]
    z = lens_logits(smol, prompts)  # [2, L, V], prompts of different lengths (right padding)
    batch = smol.encode(prompts)
    with torch.no_grad():
        ref = smol.hf(**batch.model_inputs())
    for i, n in enumerate(batch.lengths):
        assert torch.equal(z[i, -1], ref.logits[i, n - 1].float())
        with torch.no_grad():  # each prompt alone, unpadded
            alone = smol.hf(**smol.encode(prompts[i]).model_inputs()).logits[0, -1]
        assert (z[i, -1] - alone).abs().max() <= 1e-4


def test_intermediate_layers_apply_the_final_norm_once(smol):
    batch = smol.encode("The capital of France is")
    with torch.no_grad():
        hs = smol.hf(**batch.model_inputs(), output_hidden_states=True).hidden_states
    z = lens_logits(smol, "The capital of France is")[0]
    ad = smol.adapter
    for l in (0, 10, smol.n_layers - 2):  # hidden_states[l + 1] = output of block l
        want = ad.unembed(ad.final_norm(hs[l + 1][0, -1]))
        assert torch.allclose(z[l], want, atol=1e-4)
    # the last hidden state is already normalised: normalising it again would change the logits
    assert torch.allclose(z[-1], ad.unembed(hs[-1][0, -1]), atol=1e-4)
    assert not torch.allclose(z[-1], ad.unembed(ad.final_norm(hs[-1][0, -1])), atol=1e-2)


def test_paris(smol):
    f = logit_lens(smol, "The capital of France is", targets=" Paris")
    L = smol.n_layers
    t = f.table
    assert len(t) == L and list(t.layer) == list(range(L))
    assert t.iloc[-1]["rank"] == 0 and t.iloc[-1]["top1"] == " Paris"
    first = f.metrics["first_top10_layer"][0][0]
    print(f"' Paris' enters the top-10 at layer {first} of {L} (rank by layer: {list(t['rank'])})")
    assert 0 <= first < L - 1
    assert f.metrics["final_rank"] == [[0]] and f.metrics["peak_layer"] == [[L - 1]]
    assert f.arrays["rank"].shape == (1, L, 1) and f.arrays["prob"].shape == (1, L, 1)
    # the default target is the model's own top-1, here the same token; ids work as targets too
    pid = smol.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    g = logit_lens(smol, "The capital of France is", targets=[pid, " London"])
    assert logit_lens(smol, "The capital of France is").metrics["targets"] == [[" Paris"]]
    assert torch.equal(g.arrays["rank"][..., 0], f.arrays["rank"][..., 0])
    assert g.arrays["rank"].shape == (1, L, 2) and len(g.table) == 2 * L


def test_rank_falls_over_the_last_third(smol):
    """METHODS §9a (g): the target's rank is non-increasing on average over the last ~1/3 of layers."""
    f = logit_lens(smol, [p for p, _ in FACTS], targets=[[y] for _, y in FACTS], progress=False)
    L = smol.n_layers
    assert f.metrics["final_rank"] == [[0]] * len(FACTS)
    mean_rank = f.arrays["rank"].float().mean((0, 2))  # [L]
    tail = mean_rank[L - L // 3:]
    print("mean rank, last third:", [round(float(x), 1) for x in tail])
    assert (tail.diff() <= 0).all()


def test_default_run_is_the_scan_on_the_built_in_facts(smol):
    from interp.prompts import facts
    f = logit_lens(smol)
    fs = facts()
    assert f.params["texts"] == [x["prompt"] for x in fs]
    assert f.metrics["targets"] == [[x["answer"]] for x in fs]
    # the sentence's numbers, recomputed from the ranks
    rank = f.arrays["rank"][..., 0]  # [prompt, layer]
    first = sorted(int(torch.nonzero(r < 10)[0]) for r in rank if (r < 10).any())
    n_top1 = int((rank[:, -1] == 0).sum())
    print(f.explain())
    assert f"enter the top 10 at layer {first[(len(first) - 1) // 2]} (median" in f.explain()
    assert f"the last layer is {smol.n_layers - 1})" in f.explain()
    assert f"{n_top1} of {len(fs)} are the model's top-1 token" in f.explain()


def test_bad_input_is_refused(smol):
    import interp
    import pytest
    with pytest.raises(interp.InterpError, match="prompt"):
        logit_lens(smol, [])
    with pytest.raises(interp.InterpError, match="top_k"):
        logit_lens(smol, "The capital of France is", top_k=0)
    with pytest.raises(interp.InterpError, match="no tokens"):
        logit_lens(smol, "The capital of France is", targets="")


def test_softcapped_logits_are_capped_on_every_layer():
    """Gemma 2 caps its logits (c·tanh(z/c)): the lens applies the same cap, so its last layer is the model's logits."""
    import interp
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from probes.logit_lens import _softcap, _unembed
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        hidden_size=32, intermediate_size=64, vocab_size=64, final_logit_softcapping=0.5,
                                        max_position_embeddings=32)).eval()
    m = interp.load(hf)
    assert _softcap(m) == 0.5
    ids = torch.tensor([[1, 5, 9, 13]])
    tr = interp.capture(m, {"input_ids": ids}, sites=["final"])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert ref.abs().max() <= 0.5
    assert torch.allclose(_unembed(m, tr["final"]), ref, atol=1e-6)


def _lens_finding(texts, tops):
    import pandas as pd
    from interp.finding import Finding
    rows = [{"prompt": p, "layer": l, "target": " Washington", "target_id": 7, "rank": 10 - l, "prob": 0.1 * l,
             "logit": float(l), "top1": tops[l]} for p in range(len(texts)) for l in range(len(tops))]
    return Finding("probes.logit_lens", pd.DataFrame(rows), {"texts": texts, "top_k": 10})


TOPS = [" the", " capital", " Washington", " Berlin"]


def test_static_figure_shows_whole_tokens_and_the_prompts():
    """Cells used to cut their token (" capital" → "␣capita…", " Washington" → "␣Washin…") and no prompt was shown."""
    import viz  # noqa: F401
    texts = ["The capital of the United States is", "The capital of Germany is", "Its capital city is"]
    fig = _lens_finding(texts, TOPS).plot()
    fig.canvas.draw()
    ax = fig.axes[0]
    cells = [t for t in ax.texts]
    assert sorted({t.get_text() for t in cells}) == sorted({"␣the", "␣capital", "␣Washington", "␣Berlin"})
    x0, x1 = ax.transData.transform((0, 0))[0], ax.transData.transform((1, 0))[0]
    for t in cells:  # each token fits inside its cell
        assert t.get_window_extent().width <= abs(x1 - x0), t.get_text()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[1] == "The capital of Germany is → ␣Washington" and ticks[0].startswith("…")
    assert "United States is" in ticks[0]
    one = _lens_finding(texts[:1], TOPS).plot()
    assert "The capital of the United States is" in one._suptitle.get_text()


def test_interactive_figure_shows_whole_tokens_and_the_prompts():
    import viz  # noqa: F401
    from viz.static import LENS_CHAR_PX
    texts = ["The capital of the United States is", "The capital of Germany is", "Its capital city is"]
    fig = _lens_finding(texts, TOPS).plot(interactive=True)
    heat = fig.data[0]
    assert {t for row in heat.text for t in row} == {"␣the", "␣capital", "␣Washington", "␣Berlin"}
    lo, hi = fig.layout.xaxis.domain
    m = fig.layout.margin
    cell_px = (fig.layout.width - m.l - m.r) * (hi - lo) / len(texts)
    assert cell_px >= LENS_CHAR_PX * len("␣Washington") + 8
    assert "The capital of Germany is → ␣Washington" in fig.layout.xaxis.ticktext
    assert heat.customdata[0][2][4] == "Its capital city is"  # the hover names the prompt
    one = _lens_finding(texts[:1], TOPS).plot(interactive=True)
    assert "The capital of the United States is" in one.layout.title.text
