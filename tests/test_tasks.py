"""Bundled evaluation tasks: files load and match their generator, schema errors are clear, scoring is
model-agnostic and batch-exact, and SmolLM2 scores above chance on capitals and sentiment."""
import importlib.util
import contextlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import interp
from interp import InterpError
from interp.tasks import (TASK_DIR, Task, bootstrap_ci, default_logits_fn, list_tasks, load_task, score_items)

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"capitals": "next_token", "arithmetic": "next_token", "sentiment": "choice", "agreement": "choice",
            "text": "perplexity"}


def _make_tasks_module():
    spec = importlib.util.spec_from_file_location("make_tasks", ROOT / "scripts" / "make_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------- files

def test_every_task_loads_with_its_kind():
    assert set(EXPECTED) <= set(list_tasks())
    for name in list_tasks():
        task = load_task(name)
        assert task.name == name and len(task) >= 200, (name, len(task))
        assert task.kind == EXPECTED.get(name, task.kind)
        assert all(it["kind"] == task.kind for it in task.items)
    sent = load_task("sentiment")
    assert abs(sum(it["answer"] for it in sent.items) / len(sent) - 0.5) < 0.05  # balanced labels
    assert len({it["prompt"] for it in load_task("agreement").items}) == len(load_task("agreement"))


def test_files_are_what_the_generator_writes(tmp_path):
    mod = _make_tasks_module()
    assert mod.main(["--check"]) == 0, "interp/data/tasks differs from scripts/make_tasks.py: rerun it"
    assert mod.main(["--out", str(tmp_path)]) == 0
    for name in mod.MAKERS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (TASK_DIR / f"{name}.jsonl").read_bytes()


def test_load_by_path_and_subset(tmp_path):
    p = _write(tmp_path, [json.dumps({"kind": "perplexity", "text": "Hello there."})] * 3, "mine.jsonl")
    task = load_task(p)
    assert (task.name, task.kind, len(task)) == ("mine", "perplexity", 3)
    assert load_task(str(p)).items == task.items
    assert len(load_task("capitals").subset(5)) == 5


# ---------------------------------------------------------------------------------------------- errors

def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(InterpError, match=r"unknown task 'nope'.*capitals"):
        load_task("nope")
    with pytest.raises(InterpError, match="task file not found"):
        load_task(tmp_path / "absent.jsonl")
    with pytest.raises(InterpError, match="task file not found"):
        load_task("absent.jsonl")


def test_malformed_json_names_the_line(tmp_path):
    good = json.dumps({"kind": "next_token", "prompt": "2 + 2 = ", "answer": "4"})
    p = _write(tmp_path, [good, good, '{"kind": "next_token", "prompt": "oops"'])
    with pytest.raises(InterpError, match=r"t\.jsonl line 3: malformed JSON"):
        load_task(p)


def test_missing_field_names_field_and_line(tmp_path):
    good = json.dumps({"kind": "choice", "prompt": "The keys", "choices": [" is", " are"], "answer": 1})
    p = _write(tmp_path, [good, json.dumps({"kind": "choice", "prompt": "The key", "choices": [" is", " are"]})])
    with pytest.raises(InterpError, match=r"line 2: choice item is missing required field 'answer'"):
        load_task(p)
    p = _write(tmp_path, [json.dumps({"prompt": "x", "answer": "y"})])
    with pytest.raises(InterpError, match=r"line 1: item is missing required field 'kind'"):
        load_task(p)
    p = _write(tmp_path, [json.dumps({"kind": "perplexity", "txt": "x"})])
    with pytest.raises(InterpError, match=r"line 1: perplexity item is missing required field 'text'"):
        load_task(p)


@pytest.mark.parametrize("item, msg", [
    ({"kind": "guess", "prompt": "x"}, "unknown kind 'guess'"),
    ({"kind": "choice", "prompt": "x", "choices": [" a", " b"], "answer": 2}, "not an index into the 2 choices"),
    ({"kind": "choice", "prompt": "x", "choices": [" a"], "answer": 0}, "at least 2"),
    ({"kind": "choice", "prompt": "x", "choices": [" a", " b"], "answer": "0"}, "'answer' must be int"),
    ({"kind": "next_token", "prompt": "x", "answer": ""}, "'answer' must be a non-empty string"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_items(tmp_path, item, msg):
    with pytest.raises(InterpError, match=msg):
        load_task(_write(tmp_path, [json.dumps(item)]))


def test_mixed_kinds_and_empty_file(tmp_path):
    p = _write(tmp_path, [json.dumps({"kind": "perplexity", "text": "a b"}),
                          json.dumps({"kind": "next_token", "prompt": "a", "answer": " b"})])
    with pytest.raises(InterpError, match="mixes kinds"):
        load_task(p)
    with pytest.raises(InterpError, match="no items"):
        load_task(_write(tmp_path, [""]))


# ---------------------------------------------------------------------------------------------- helpers

def test_bootstrap_ci():
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0, 1.0)
    vals = [1.0] * 30 + [0.0] * 70
    mean, lo, hi = bootstrap_ci(vals)
    assert mean == pytest.approx(0.3) and lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert bootstrap_ci(vals, seed=1) == bootstrap_ci(vals, seed=1)
    with pytest.raises(InterpError):
        bootstrap_ci([])


# ---------------------------------------------------------------------------------------------- scoring

def test_scoring_is_model_agnostic(smol):
    """An oracle logits_fn that puts all mass on the true next token gets every item right."""
    tok = smol.tokenizer
    task = load_task("capitals").subset(10)
    answers = {it["prompt"]: tok(it["prompt"] + it["answer"])["input_ids"] for it in task.items}
    V = len(tok)

    def oracle(seqs):  # knows the full sequence each prompt comes from
        out = []
        for s in seqs:
            full = next(a for a in answers.values() if a[:len(s)] == s)
            lg = torch.zeros(len(s), V)
            lg[torch.arange(len(s)), torch.tensor(full[1:len(s) + 1])] = 10.0
            out.append(lg)
        return out
    assert score_items(task, SimpleNamespace(tokenizer=tok), oracle) == [1.0] * 10
    assert score_items(task, SimpleNamespace(tokenizer=tok), oracle, match="all") == [1.0] * 10
    with pytest.raises(InterpError, match="logits_fn must return"):
        score_items(task, SimpleNamespace(tokenizer=tok), lambda seqs: [torch.zeros(1, V) for _ in seqs])


def test_batched_logits_equal_one_by_one(smol):
    tok = smol.tokenizer
    seqs = [tok(t)["input_ids"] for t in ["Hi", "The capital of France is", "2 + 3 = 5\n1 + 1 = ",
                                           "Review: What a lovely film!\nSentiment:"]]
    batched = default_logits_fn(smol, batch_size=4)(seqs)
    with torch.no_grad():
        for s, lg in zip(seqs, batched):
            ref = smol.hf(input_ids=torch.tensor([s])).logits[0]
            assert lg.shape == ref.shape
            assert (lg - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_smollm2_above_chance_on_capitals_and_sentiment(smol):
    caps = score_items(load_task("capitals").subset(40), smol)
    mean, lo, _ = bootstrap_ci(caps)
    assert lo > 0.2, mean  # chance for a free next token is ~0; full task: ~0.53
    sent = score_items(load_task("sentiment").subset(40), smol)
    mean, lo, _ = bootstrap_ci(sent)
    assert lo > 0.5, mean  # chance is 0.5 (balanced); full task: ~0.78
    assert mean < 1.0  # partly solved, not saturated


def test_real_sentences_beat_shuffled_words(smol):
    texts = [it["text"] for it in load_task("text").items[:8]]
    rng = random.Random(0)
    shuffled = []
    for t in texts:
        w = t.rstrip(".").split()
        rng.shuffle(w)
        shuffled.append(" ".join(w) + ".")
    items = [{"kind": "perplexity", "text": t} for t in texts + shuffled]
    nll = score_items(Task("mix", "perplexity", items), smol)
    real, shuf = sum(nll[:8]) / 8, sum(nll[8:]) / 8
    assert 1.0 < real < shuf, (real, shuf)


def test_item_roles_let_a_role_spec_be_evaluated(smol):
    """Capitals items name their subject, so a knockout from role:subject (what `interp scan` exports) runs under
    interp.evaluate; each item's result equals the same spec applied by hand to that prompt with its roles."""
    task = load_task("capitals").subset(6)
    s = interp.Spec.for_model(smol, [{"op": "attn.knockout", "layers": list(range(10, 20)), "queries": "last",
                                      "keys": "role:subject"}])
    f = interp.evaluate(smol, s, task)
    tok = smol.tokenizer
    for i, it in enumerate(task.items):
        b = smol.encode(it["prompt"], roles=it["roles"])
        assert [tok.decode(b.input_ids[0, p]) for p in b.roles[0]["subject"]]  # the subject's tokens
        answer = tok(it["prompt"] + it["answer"])["input_ids"][b.input_ids.shape[1]]
        for col, ctx in (("without", contextlib.nullcontext()), ("with", interp.patch(smol, s))):
            with ctx, smol.engine.running(b):
                hit = float(smol.logits(b)[0, -1].argmax().item() == answer)
            assert f.table[col][i] == hit, (i, col)
    assert f.metrics["changed_items"] >= 1
    bad = load_task("capitals").subset(1)
    bad.items[0] = {**bad.items[0], "roles": {"subject": "Atlantis"}}
    with pytest.raises(InterpError, match="Atlantis"):
        interp.evaluate(smol, s, bad)
