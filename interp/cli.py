"""The ``interp`` command: ``scan`` (findings, figures, report, specs), ``replay SPEC``, ``evaluate``, ``models``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import InterpError

PROBES = ("sinks", "massive", "entropy", "logit_lens", "knockout", "linear")


def _run_probe(name: str, model, prompts):
    """One probe on the model; returns (finding, spec or None)."""
    if name == "sinks":
        from probes.sinks import sinks
        f = sinks(model, prompts, progress=False)
        return f, f.to_spec(model=model, max_heads=None)
    if name == "massive":
        from probes.massive import massive
        f = massive(model, prompts)
        return f, (f.to_spec(model=model) if "dims" in f.metrics else None)
    if name == "entropy":
        from probes.entropy import entropy
        f = entropy(model, prompts)
        try:
            return f, f.to_spec(model=model)
        except InterpError:
            return f, None
    if name == "logit_lens":
        from probes.logit_lens import logit_lens
        from .prompts import facts
        fs = facts()
        return logit_lens(model, [x["prompt"] for x in fs], targets=[[x["answer"]] for x in fs], progress=False), None
    if name == "knockout":
        from probes.knockout import knockout
        f = knockout(model, layers=list(range(0, model.n_layers, 3)), progress=False)  # every 3rd window centre
        return f, f.to_spec(model=model)
    if name == "linear":
        from probes.linear import linear_probe
        from .tasks import load_task
        items = load_task("sentiment").items[:160]
        texts = [it["prompt"] for it in items]
        labels = [int(it["choices"][it["answer"]].strip() == "positive") for it in items]
        f = linear_probe(model, texts, labels, position="last")
        return f, f.to_spec(model=model)
    raise InterpError(f"unknown probe {name!r}; probes are {', '.join(PROBES)}")


def scan(model_src: str = "smollm2", prompts_file: str | None = None, probes: str = ",".join(PROBES),
         out: str = "out") -> Path:
    import torch
    from tqdm.auto import tqdm

    import viz
    from .model import load
    from .prompts import load_prompts
    torch.manual_seed(0)
    names = [p.strip() for p in probes.split(",") if p.strip()]
    for n in names:
        if n not in PROBES:
            raise InterpError(f"unknown probe {n!r}; probes are {', '.join(PROBES)}")
    out_dir = Path(out)
    for sub in ("findings", "specs", "figures"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = load(model_src)
    prompts = load_prompts(prompts_file) if prompts_file else None
    print(f"{model}  (loaded in {time.time() - t0:.1f}s)")
    findings, timings = {}, {}
    bar = tqdm(names, desc="scan", unit="probe")
    for name in bar:
        bar.set_postfix_str(name)
        t = time.time()
        try:
            finding, spec = _run_probe(name, model, prompts)
        except InterpError as e:
            tqdm.write(f"[{name}] skipped: {e}")
            continue
        timings[name] = time.time() - t
        finding.save(out_dir / "findings" / name)
        if spec is not None:
            spec.save(out_dir / "specs" / name)
        findings[name] = finding
        tqdm.write(finding.summary())
    report = viz.report(findings, out_dir, title=f"interp scan — {model.name}")
    (out_dir / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
    print(f"\nwrote {report} ({len(findings)} findings, {time.time() - t0:.0f}s in all)")
    return report


def replay(spec_path: str, model_src: str = "smollm2", prompt: str | None = None, task: str | None = None,
           limit: int | None = None, max_new_tokens: int = 20) -> None:
    import torch

    from .evaluate import evaluate
    from .model import load
    from .patch import patch
    from .spec import Spec
    spec = Spec.load(spec_path)
    model = load(model_src)
    spec.check(model)
    print(f"spec {spec_path}: {len(spec.edits)} edit(s) from {spec.provenance.get('analysis', '?')} on {model.name}")
    if task:
        f = evaluate(model, spec, task, limit=limit)
        m = f.metrics
        print(f"{m['task']} ({m['metric']}, n={m['n']}): without {m['without']:.4f} {fmt_ci(m['without_ci'])}  "
              f"with {m['with']:.4f} {fmt_ci(m['with_ci'])}  Δ {m['delta']:+.4f} {fmt_ci(m['delta_ci'])}")
        return
    prompt = prompt or "The capital of France is"
    batch = model.encode(prompt)
    base = model.logits(batch)[0, -1]
    with patch(model, spec), model.engine.running(batch):
        edited = model.logits(batch)[0, -1]
    tok = model.tokenizer
    for label, lg in (("without", base), ("with", edited)):
        p = torch.softmax(lg.float(), -1)
        top = p.topk(5)
        print(f"{label:>8}: " + "  ".join(f"{tok.decode([int(i)])!r} {float(v):.3f}" for v, i in zip(top.values, top.indices)))
    print(f"max |Δ logit| at the last position: {float((edited - base).abs().max()):.4g}")
    plain = model.generate(batch, max_new_tokens=max_new_tokens)[0]
    with patch(model, spec):
        new = model.generate(batch, max_new_tokens=max_new_tokens)[0]
    print(f"generation without: {plain!r}\ngeneration with:    {new!r}")


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def models() -> None:
    from .adapters import FAMILIES
    from .embedded import cache_dir, embedded_path, lock
    p = embedded_path()
    print(f"smollm2   {lock()['name']} (embedded GGUF): {p if p else 'not fetched: python -m interp.embedded'}")
    conv = cache_dir() / "converted"
    if conv.exists():
        for d in sorted(conv.iterdir()):
            print(f"cached    {d}")
    tb = Path(__file__).parent / "testbed" / "checkpoints"
    if tb.exists():
        for d in sorted(tb.iterdir()):
            print(f"testbed   {d.name}: {d}")
    print("also: any local .gguf file or HF model folder of a family interp has an adapter for:")
    print("          " + ", ".join(sorted(FAMILIES)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="interp", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan", help="run every probe on a model and write out/report.html, findings, specs")
    s.add_argument("--model", default="smollm2", help="smollm2 (default), a .gguf file or an HF folder")
    s.add_argument("--prompts", default=None, help="a .txt (one prompt per line) or .json list of prompts")
    s.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated subset of {','.join(PROBES)}")
    s.add_argument("--out", default="out", help="output folder (default: out/)")
    r = sub.add_parser("replay", help="apply a spec and show what it changes")
    r.add_argument("spec")
    r.add_argument("--model", default="smollm2")
    r.add_argument("--prompt", default=None)
    r.add_argument("--task", default=None, help="a shipped task (capitals, arithmetic, sentiment, agreement, text) or .jsonl")
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--max-new-tokens", type=int, default=20)
    e = sub.add_parser("evaluate", help="a task's metric with and without a spec (same as replay --task)")
    e.add_argument("spec")
    e.add_argument("task")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--limit", type=int, default=None)
    sub.add_parser("models", help="what can be loaded here")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "scan":
            scan(a.model, a.prompts, a.probes, a.out)
        elif a.cmd == "replay":
            replay(a.spec, a.model, a.prompt, a.task, a.limit, a.max_new_tokens)
        elif a.cmd == "evaluate":
            replay(a.spec, a.model, task=a.task, limit=a.limit)
        else:
            models()
    except InterpError as err:
        print(f"interp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interp: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
