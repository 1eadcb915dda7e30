"""``interp.load``: one entry point for every model source, returning a :class:`Model`.

Sources: ``"smollm2"`` (the embedded default), ``"llava_ar"`` / ``"llada_diffusion"`` (the committed
testbed VLMs), a ``.gguf`` file, a local HF folder, an HF hub id,
a ``transformers`` model object (with its tokenizer), or a TransformerLens ``TransformerBridge``.
GGUF files are dequantised once and cached as safetensors under a key made of the file's sha256,
so later loads skip the slow conversion.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        self.hf.set_attn_implementation(_engine.ATTN_NAME)
        self.engine = _engine.Engine(self.adapter.attn, causal=self.adapter.causal)
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
    device = property(lambda self: next(self.hf.parameters()).device)

    def identity(self) -> dict:
        """What a Spec records to refuse running on another model."""
        return {"name": self.name, "family": self.family, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "fingerprint": self.fingerprint}

    def encode(self, inputs, **kw) -> Batch:
        """Tokenise text (str, list of str, or chat messages) into a :class:`Batch` with roles."""
        return encode(self, inputs, **kw)

    def forward(self, inputs, *specs, grad: bool = False, **kw):
        """The model's output on ``inputs`` (anything :meth:`encode` takes) with ``specs`` applied, roles and
        padding known to every edit; no KV cache. ``grad=True`` keeps the autograd graph."""
        import contextlib

        from .patch import patch
        batch = inputs if isinstance(inputs, Batch) else self.encode(inputs, **kw)
        edits = patch(self, *specs) if specs else contextlib.nullcontext()
        with (torch.enable_grad() if grad else torch.no_grad()), edits, self.engine.running(batch):
            return self.hf(**batch.model_inputs(), use_cache=False)

    def logits(self, inputs, *specs, grad: bool = False, **kw) -> torch.Tensor:
        """Logits [b, T, V] on ``inputs`` with ``specs`` applied (see :meth:`forward`)."""
        return self.forward(inputs, *specs, grad=grad, **kw).logits

    def answer_logits(self, inputs, *specs, grad: bool = False, **kw) -> torch.Tensor:
        """Logits [b, V] at each row's answer query: its ``query`` role if it has one, else its last real token."""
        batch = inputs if isinstance(inputs, Batch) else self.encode(inputs, **kw)
        logits = self.logits(batch, *specs, grad=grad)
        pos = torch.tensor([r["query"][0] if r.get("query") else r.length - 1 for r in batch.roles],
                           device=logits.device)
        return logits[torch.arange(len(batch), device=logits.device), pos]

    @torch.no_grad()
    def generate(self, inputs, max_new_tokens: int = 20, **gen_kw) -> list[str]:
        """Greedy generation (by default), one prompt at a time, with roles known to active specs."""
        batch = inputs if isinstance(inputs, Batch) else self.encode(inputs)
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


def load(source: Any = "smollm2", *, dtype: torch.dtype | None = None, device: str | None = None,
         tokenizer: Any = None, name: str | None = None) -> Model:
    """Load a model from any supported source; see the module docstring."""
    dtype = dtype or torch.float32
    if isinstance(source, Model):
        return source
    if isinstance(source, nn.Module):
        hf, tok, src = _from_object(source, tokenizer)
        name = name or getattr(hf.config, "_name_or_path", None) or type(hf).__name__
    elif isinstance(source, (str, os.PathLike)):
        hf, tok, src, default_name = _from_path_or_id(str(source), dtype)
        name = name or default_name
    else:
        raise InterpError(f"cannot load a model from {type(source).__name__}: pass 'smollm2', a .gguf path, "
                          "a local HF folder, a hub id, or a transformers model object with its tokenizer")
    if tokenizer is not None:
        tok = tokenizer
    hf = hf.to(dtype=dtype)
    if device is not None:
        hf = hf.to(device)
    return Model(hf=hf, tokenizer=tok, adapter=adapter_for(hf), name=str(name), source=src)


def _from_object(obj: nn.Module, tokenizer):
    cls = type(obj).__name__
    if cls == "TransformerBridge":  # TransformerLens 4.x wraps an HF model; hook the model itself
        hf = getattr(obj, "original_model", None)
        if hf is None:
            raise InterpError("this TransformerBridge exposes no original_model; pass the HF model instead")
        return hf, tokenizer or getattr(obj, "tokenizer", None), "transformer_lens.TransformerBridge"
    if cls == "HookedTransformer":
        raise InterpError("a TransformerLens 3.x HookedTransformer re-implements the model, so its attention "
                          "cannot be captured exactly; load the HF checkpoint it was built from "
                          f"({getattr(getattr(obj, 'cfg', None), 'model_name', '?')}) with interp.load instead")
    if not hasattr(obj, "config"):
        raise InterpError(f"{cls} is not a transformers model (no .config); pass a PreTrainedModel")
    return obj, tokenizer, "object"


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    if getattr(config, "model_type", "").startswith("llava") or hasattr(config, "vision_config"):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def _from_path_or_id(src: str, dtype):
    from transformers import AutoConfig, AutoTokenizer
    if src.lower() in ("smollm2", "default", "embedded"):
        path = embedded_path()
        if path is None:
            raise InterpError("the embedded model SmolLM2-135M-Instruct is not in the cache yet: run "
                              "`python -m interp.embedded` (or `make demo`) to fetch it")
        return _load_gguf(path, dtype, known_sha=lock()["sha256"]) + (lock()["name"],)
    from .testbed import CHECKPOINT_DIR, TESTBED_NAMES
    p = CHECKPOINT_DIR / src if src in TESTBED_NAMES else Path(src).expanduser()
    if src.endswith(".gguf"):
        if not p.is_file():
            raise InterpError(f"GGUF file not found: {p}. Check the path (interp.load takes a .gguf file path)")
        return _load_gguf(p, dtype) + (p.stem,)
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return _load_gguf(ggufs[0], dtype) + (ggufs[0].stem,)
            raise InterpError(f"{p} is a folder with no config.json and no .gguf: not an HF model folder")
        config = AutoConfig.from_pretrained(p)
        hf = _auto_class(config).from_pretrained(p, dtype=dtype)
        tok = _tokenizer_or_none(p)
        return hf, tok, str(p), p.name
    if p.exists():
        raise InterpError(f"{p} is a file but not a .gguf; interp loads .gguf files, HF folders and hub ids")
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise InterpError(f"unknown model {src!r}: not 'smollm2', not an existing path, not a hub id "
                          "(owner/name). `interp models` lists what can be loaded here")
    try:  # a hub id: the real loading code, which fails cleanly offline
        config = AutoConfig.from_pretrained(src)
        hf = _auto_class(config).from_pretrained(src, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise InterpError(f"could not fetch {src!r} from the Hugging Face hub (unreachable or unknown id: "
                          f"{str(e).splitlines()[0][:160]}). Download it elsewhere and pass the local folder "
                          "or .gguf path to interp.load") from None
    return hf, tok, f"hub:{src}", src.split("/")[-1]


def _tokenizer_or_none(p: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(p)
    except Exception:  # a folder with weights only; the user can pass tokenizer=
        return None


def _load_gguf(path: Path, dtype, known_sha: str | None = None):
    """Dequantise a GGUF once; later loads read the cached safetensors (keyed by the file's sha256)."""
    from transformers import AutoConfig, AutoTokenizer
    sha = known_sha or sha256_file(path)
    converted = cache_dir() / "converted" / sha[:32]
    if (converted / "config.json").exists():
        config = AutoConfig.from_pretrained(converted)
        hf = _auto_class(config).from_pretrained(converted, dtype=dtype)
        return hf, AutoTokenizer.from_pretrained(converted), str(path)
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
    tmp = converted.with_name(converted.name + ".tmp")
    hf.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if converted.exists():  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(converted)
    return hf, tok, str(path)
