"""The quality-measurement front end: HTML -> text, the split rule, sliding-window perplexity,
the one-line errors, and the tokenizer / training recipe on a tiny inline text (CPU, seconds, no
network, nothing read from or written to ~/.cache)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.model import corpus as C
from qcompile.model import evaluate as E

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the recipe (models/) lives beside the package, not in it
    sys.path.insert(0, str(REPO))

HTML = """<!DOCTYPE html><html><head><title>Page title</title>
<style>body { color: red }</style><script>var x = "<p>not text</p>";</script></head>
<body>
<div class="mobile-nav"><nav><a href="/">Home</a> menu entries</nav></div>
<div class="sphinxsidebar" role="navigation"><h3>Table of Contents</h3><ul><li>sidebar item</li></ul></div>
<div class="body" role="main">
<section id="s"><h1>4. More Control   Flow<a class="headerlink" href="#s" title="Permalink">&#182;</a></h1>
<p>Besides the <a href="x.html"><code class="literal"><span class="pre">while</span></code></a> statement,
Python uses   the usual   flow control &amp; statements.</p>
<div class="highlight"><pre><span></span><span class="k">def</span> f(x):
    <span class="k">if</span> x &lt; 0:
\treturn -x
    return x
</pre></div>
<ul><li><p>first item</p></li><li><p>second item</p></li></ul>
<table><tr><th><p>Operation</p></th><th><p>Result</p></th></tr>
<tr><td><p>x or y</p></td><td><p>if x is false, then y</p></td></tr></table>
<script>document.write("hidden")</script>
</section></div>
<div class="footer">&copy; Copyright 2001-2023, Python Software Foundation.</div>
</body></html>"""


# ------------------------------------------------------------------------------------------ corpus

def test_html_to_text_keeps_prose_and_code_drops_chrome():
    text = C.html_to_text(HTML)
    assert text.startswith("4. More Control Flow\n\nBesides the while statement, Python uses the usual flow "
                           "control & statements.")
    # code keeps its lines and indentation (tabs expanded), and is its own paragraph
    assert "\n\ndef f(x):\n    if x < 0:\n        return -x\n    return x\n\n" in text
    assert "first item\n\nsecond item" in text
    assert "Operation Result\nx or y if x is false, then y" in text
    for dropped in ("color", "not text", "hidden", "Home", "menu entries", "sidebar item", "Table of Contents",
                    "Copyright", "Page title", "\u00b6", "Permalink"):
        assert dropped not in text, dropped
    assert C.html_to_text(HTML) == text  # deterministic


def test_html_to_text_without_main_keeps_the_body():
    text = C.html_to_text("<html><body><p>one\n two</p><p>three</p><nav>skip</nav><style>x</style></body></html>")
    assert text == "one two\n\nthree"


def test_split_assignment_is_deterministic_and_proportional():
    paths = [f"library/module{i}.html" for i in range(4000)]
    first = [C.split_of(p) for p in paths]
    assert first == [C.split_of(p) for p in paths]
    assert set(first) == set(C.SPLITS)
    frac = {s: first.count(s) / len(paths) for s in C.SPLITS}
    assert abs(frac["train"] - 0.90) < 0.02 and abs(frac["test"] - 0.05) < 0.015, frac
    # a document's split does not depend on what else is in the corpus
    assert C.split_of("tutorial/controlflow.html") == C.split_of("tutorial/controlflow.html")


def test_build_splits_and_read_back(tmp_path):
    root = tmp_path / "html"
    for rel in ["tutorial/a.html", "library/b.html", "library/index.html", "genindex.html", "glossary.html",
                "_static/c.html"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"<html><body><div role='main'><p>Text of {rel}.</p></div></body></html>")
    assert C.select_documents(root) == ["glossary.html", "library/b.html", "tutorial/a.html"]
    data, stats = C.build_splits(root)
    out = tmp_path / "corpus"
    out.mkdir()
    for s in C.SPLITS:
        (out / f"{s}.jsonl").write_bytes(data[s])
    (out / "manifest.json").write_text(json.dumps({"splits": stats}))
    docs = [d for s in C.SPLITS for d in C.read_split(s, out)]
    assert sorted(d["path"] for d in docs) == ["glossary.html", "library/b.html", "tutorial/a.html"]
    assert sum(stats[s]["documents"] for s in C.SPLITS) == 3
    (out / "test.jsonl").write_bytes(data["test"] + b'{"path": "x", "text": "tampered"}\n')
    with pytest.raises(QCompileError, match="sha256"):
        C.read_split("test", out)


# ------------------------------------------------------------------------------------------ perplexity

def tiny_llama(vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the logits so the perplexity is far from uniform
        model.lm_head.weight.mul_(20)
    return model


def token_nll(model, ids):
    """-log p(ids[t] | ids[:t]) for t = 1.. with the whole sequence as context."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].double(), -1)
    return -logp[:-1].gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)


def test_sliding_windows_score_every_token_once_with_left_context():
    for n, context, stride in [(50, 16, 5), (17, 16, 15), (16, 16, 8), (5, 16, 8), (100, 8, 1), (33, 10, 9)]:
        windows = E.sliding_windows(n, context, stride)
        scored = [t for b, e, f in windows for t in range(f, e)]
        assert scored == list(range(1, n)), (n, context, stride)
        for b, e, f in windows:
            assert e - b <= context
            assert f - b >= min(f, context - stride)  # enough left context, except near the start
    with pytest.raises(QCompileError, match="stride"):
        E.sliding_windows(50, 16, 16)


def test_perplexity_equals_full_context_when_the_window_covers_everything():
    model = tiny_llama()
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(1))
    want = token_nll(model, ids)
    for context, stride in [(40, 20), (64, 7)]:
        r = E.perplexity(model, ids, context=context, stride=stride)
        assert r.tokens == 39 and r.windows == 1
        assert r.nll == pytest.approx(float(want.mean()), rel=1e-5)
        assert r.ppl == pytest.approx(math.exp(float(want.mean())), rel=1e-5)
    assert 1.5 < r.ppl < 64 * 10


def test_perplexity_matches_a_manual_loop_over_windows():
    model = tiny_llama(seed=3)
    n, context, stride = 45, 12, 5
    ids = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(2))
    total = 0.0
    for t in range(1, n):  # each token from the first window (starts 0, stride, ...) that holds it
        b = 0
        while b + context <= t:
            b += stride
        e = min(b + context, n)
        total += float(token_nll(model, ids[b:e])[t - b - 1])
    want = total / (n - 1)
    for batch_size in (1, 3, 64):
        r = E.perplexity(model, ids, context=context, stride=stride, batch_size=batch_size)
        assert r.tokens == n - 1
        assert r.nll == pytest.approx(want, rel=1e-5), batch_size
    # less left context scores worse on this model than the whole sequence, but not absurdly
    full = float(token_nll(model, ids).mean())
    assert abs(want - full) < 1.0


# ------------------------------------------------------------------------------------------ errors

@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(C.MODELS_DATA_ENV, str(tmp_path / "no-models-data"))
    return tmp_path


def test_missing_model_says_how_to_make_it(empty_cache):
    with pytest.raises(QCompileError) as err:
        E.eval_ppl(None)
    msg = str(err.value)
    assert "\n" not in msg
    assert "tiny-llama-trained" in msg and "python3 -m models.tinyllama.train" in msg
    assert "python3 -m models.tinyllama.prepare" in msg
    with pytest.raises(QCompileError, match="does not exist"):
        E.eval_ppl(empty_cache / "nowhere")


def test_missing_corpus_says_how_to_make_it(empty_cache):
    model_dir = empty_cache / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(QCompileError) as err:
        E.eval_ppl(model_dir)
    msg = str(err.value)
    assert "\n" not in msg and "python3 -m models.tinyllama.prepare" in msg and "test split" in msg


# ------------------------------------------------------------------------------------------ recipe

PARAGRAPHS = [
    "The for statement in Python differs a bit from what you may be used to in C or Pascal. Rather than "
    "always iterating over an arithmetic progression of numbers, Python's for statement iterates over the "
    "items of any sequence, in the order that they appear in the sequence.",
    "If you do need to iterate over a sequence of numbers, the built-in function range() comes in handy. "
    "It generates arithmetic progressions:\n\n>>> for i in range(5):\n...     print(i)\n",
    "The break statement breaks out of the innermost enclosing for or while loop. A for or while loop can "
    "include an else clause.",
    "The pass statement does nothing. It can be used when a statement is required syntactically but the "
    "program requires no action.",
]


def test_tokenizer_and_training_recipe_on_tiny_text(tmp_path, monkeypatch):
    from models.tinyllama import prepare as P
    from models.tinyllama import train as T
    from models.tinyllama.tokenizer import tokenizer_sha256, train_tokenizer

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(C.MODELS_DATA_ENV, str(tmp_path / "data"))
    docs = {s: [] for s in C.SPLITS}
    for i in range(24):
        docs[["train", "train", "validation", "test"][i % 4]].append(
            {"path": f"doc{i:02d}.html", "text": PARAGRAPHS[i % 4] + f" Example {i}."})
    texts = [d["text"] for d in docs["train"]]
    tok = train_tokenizer(texts, vocab_size=300)
    assert tokenizer_sha256(tok) == tokenizer_sha256(train_tokenizer(texts, vocab_size=300))  # deterministic
    assert len(tok) == 300 and tok.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "</s>", "<pad>"]
    ids = tok("range(5) statement").input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "range(5) statement"

    stats = {s: {"documents": len(docs[s]), "characters": sum(len(d["text"]) for d in docs[s]),
                 "sha256": C.sha256_bytes(C.split_jsonl((d["path"], d["text"]) for d in docs[s]))} for s in C.SPLITS}
    manifest = {"package": "inline", "version": "0", "splits": stats}
    cfg = json.loads((REPO / "models" / "tinyllama" / "config.json").read_text())
    cfg["tokenizer"]["vocab_size"] = 300
    data_dir = P.write_prepared(tmp_path / "data", tok, docs, manifest, cfg, log=lambda *a: None)
    cfg["model"].update(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    cfg["train"].update(eval_every=5)
    args = T.parse_args(["--data", str(data_dir), "--device", "cpu", "--steps", "5", "--batch-size", "2",
                         "--context", "32", "--log-every", "1", "--eval-every", "5", "--warmup-steps", "2",
                         "--out", str(tmp_path / "model")], cfg)
    lines = []
    out = T.train(args, cfg, log=lines.append)
    record = json.loads((out / "training_record.json").read_text())
    assert record["steps_done"] == 5 and math.isfinite(record["final_train_loss"])
    assert record["val_ppl"] > 1 and record["test_ppl"] > 1
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert any(line.startswith("step     5/5") for line in lines)
    # the same seed gives the same weights
    out2 = T.train(T.parse_args(["--data", str(data_dir), "--device", "cpu", "--steps", "5", "--batch-size", "2",
                                 "--context", "32", "--eval-every", "5", "--warmup-steps", "2",
                                 "--out", str(tmp_path / "model2")], cfg), cfg, log=lambda *a: None)
    assert C.sha256_file(out / "model.safetensors") == C.sha256_file(out2 / "model.safetensors")

    # qcompile eval ppl on the saved model, with the test text from the prepared data
    assert record["final_eval"]["test"]["context"] == 64 and record["final_eval"]["test"]["stride"] == 32
    r = E.eval_ppl(out, context=64, stride=32, device="cpu")
    assert r["kind"] == "model" and r["tokens"] == record["final_eval"]["test"]["tokens"] == len(
        C.encode_documents(tok, docs["test"])) - 1
    assert r["ppl"] == pytest.approx(record["test_ppl"], rel=1e-4)
    assert "ppl" in E.format_result(r) and "\n" not in E.format_result(r)


def write_inline_corpus(root: Path, texts):
    """A corpus directory in the prepared-data layout with only a test split."""
    d = root / C.CORPUS_NAME
    d.mkdir(parents=True)
    raw = C.split_jsonl((f"doc{i}.html", t) for i, t in enumerate(texts))
    (d / "test.jsonl").write_bytes(raw)
    (d / "manifest.json").write_text(json.dumps({"package": "inline", "version": "0", "splits": {
        "test": {"documents": len(texts), "sha256": C.sha256_bytes(raw)}}}))


def test_eval_ppl_of_an_artifact_and_its_model(default_model, llvm_artifact, tmp_path, monkeypatch):
    """qcompile.load path: the int4 artifact of the seeded model scores the same tokens as the model."""
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(C.MODELS_DATA_ENV, str(tmp_path))
    write_inline_corpus(tmp_path, PARAGRAPHS[:2])
    ref = E.eval_ppl(default_model, context=24, stride=12, device="cpu", max_tokens=80)
    art = E.eval_ppl(llvm_artifact, context=24, stride=12, device="cpu", max_tokens=80)
    assert ref["kind"] == "model" and art["kind"] == "artifact"
    assert ref["tokens"] == art["tokens"] == 79 and ref["windows"] == art["windows"]
    assert art["corpus"]["package"] == "inline"
    # int4 weights move the perplexity of the (random) seeded model, but not by orders of magnitude
    assert 0.5 < art["ppl"] / ref["ppl"] < 2.0, (art["ppl"], ref["ppl"])
