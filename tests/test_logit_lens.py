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
