"""The ``interp`` command: ``scan`` (findings, figures, report, specs), ``replay SPEC``, ``evaluate``, ``models``.

Heavy imports (torch, transformers, the analyses) happen inside the commands, so ``interp --help`` and
``interp --version`` answer at once. ``scan`` runs the registered analyses (:mod:`interp.analysis`) that
are in the default set and run on the model; it composes the core with ``probes``, ``attribution`` and
``viz``, which the rest of the core never imports.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import InterpError

VERSION = "0.1.0"
DTYPES = ("float32", "bfloat16", "float16", "float64")


def _analyses():
    """The registry, filled by importing the toolkit's analysis packages."""
    import attribution  # noqa: F401  (registers its analyses)
    import probes  # noqa: F401
    from . import analysis
    return analysis


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _load(model_src: str, device: str | None, dtype: str | None):
    import torch

    from .model import load
    kw = {}
    if dtype:
        kw["dtype"] = getattr(torch, dtype)
    if device:
        kw["device"] = device
    return load(model_src, **kw)


def _select(analysis, model, names: str | None) -> list:
    """The analyses a scan runs: named ones (short or full names), else the default set that runs on the model."""
    if not names:
        return analysis.registered(model, scan_only=True)
    by_short = {_short(a.name): a for a in analysis.registered()}
    out = []
    for n in (x.strip() for x in names.split(",") if x.strip()):
        a = analysis.REGISTRY.get(n) or by_short.get(n)
        if a is None:
            raise InterpError(f"unknown analysis {n!r}; `interp scan --help` lists them")
        if not a.runs_on(model):
            raise InterpError(f"{a.name} needs a model that is {' and '.join(a.requires)}; {model.name} is not")
        out.append(a)
    return out


def scan(model_src="smollm2", prompts_file: str | None = None, probes: str | None = None,
         out: str = "out", device: str | None = None, dtype: str | None = None, chat: bool | None = None) -> Path:
    """Run the selected analyses; write findings, specs, figures and the offline report under ``out``.
    ``model_src``: anything :func:`interp.load` takes (a name, a path, a model object)."""
    import torch
    from tqdm.auto import tqdm

    import viz

    from .prompts import load_prompts
    torch.manual_seed(0)
    analysis = _analyses()
    out_dir = Path(out)
    t0 = time.time()
    model = _load(model_src, device, dtype)
    chosen = _select(analysis, model, probes)
    prompts = load_prompts(prompts_file) if prompts_file else None
    params = {"progress": True} if chat is None else {"progress": True, "chat": chat}
    for sub in ("findings", "specs", "figures"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    print(f"{model}  (loaded in {time.time() - t0:.1f}s)")
    findings, timings, skipped, failed = {}, {}, {}, {}
    bar = tqdm(chosen, desc="scan", unit="analysis")
    for a in bar:
        name = _short(a.name)
        bar.set_postfix_str(name)
        t = time.time()
        try:
            finding, spec = a.scan(model, prompts, **params)
        except InterpError as e:  # the analysis cannot run on this model or these inputs, and says why
            skipped[name] = str(e)
            tqdm.write(f"[{name}] skipped: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - a bug: reported, the other analyses still run, exit code 1
            failed[name] = f"{type(e).__name__}: {e}"
            skipped[name] = f"failed with {type(e).__name__}: {e} (a bug in interp: please report it)"
            tqdm.write(f"[{name}] FAILED: {type(e).__name__}: {e}")
            continue
        timings[name] = time.time() - t
        finding.save(out_dir / "findings" / name)
        if spec is not None:
            spec.save(out_dir / "specs" / name)
        findings[name] = finding
        tqdm.write(finding.summary())
    report = viz.report(findings, out_dir, title=f"interp scan — {model.name}", skipped=skipped)
    (out_dir / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
    print(f"\nwrote {report} ({len(findings)} findings, {len(skipped)} skipped, {time.time() - t0:.0f}s in all)")
    if failed:
        raise ScanFailed(f"{len(failed)} analysis(es) failed: {', '.join(failed)}; the report lists the errors")
    return report


class ScanFailed(Exception):
    """Some analyses raised an unexpected error; the report was still written."""


def _parse_roles(pairs: list[str] | None) -> dict[str, str]:
    roles = {}
    for p in pairs or []:
        name, sep, sub = p.partition("=")
        if not sep or not name.strip() or not sub:
            raise InterpError(f"--roles {p!r}: expected NAME=substring (e.g. subject=France)")
        roles[name.strip()] = sub
    return roles


def replay(spec_path: str, model_src: str = "smollm2", prompt: str | None = None, task: str | None = None,
           limit: int | None = None, max_new_tokens: int = 20, roles: list[str] | None = None,
           device: str | None = None, dtype: str | None = None) -> None:
    """Apply a spec: its effect on a prompt (top tokens, generation) or on a task (metric with and without, CI)."""
    import torch

    from .evaluate import evaluate
    from .patch import patch
    from .spec import Spec
    spec = Spec.load(spec_path)
    model = _load(model_src, device, dtype)
    spec.check(model)
    print(f"spec {spec_path}: {len(spec.edits)} edit(s) from {spec.provenance.get('analysis', '?')} on {model.name}")
    if task:
        f = evaluate(model, spec, task, limit=limit)
        m = f.metrics
        print(f"{m['task']} ({m['metric']}, n={m['n']}): without {m['without']:.3f} {fmt_ci(m['without_ci'])}  "
              f"with {m['with']:.3f} {fmt_ci(m['with_ci'])}  Δ {m['delta']:+.3f} {fmt_ci(m['delta_ci'])}")
        return
    batch = model.encode(prompt or "The capital of France is", roles=_parse_roles(roles) or None)
    base = model.logits(batch)[0, -1]
    edited = model.logits(batch, spec)[0, -1]
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
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def models() -> None:
    """What can be loaded here, by name."""
    from .adapters import FAMILIES
    from .embedded import cache_dir, embedded_path, lock
    p = embedded_path()
    print(f"smollm2          {lock()['name']} (embedded GGUF): {p if p else 'not fetched: python -m interp.embedded'}")
    tb = Path(__file__).parent / "testbed" / "checkpoints"
    for d in sorted(tb.iterdir()) if tb.exists() else []:
        base = (f", on {json.loads((d / 'testbed.json').read_text()).get('language_model')}"
                if (d / "vision.safetensors").exists() and (d / "testbed.json").exists() else "")
        print(f"{d.name:<16} testbed VLM{base} ({d})")
    conv = cache_dir() / "converted"
    for d in sorted(conv.iterdir()) if conv.exists() else []:
        print(f"{'(cached)':<16} {_converted_name(d)}: {d}")
    print("also: any local .gguf file or HF model folder of a family interp has an adapter for:")
    print("                 " + ", ".join(sorted(FAMILIES)))


def _converted_name(d: Path) -> str:
    """A cached GGUF conversion's model, from its config (name, architecture, size)."""
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "incomplete conversion"
    arch = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]
    name = cfg.get("_name_or_path") or ""
    size = f"{cfg.get('num_hidden_layers', '?')} layers × {cfg.get('hidden_size', '?')}"
    return f"{Path(name).name or arch} ({arch}, {size})"


def _scan_help() -> str:
    """Names of the analyses scan can run (read from the registry only when scan's help is asked for)."""
    try:
        analysis = _analyses()
    except Exception as e:  # noqa: BLE001 - help must print even if an analysis package is broken
        return f"(could not list analyses: {e})"
    rows = [f"  {_short(a.name):<18} {a.title}  [{', '.join(a.requires)}]{'  (default)' if a.in_scan else ''}"
            for a in analysis.registered()]
    return "analyses (--probes NAME,...; default: those marked default that run on the model):\n" + "\n".join(rows)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (the embedded default), llava_ar / llada_diffusion / smol_llava (testbeds), a .gguf file, an HF "
                        "folder or a hub id")
    p.add_argument("--device", default=None, help="where the model runs, e.g. cpu, cuda, cuda:1 (default: where it loads)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="convert the weights to this dtype (default: as loaded)")


def parser(scan_epilog: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="interp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"interp {VERSION}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scan", help="run the analyses on a model; write out/report.html, findings, specs, figures",
                       epilog=scan_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--prompts", default=None, help="a .txt (one prompt per line) or .json list of prompts for the "
                                                   "analyses that take plain prompts (default: built-in paragraphs)")
    s.add_argument("--probes", default=None, help="comma-separated analyses to run (see below; default: the default set)")
    s.add_argument("--out", default="out", help="output folder (default: out/)")
    c = s.add_mutually_exclusive_group()
    c.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help="wrap prompts in the model's chat template, where an analysis offers it")
    c.add_argument("--no-chat", dest="chat", action="store_false", help="plain text prompts (each analysis' default)")
    r = sub.add_parser("replay", help="apply a spec and show what it changes on a prompt or a task")
    r.add_argument("spec", help="a spec file (.json, with its .safetensors sidecar beside it if it has one)")
    _common(r)
    r.add_argument("--prompt", default=None, help="the prompt to compare on (default: 'The capital of France is')")
    r.add_argument("--roles", nargs="*", metavar="NAME=SUBSTRING",
                   help="token roles the spec's selectors name, given as substrings of the prompt (e.g. subject=France)")
    r.add_argument("--task", default=None, help="score a task instead: a shipped task (capitals, arithmetic, "
                                                "sentiment, agreement, text, testbed_vqa) or a .jsonl file")
    r.add_argument("--limit", type=int, default=None, help="use only the first N task items")
    r.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate with and without (default 20)")
    e = sub.add_parser("evaluate", help="a task's metric with and without a spec, with bootstrap CIs")
    e.add_argument("spec", help="a spec file (.json)")
    e.add_argument("task", help="a shipped task name or a .jsonl file")
    _common(e)
    e.add_argument("--limit", type=int, default=None, help="use only the first N task items")
    sub.add_parser("models", help="list what can be loaded here, by name")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_scan_help = len(argv) >= 1 and argv[0] == "scan" and any(a in ("-h", "--help") for a in argv)
    a = parser(_scan_help() if wants_scan_help else "").parse_args(argv)
    try:
        if a.cmd == "scan":
            scan(a.model, a.prompts, a.probes, a.out, a.device, a.dtype, a.chat)
        elif a.cmd == "replay":
            replay(a.spec, a.model, a.prompt, a.task, a.limit, a.max_new_tokens, a.roles, a.device, a.dtype)
        elif a.cmd == "evaluate":
            replay(a.spec, a.model, task=a.task, limit=a.limit, device=a.device, dtype=a.dtype)
        else:
            models()
    except InterpError as err:
        print(f"interp: error: {err}", file=sys.stderr)
        return 2
    except ScanFailed as err:
        print(f"interp: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interp: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
