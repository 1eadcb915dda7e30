"""Capture equals what HF itself reports, on the real SmolLM2 and on tiny models of each family."""
import copy
import subprocess
import sys

import pytest
import torch

import interp
from interp import Entropy, InterpError, KeyMass, QueryRow, RoleMass, TopK
from tests.conftest import random_ids, tiny_hf

PROMPT = "The capital of France is Paris. The capital of Italy is"


def hf_eager(model):
    ref = copy.deepcopy(model.hf)
    ref.set_attn_implementation("eager")
    return ref


def test_smollm2_patterns_hidden_states_and_logits(smol):
    batch = smol.encode(PROMPT)
    with torch.no_grad():
        ref = hf_eager(smol)(**batch.model_inputs(), output_attentions=True, output_hidden_states=True)
        # a copy, since HF records hidden states with forward hooks of its own that stay installed
        idle = copy.deepcopy(smol.hf)(**batch.model_inputs(), output_hidden_states=True)
    tr = interp.capture(smol, batch, sites=["blocks.*.attn.pattern", "blocks.*.resid_post", "final", "logits"])
    assert len(ref.attentions) == smol.n_layers == 30
    for l in range(smol.n_layers):
        assert (tr[f"blocks.{l}.attn.pattern"] - ref.attentions[l]).abs().max() <= 1e-5, l
    # reading the patterns leaves the model's own (SDPA) computation untouched: hidden states and
    # logits are bit-identical to the run without a capture ...
    for l in range(smol.n_layers - 1):  # HF's last hidden state has the final norm applied
        assert torch.equal(tr[f"blocks.{l}.resid_post"], idle.hidden_states[l + 1])
        scale = ref.hidden_states[l + 1].abs().max()  # ... and equal HF eager's up to SDPA-vs-eager rounding
        assert (tr[f"blocks.{l}.resid_post"] - ref.hidden_states[l + 1]).abs().max() <= 1e-6 * scale
    assert torch.equal(tr["final"], idle.hidden_states[-1])
    assert torch.equal(tr["logits"], idle.logits)
    assert (tr["logits"] - ref.logits).abs().max() <= 1e-5 * ref.logits.abs().max()
    # a capture of non-attention sites leaves the computation exactly as it was too
    tr2 = interp.capture(smol, batch, sites=["blocks.*.resid_post", "blocks.*.mlp.out", "logits"])
    assert torch.equal(tr2["logits"], idle.logits)


def test_idle_model_matches_hf_sdpa(smol):
    batch = smol.encode(PROMPT)
    ref = copy.deepcopy(smol.hf)
    ref.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert (smol.hf(**batch.model_inputs()).logits - ref(**batch.model_inputs()).logits).abs().max() <= 1e-5


def test_tiny_families_match_hf_eager(tiny):
    ids = random_ids(16, b=2)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = hf_eager(tiny)(**inputs, output_attentions=True, output_hidden_states=True)
        idle = tiny.hf(**inputs).logits
    tr = interp.capture(tiny, inputs, sites=["blocks.*.attn.pattern", "blocks.*.resid_post", "logits", "blocks.*.attn.z"])
    for l in range(tiny.n_layers):
        assert (tr[f"blocks.{l}.attn.pattern"] - ref.attentions[l]).abs().max() <= 1e-5
        assert tr[f"blocks.{l}.attn.z"].shape == (2, 16, tiny.n_heads, tiny.head_dim)
    for l in range(tiny.n_layers - 1):
        assert (tr[f"blocks.{l}.resid_post"] - ref.hidden_states[l + 1]).abs().max() <= 1e-5
    assert (tr["logits"] - ref.logits).abs().max() <= 1e-5
    assert (idle - ref.logits).abs().max() <= 1e-5


def test_z_reassembles_attention_output(tiny):
    """attn.out = o_proj(z flattened): the per-head outputs are the real ones."""
    ids = random_ids(10)
    tr = interp.capture(tiny, {"input_ids": ids}, sites=["blocks.1.attn.z", "blocks.1.attn.out"])
    z = tr["blocks.1.attn.z"]
    proj = tiny.adapter.attn[1].c_proj if tiny.family == "gpt2" else tiny.adapter.attn[1].o_proj
    with torch.no_grad():
        out = proj(z.reshape(*z.shape[:2], -1))
    assert (out - tr["blocks.1.attn.out"]).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # Llama: grouped-query (4 query heads on 2 key heads), RoPE
def test_q_and_k_reproduce_the_pattern(kind):
    """softmax(q kᵀ / √d + mask) == attn.pattern, with the causal and padding mask built here, query head h reading
    key head h // (n_heads / n_kv_heads)."""
    model = interp.load(tiny_hf(kind), name=f"tiny-{kind}")
    ids = random_ids(11, b=2, seed=3)
    am = torch.ones_like(ids)
    am[1, 7:] = 0  # right padding: row 1 has 7 real tokens
    tr = interp.capture(model, {"input_ids": ids, "attention_mask": am},
                        sites=["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.pattern"])
    H, KV, d, T = model.n_heads, model.n_kv_heads, model.head_dim, 11
    assert (KV, H) == ((2, 4) if kind == "llama" else (4, 4))
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None] & am.bool()[:, None, :]  # [b, q, k]
    real = am.bool()  # padded query rows are not compared (no real query reads them)
    for l in range(model.n_layers):
        q, k, A = tr[f"blocks.{l}.attn.q"], tr[f"blocks.{l}.attn.k"], tr[f"blocks.{l}.attn.pattern"]
        assert q.shape == (2, T, H, d) and k.shape == (2, T, KV, d)
        for h in range(H):
            s = torch.einsum("bqd,bkd->bqk", q[:, :, h].double(), k[:, :, h // (H // KV)].double()) / d ** 0.5
            want = torch.softmax(s.masked_fill(~visible, -torch.inf), -1)
            got = A[:, h].double()
            assert (got - want)[real].abs().max() <= 1e-5, (l, h)
        assert not torch.equal(q[:, :, 0], q[:, :, 1])  # the heads are distinct tensors, not one repeated
    assert tr.to_frame("blocks.0.attn.k").columns[:4].tolist() == ["batch", "key", "kv_head", "dim"]


def test_q_and_k_gradients_are_the_first_order_terms():
    """∂M/∂q and ∂M/∂k from a grad capture equal d/dα M(q + α δ) at α = 0, with the move made here on GPT-2's
    fused q/k/v projection output (GPT-2 has no RoPE: attn.q and attn.k are slices of that output)."""
    model = interp.load(tiny_hf("gpt2"), name="tiny-gpt2")
    ids = random_ids(8, seed=5)
    layer, hd, D = 1, model.head_dim, model.d_model
    with torch.enable_grad():
        tr = interp.capture(model, {"input_ids": ids}, sites=[f"blocks.{layer}.attn.q", f"blocks.{layer}.attn.k"],
                            grad=True)
        tr.output.logits[0, -1, 9].backward()
    gq, gk = tr.grad(f"blocks.{layer}.attn.q"), tr.grad(f"blocks.{layer}.attn.k")  # [1, T, h, d]
    c_attn = model.adapter.attn[layer].c_attn
    delta = torch.randn(hd, generator=torch.Generator().manual_seed(0))
    for which, grad, off in (("q", gq, 0), ("k", gk, D)):
        for t, h in ((2, 1), (5, 3)):
            alpha = torch.zeros((), requires_grad=True)

            def move(m, a, o, t=t, sl=slice(off + h * hd, off + (h + 1) * hd)):
                o = o.clone()
                o[:, t, sl] = o[:, t, sl] + alpha * delta
                return o
            hd_ = c_attn.register_forward_hook(move)
            try:
                (want,) = torch.autograd.grad(model.hf(input_ids=ids).logits[0, -1, 9], alpha)
            finally:
                hd_.remove()
            got = float((grad[0, t, h] * delta).sum())
            assert got == pytest.approx(float(want), rel=1e-4, abs=1e-6), (which, t, h)
            assert abs(got) > 1e-6


def test_reducers_equal_statistics_of_full_patterns_with_padding(smol):
    prompts = ["The capital of France is", "Water boils at one hundred degrees Celsius at sea level."]
    batch = smol.encode(prompts, roles={"subject": [1, 2]})
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()  # padded
    layers = [0, 7, 29]
    tr = interp.capture(smol, batch, sites="blocks.*.attn.pattern", layers=layers,
                        reducers=[KeyMass(), Entropy(), TopK(3), RoleMass("subject"), QueryRow()])
    for l in layers:
        A = tr[f"blocks.{l}.attn.pattern"]
        for i, n in enumerate(batch.lengths):
            a = A[i, :, :n, :n]  # real queries and keys only
            mass = a.sum(1)
            assert (tr[f"blocks.{l}.attn.key_mass"][i, :, :n] - mass).abs().max() <= 1e-5
            visible = torch.arange(n, 0, -1).float()  # causal: n - k real queries see key k
            assert (tr[f"blocks.{l}.attn.key_mean"][i, :, :n] - mass / visible).abs().max() <= 1e-5
            H = -(a * a.clamp_min(1e-30).log()).sum(-1)
            assert (tr[f"blocks.{l}.attn.entropy"][i, :, :n] - H).abs().max() <= 1e-5
            Hn = H[:, 1:] / torch.log(torch.arange(2, n + 1).float())
            assert (tr[f"blocks.{l}.attn.entropy_norm"][i, :, 1:n] - Hn).abs().max() <= 1e-5
            v, idx = a.topk(3, dim=-1)
            assert (tr[f"blocks.{l}.attn.topk_val"][i, :, :n] - v).abs().max() <= 1e-5
            assert (tr[f"blocks.{l}.attn.role_mass.subject"][i, :, :n] - a[..., [1, 2]].sum(-1)).abs().max() <= 1e-5
            assert (tr[f"blocks.{l}.attn.query_row"][i, :, :n] - a[:, n - 1]).abs().max() <= 1e-5  # last real query
            # padded queries never count
            assert tr[f"blocks.{l}.attn.entropy"][i, :, n:].abs().sum() == 0


def test_reducer_only_capture_equals_reducers_beside_full_rows(smol):
    """Reducers (and patterns) take the engine's fast path: reused buffers, and causal chunks that stop at
    their last visible key, so the first chunks are narrower than k. Beside a logits capture every chunk
    has full-width rows."""
    prompts = ["The quick brown fox jumps over the lazy dog, " * 7, "Water boils at one hundred degrees Celsius."]
    batch = smol.encode(prompts, roles={"subject": [1, 2]})
    assert batch.input_ids.shape[1] > 64 and batch.attention_mask[1].sum() < batch.input_ids.shape[1]
    reducers = lambda: [KeyMass(), Entropy(), TopK(40), RoleMass("subject"), QueryRow()]  # noqa: E731
    fast = interp.capture(smol, batch, reducers=reducers(), sites="blocks.*.attn.pattern", layers=[0, 15, 29])
    ref = interp.capture(smol, batch, reducers=reducers(), sites=["blocks.*.attn.pattern", "blocks.*.attn.logits"],
                         layers=[0, 15, 29])
    assert isinstance(fast._values["blocks.0.attn.pattern"], list)  # narrow chunks, padded on access
    assert fast._values["blocks.0.attn.pattern"][0].shape[-1] < batch.input_ids.shape[1]
    for k in fast.keys():
        if k.endswith("topk_idx"):  # ties among zero weights may order differently
            val = ref[k.replace("idx", "val")]
            assert torch.equal(torch.where(val > 0, fast[k], -1), torch.where(val > 0, ref[k], -1)), k
        else:
            assert fast[k].shape == ref[k].shape and (fast[k] - ref[k]).abs().max() <= 1e-5, k


def test_unpadded_reducer_capture_reads_the_kernels_log_sum_exp(smol):
    """One unpadded causal prompt: the engine calls SDPA's CPU flash kernel itself, so the output is bit-identical
    to the idle model's, and Entropy uses the kernel's log-sum-exp (no max pass): it still equals the entropy of
    HF eager's attentions."""
    seen = []

    class Spy(KeyMass):
        def update(self, layer, weights, call):
            seen.append(call.lse is not None and call.lse.shape == weights.shape[:3])
            super().update(layer, weights, call)

    batch = smol.encode("The quick brown fox jumps over the lazy dog, " * 6)
    with torch.no_grad():
        idle = copy.deepcopy(smol.hf)(**batch.model_inputs()).logits
        ref = hf_eager(smol)(**batch.model_inputs(), output_attentions=True).attentions
    tr = interp.capture(smol, batch, reducers=[Spy(), Entropy()], sites=["logits", "blocks.*.attn.pattern"])
    assert seen and all(seen)
    assert torch.equal(tr["logits"], idle)
    for l in range(smol.n_layers):
        # entropies summed in float64 from the captured patterns (the same run) and from HF eager's
        own, a = tr[f"blocks.{l}.attn.pattern"].double(), ref[l].double()
        assert (tr[f"blocks.{l}.attn.entropy"] - -(own * own.clamp_min(1e-300).log()).sum(-1)).abs().max() <= 1e-5, l
        # (HF eager rounds the logits differently, Q Kᵀ then × scale against one scaled GEMM here, and the
        # entropy moves with them by up to |z − z̄|·δz: about 1e-5 on this prompt, in either entropy formula)
        assert (tr[f"blocks.{l}.attn.entropy"] - -(a * a.clamp_min(1e-300).log()).sum(-1)).abs().max() <= 2e-5, l
        mass = a.sum(2)  # up to ~20 on the first token: relative error
        assert ((tr[f"blocks.{l}.attn.key_mass"] - mass).abs() / mass.clamp_min(1)).max() <= 1e-5, l
        # the mask-only counts, filled in by the first layer and shared by the rest: closed form for causal
        n = a.shape[-1]
        key_mean = tr[f"blocks.{l}.attn.key_mean"].double()
        assert ((key_mean - mass / torch.arange(n, 0, -1)).abs() / mass.clamp_min(1)).max() <= 1e-5, l
        H = tr[f"blocks.{l}.attn.entropy"][..., 1:].double()
        assert (tr[f"blocks.{l}.attn.entropy_norm"][..., 1:] - H / torch.log(torch.arange(2, n + 1).double())).abs().max() <= 1e-5, l


def test_unpadded_reducer_only_capture_computes_output_and_weights_in_one_pass(smol, monkeypatch):
    """Reducers alone on an unpadded causal prompt: the engine computes each chunk's weights once and takes the
    output from them (A V, no flash kernel): the reducers still equal the statistics of HF eager's patterns and the
    logits equal the idle model's up to float rounding. Small blocks make several chunks, each stopping at its
    last visible key."""
    from interp import engine
    monkeypatch.setattr(engine, "FUSED_READ_ONLY", True)  # opt-in
    monkeypatch.setattr(engine, "FUSED_ELEMENTS", 9 * 16 * 40)
    chunks = []

    class Spy(KeyMass):
        def update(self, layer, weights, call):
            if layer == 0:
                chunks.append((call.q_start, call.q_len, weights.shape[-1], call.lse is not None,
                               float((weights.sum(-1) - 1).abs().max())))
            super().update(layer, weights, call)

    batch = smol.encode("The quick brown fox jumps over the lazy dog, " * 6)
    T = batch.input_ids.shape[1]
    with torch.no_grad():
        idle = copy.deepcopy(smol.hf)(**batch.model_inputs()).logits
        ref = hf_eager(smol)(**batch.model_inputs(), output_attentions=True).attentions
    tr = interp.capture(smol, batch, sites="logits", reducers=[Spy(), Entropy(), TopK(3), RoleMass("bos"), QueryRow()])
    assert len(chunks) >= 3 and sum(c[1] for c in chunks) == T
    for q0, n, width, has_lse, err in chunks:
        assert width == q0 + n and has_lse and err <= 1e-5  # rows cut at the last visible key, normalised
    scale = idle.abs().max()
    assert 0 < (tr["logits"] - idle).abs().max() <= 1e-5 * scale  # its own rounding, not SDPA's bits
    for l in range(smol.n_layers):
        a = ref[l].double()
        H = -(a * a.clamp_min(1e-300).log()).sum(-1)
        assert (tr[f"blocks.{l}.attn.entropy"] - H).abs().max() <= 2e-5, l  # HF eager's own logit rounding
        mass = a.sum(2)
        assert ((tr[f"blocks.{l}.attn.key_mass"] - mass).abs() / mass.clamp_min(1)).max() <= 1e-5, l
        assert (tr[f"blocks.{l}.attn.key_mean"] - mass / torch.arange(T, 0, -1)).abs().max() <= 1e-5, l
        assert (tr[f"blocks.{l}.attn.topk_val"] - a.topk(3, dim=-1).values).abs().max() <= 1e-5, l
        assert (tr[f"blocks.{l}.attn.role_mass.bos"] - a[..., 0]).abs().max() <= 1e-5, l
        assert (tr[f"blocks.{l}.attn.query_row"] - a[:, :, T - 1]).abs().max() <= 1e-5, l


def test_one_pass_attention_redoes_rows_whose_exp_overflows_or_underflows(smol, monkeypatch):
    """exp(Z) without a max shift would overflow (logits ~ 100) or vanish (every logit of a row −200): such
    chunks take the max-shifted softmax; output and reducers equal a float64 reference."""
    from interp import engine
    monkeypatch.setattr(engine, "FUSED_READ_ONLY", True)  # opt-in
    from interp.capture import _CaptureHook
    from interp.engine import interp_attention
    T, g = 40, torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (1, T), generator=g)
    batch = smol.encode({"input_ids": ids})
    k = torch.randn(1, 3, T, 64, generator=g)
    v = torch.randn(1, 3, T, 64, generator=g)
    big = torch.randn(1, 9, T, 64, generator=g) * 30  # z ~ N(0, 30²) at scale 1/8: up to ~100
    flat = -200 * 8 / 64 * torch.ones(1, 9, T, 64)  # with every key = 1: each logit −200, uniform weights
    for q, kk in ((big, k), (flat, torch.ones_like(k))):
        rs = [KeyMass(), Entropy()]
        for r in rs:
            r.start(batch)
        with torch.no_grad(), smol.engine.running(batch), smol.engine.using(_CaptureHook([], rs, False)):
            out, _ = interp_attention(smol.adapter.attn[0], q, kk, v, None, scaling=0.125)
        got = {n: t for r in rs for n, t in r.finish().items()}
        z = q.double() @ kk.repeat_interleave(3, 1).double().transpose(2, 3) * 0.125
        assert z.abs().max() > 89  # exp(z) leaves the float32 range
        A = torch.softmax(z.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1)
        want = (A @ v.repeat_interleave(3, 1).double()).transpose(1, 2)
        assert (out.double() - want).abs().max() <= 1e-4 * max(1.0, z.abs().max().item() / 100)
        mass = A.sum(2)
        assert ((got["blocks.0.attn.key_mass"] - mass).abs() / mass.clamp_min(1)).max() <= 1e-4
        H = -(A * A.clamp_min(1e-300).log()).sum(-1)
        assert (got["blocks.0.attn.entropy"] - H).abs().max() <= 1e-4


def test_reducers_chunked_equal_unchunked(smol, monkeypatch):
    from interp import engine
    batch = smol.encode(PROMPT)
    full = interp.capture(smol, batch, reducers=[KeyMass(), Entropy()], sites="blocks.3.attn.pattern")
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 9 * 15 * 3)  # 3 queries per chunk
    chunked = interp.capture(smol, batch, reducers=[KeyMass(), Entropy()], sites="blocks.3.attn.pattern")
    for k in full.keys():
        assert (full[k] - chunked[k]).abs().max() <= 1e-5, k


def test_exception_inside_capture_leaves_model_unhooked(smol):
    batch = smol.encode(PROMPT)
    with torch.no_grad():
        before = smol.hf(**batch.model_inputs()).logits

    class Boom(KeyMass):
        def update(self, layer, weights, call):
            if layer == 5:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        interp.capture(smol, batch, sites="blocks.*.resid_post", reducers=[Boom()])
    assert smol.engine.hooks == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in smol.hf.modules())
    with torch.no_grad():
        assert torch.equal(smol.hf(**batch.model_inputs()).logits, before)


def test_trace_roundtrip(tmp_path, smol):
    tr = interp.capture(smol, smol.encode(PROMPT, roles={"subject": "France"}),
                        sites=["blocks.2.attn.pattern", "final"], reducers=[KeyMass(layers=[4])])
    stem = tr.save(tmp_path / "t")
    back = interp.Trace.load(stem)
    assert sorted(back.keys()) == sorted(tr.keys())
    for k in tr.keys():
        assert torch.equal(back[k], tr[k])
    assert back.roles[0]["subject"] == tr.roles[0]["subject"] == [3]
    assert back.tokens == tr.tokens
    df = tr.to_frame("blocks.4.attn.key_mean")
    assert list(df.columns) == ["batch", "head", "key", "value"] and len(df) == 9 * tr.input_ids.shape[1]


def test_chat_roles(smol):
    b = smol.encode([{"role": "user", "content": "What is two plus two?"}], system="Answer briefly.")
    r = b.roles[0]
    text = smol.tokenizer.convert_tokens_to_string([b.tokens[0][i] for i in r["user"]])
    assert text.strip() == "What is two plus two?"
    text = smol.tokenizer.convert_tokens_to_string([b.tokens[0][i] for i in r["system"]])
    assert text.strip() == "Answer briefly."
    m = smol.encode("Q: 3+4? <think>3 plus 4 is 7</think> A: 7", markers={"think": ("<think>", "</think>")})
    t = smol.tokenizer.convert_tokens_to_string([m.tokens[0][i] for i in m.roles[0]["think"]])
    assert t.strip() == "3 plus 4 is 7"


def test_memory_estimate_refuses_and_names_reducer(smol):
    with pytest.raises(InterpError, match="reducers"):
        interp.capture(smol, PROMPT, sites="blocks.*.attn.pattern", max_memory=1000)


@pytest.mark.parametrize("src,msg", [
    ("no-such-model", "unknown model"),
    ("/nope/model.gguf", "GGUF file not found"),
    ("someone/some-model-that-is-not-cached", "hub"),
])
def test_bad_sources(src, msg):
    with pytest.raises(InterpError, match=msg):
        interp.load(src)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "broken.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(InterpError, match="could not read GGUF"):
        interp.load(p)


def test_unsupported_architecture():
    from transformers import BertConfig, BertForMaskedLM
    with pytest.raises(InterpError, match="unsupported architecture 'bert'"):
        interp.load(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                               intermediate_size=32, vocab_size=50)))


def test_bad_sites_layers_and_length(smol):
    with pytest.raises(InterpError, match="unknown site 'blocks.1.attn.patern'"):
        interp.capture(smol, PROMPT, sites="blocks.1.attn.patern")
    with pytest.raises(InterpError, match="layer 30 is out of range"):
        interp.capture(smol, PROMPT, sites="blocks.30.attn.pattern")
    with pytest.raises(InterpError, match="out of range"):
        interp.capture(smol, PROMPT, sites="blocks.*.attn.pattern", layers=[31])
    with pytest.raises(InterpError, match="context of 8192"):
        interp.capture(smol, {"input_ids": torch.ones(1, 8193, dtype=torch.long)}, sites="logits")


def test_long_context_reducers_within_4gib():
    """30 layers x 2,048 tokens, reducer-only: full fp32 patterns would need 30 x 9 x 2,048² x 4 B = 4.2 GiB, more
    than the whole process may use here (the 4,096- and 8,192-token measurements are bench/capture.py's)."""
    code = ("import resource, torch, interp\n"
            "torch.set_num_threads(2)\n"
            "m = interp.load('smollm2')\n"
            "ids = torch.randint(100, 40000, (1, 2048), generator=torch.Generator().manual_seed(0))\n"
            "tr = interp.capture(m, {'input_ids': ids}, reducers=[interp.KeyMass(), interp.Entropy()])\n"
            "assert tr['blocks.29.attn.key_mass'].shape == (1, 9, 2048)\n"
            "s = tr['blocks.29.attn.key_mass'].sum(-1)\n"
            "assert torch.allclose(s, torch.full_like(s, 2048.0), rtol=1e-4)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_gib = float(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS {peak_gib:.2f} GiB")
    assert peak_gib < 4.0


def tiny_llava(causal: bool = True):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=16, patch_size=4, num_channels=3)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, is_causal=causal)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=99, vision_feature_layer=-1,
                      vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("causal", [True, False], ids=["llava", "bidirectional-llava"])
def test_tiny_llava_capture_matches_hf(causal):
    hf = tiny_llava(causal)
    m = interp.load(hf, name="tiny-llava")
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 17), 99), torch.randint(2, 90, (1, 6))], 1)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 16, 16)}
    with torch.no_grad():
        ref = hf_eager(m)(**inp, output_attentions=True, output_hidden_states=True)
    tr = interp.capture(m, inp, sites=["blocks.*.attn.pattern", "blocks.*.resid_post", "logits"])
    assert tr.roles[0]["image"] == list(range(1, 18))
    for l in range(3):
        assert (tr[f"blocks.{l}.attn.pattern"] - ref.attentions[l]).abs().max() <= 1e-5
    for l in range(2):
        assert (tr[f"blocks.{l}.resid_post"] - ref.hidden_states[l + 1]).abs().max() <= 1e-5
    assert (tr["logits"] - ref.logits).abs().max() <= 1e-5
    with torch.no_grad():  # the idle (SDPA) path respects the model's causality too
        assert (m.hf(**inp).logits - ref.logits).abs().max() <= 1e-5
    A = tr["blocks.0.attn.pattern"][0, 0]
    assert (A[2, 3:] == 0).all() if causal else (A[2, 3:] > 0).all()


def _tiny_vlm(kind: str):
    """A tiny LLaVA-Next / LLaVA-OneVision / Qwen2-VL from configs, with inputs holding one image."""
    import transformers as tf
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128, max_position_embeddings=512)
    if kind == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
                               vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4,
                                                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
                               image_token_id=99, video_token_id=98, vision_start_token_id=97, vision_end_token_id=96)
        hf = tf.Qwen2VLForConditionalGeneration(cfg).eval()
        n_img = 4  # a 4×4 patch grid merged 2×2
        ids = torch.cat([torch.tensor([[1, 97]]), torch.full((1, n_img), 99), torch.tensor([[96]]),
                         torch.randint(5, 90, (1, 6))], 1)
        return hf, {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 4 * 4),
                    "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": (ids == 99).long()}, n_img
    if kind == "llava_next":
        vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=4, projection_dim=32)
        hf = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(
            vision_config=vc, text_config=tf.LlamaConfig(**text), image_token_id=99, vision_feature_layer=-1,
            image_grid_pinpoints=[[16, 16], [16, 32]])).eval()
        px = torch.randn(1, 2, 3, 16, 16)  # the base view and one anyres tile
    else:
        vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=16, patch_size=4)
        hf = tf.LlavaOnevisionForConditionalGeneration(tf.LlavaOnevisionConfig(
            vision_config=vc, text_config=tf.Qwen2Config(**text), image_token_id=99, vision_feature_layer=-1,
            image_grid_pinpoints=[[16, 16]], vision_aspect_ratio="anyres_max_1")).eval()
        px = torch.randn(1, 2, 3, 16, 16)
    sizes = torch.tensor([[16, 16]])
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=px, image_sizes=sizes)
    feats = getattr(feats, "pooler_output", feats)
    n_img = sum(f.shape[0] for f in feats)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, n_img), 99), torch.randint(5, 90, (1, 6))], 1)
    return hf, {"input_ids": ids, "pixel_values": px, "image_sizes": sizes}, n_img


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision", "qwen2_vl"])
def test_tiny_vlm_families_capture_matches_hf(kind):
    hf, inp, n_img = _tiny_vlm(kind)
    m = interp.load(hf, name=f"tiny-{kind}")
    with torch.no_grad():
        ref = hf_eager(m)(**inp, output_attentions=True)
        idle = m.hf(**inp).logits
    tr = interp.capture(m, inp, sites=["blocks.*.attn.pattern", "logits"])
    assert len(tr.roles[0]["image"]) == n_img == int((inp["input_ids"] == 99).sum())
    for l in range(m.n_layers):
        assert (tr[f"blocks.{l}.attn.pattern"] - ref.attentions[l]).abs().max() <= 1e-5
    assert torch.equal(tr["logits"], idle)
    assert (tr["logits"] - ref.logits).abs().max() <= 1e-5
