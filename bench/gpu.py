"""Capture cost on an accelerator, in the user's dtype: reducers vs the flash/SDPA forward, all patterns vs
HF eager, a long reducer capture, and a model split over two devices.

Rows per length (random token ids, batch 1, median of --repeats after a warm-up; peak memory from the
device's allocator, reset per row):

* plain forward (HF SDPA, the model as the user loaded it), and interp with no capture active;
* interp.capture with KeyMass + Entropy only (reducers; attention output still from SDPA);
* interp.capture of every attention pattern, beside HF eager ``output_attentions=True`` (only at lengths
  where the dense patterns fit in --pattern-budget GiB);
* with --split: the model dispatched by accelerate over two devices (cuda:0 + cuda:1 when there are two
  GPUs, else cuda:0 + cpu), a reducer capture checked against the single-device one.

    .venv/bin/python bench/gpu.py                                   # cuda, bf16, 512 / 8192 / 32768 tokens
    .venv/bin/python bench/gpu.py --model path/to/model.gguf --tokens 512,8192 --split
    .venv/bin/python bench/gpu.py --device cpu --dtype float32 --tokens 128 --repeats 2   # a dry run here

The table goes to stdout and, with --out, to a file (bench/results_gpu.txt when run on a GPU machine).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.offline()
C.block_torchvision_install()

import torch  # noqa: E402

import interp  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def timed(fn, device: str, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (kernels, allocator)
    sync(device)
    peak_reset(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000, peak_gib(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="anything interp.load takes (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", default="512,8192,32768", help="comma-separated prompt lengths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pattern-budget", type=float, default=40.0, help="GiB the dense patterns may take")
    ap.add_argument("--split", action="store_true", help="also run the model dispatched over two devices")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    model = interp.load(a.model, dtype=dtype, device=a.device)
    hf = model.hf
    vocab = model.adapter.embed.weight.shape[0]
    limit = model.adapter.max_positions or 10**9
    lines = [f"bench/gpu.py on {torch.cuda.get_device_name(0) if a.device.startswith('cuda') else a.device}, "
             f"{model.name} in {a.dtype}, torch {torch.__version__}", "",
             f"{'tokens':>7}  {'row':<40} {'ms':>9} {'x plain':>8} {'peak GiB':>9}"]
    g = torch.Generator().manual_seed(0)
    for n in [int(x) for x in a.tokens.split(",")]:
        if n > limit:
            lines.append(f"{n:>7}  skipped: the model's context is {limit} tokens")
            continue
        ids = torch.randint(100, vocab - 1, (1, n), generator=g).to(a.device)
        batch = {"input_ids": ids}
        rows = {}
        with torch.no_grad():
            rows["plain forward (HF SDPA)"] = timed(lambda: hf(input_ids=ids, use_cache=False), a.device, a.repeats)
        rows["interp, no capture"] = timed(lambda: model.logits(batch), a.device, a.repeats)
        rows["interp.capture, KeyMass+Entropy"] = timed(
            lambda: interp.capture(model, batch, reducers=[interp.KeyMass(), interp.Entropy()]), a.device, a.repeats)
        dense = model.n_layers * model.n_heads * n * n * torch.finfo(dtype).bits / 8 / 2**30
        if dense <= a.pattern_budget:
            rows["interp.capture, all patterns"] = timed(
                lambda: interp.capture(model, batch, sites="blocks.*.attn.pattern"), a.device, a.repeats)
            prev = hf.config._attn_implementation
            hf.set_attn_implementation("eager")
            try:
                with torch.no_grad():
                    rows["HF eager, output_attentions=True"] = timed(
                        lambda: hf(input_ids=ids, output_attentions=True, use_cache=False), a.device, a.repeats)
            finally:
                hf.set_attn_implementation(prev)
        else:
            lines.append(f"{n:>7}  (all-pattern rows skipped: {dense:.0f} GiB of dense patterns)")
        base = rows["plain forward (HF SDPA)"][0]
        for name, (ms, peak) in rows.items():
            lines.append(f"{n:>7}  {name:<40} {ms:>9.1f} {ms / base:>7.2f}x {peak:>9.2f}")
    if a.split:
        lines += ["", split_check(a, dtype)]
    lines += ["", "command: .venv/bin/python bench/gpu.py " + " ".join(sys.argv[1:])]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


def split_check(a, dtype) -> str:
    """The model over two devices (accelerate's device_map): a reducer capture equals the one-device result."""
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    try:
        one = interp.load(a.model, dtype=dtype, device=a.device)
        n = one.n_layers
        dmap = {"model.embed_tokens": a.device, "model.norm": second, "lm_head": second, "model.rotary_emb": a.device}
        dmap |= {f"model.layers.{i}": (a.device if i < n // 2 else second) for i in range(n)}
        two = interp.load(a.model, dtype=dtype, device_map=dmap)
    except Exception as e:  # noqa: BLE001 - report, do not hide the rest of the table
        return f"two-device split ({a.device} + {second}): not run: {type(e).__name__}: {e}"
    ids = {"input_ids": torch.randint(100, 1000, (1, 512), generator=torch.Generator().manual_seed(1))}
    r1 = interp.capture(one, ids, reducers=[interp.KeyMass()]).stack("attn.key_mean").float().cpu()
    r2 = interp.capture(two, ids, reducers=[interp.KeyMass()]).stack("attn.key_mean").float().cpu()
    return (f"two-device split ({a.device} + {second}), 512 tokens: max |Δ key_mean| vs one device "
            f"{float((r1 - r2).abs().max()):.2e}")


if __name__ == "__main__":
    main()
