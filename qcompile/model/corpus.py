"""The real-text corpus that every format's quality is measured on: the Python 3.11 documentation
(Debian's ``python3-doc`` -> ``python3.11-doc`` HTML), converted to plain text with the standard
library and split by document into train / validation / test.

The download, pin check and tokenizer training live in the recipe (``models/tinyllama``); this
module holds what the package itself needs: the HTML -> text conversion, the split rule, and
reading the splits back (from the cache, else from the prepared-data folder that is carried to
machines without apt) with their sha256 checked against the manifest.

Layout of a corpus directory (``~/.cache/qcompile/corpus/python-docs`` or
``.models-data/python-docs``)::

    manifest.json                      package, version, .deb sha256, recipe, and per split:
                                       documents, characters, bytes, sha256 (of the .jsonl bytes)
    train.jsonl[.xz]  validation.jsonl[.xz]  test.jsonl[.xz]
                                       one JSON object a line: {"path": ..., "text": ...},
                                       documents sorted by path
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..errors import QCompileError

PathLike = Union[str, os.PathLike]

CORPUS_NAME = "python-docs"
EXTRACT_VERSION = "python-docs-text-v1"  # bump when html_to_text, select_documents or split_of change
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
SPLIT_SALT = "qcompile-split-v1:"
MODELS_DATA_ENV = "QCOMPILE_MODELS_DATA"
MODELS_DATA_DIR = ".models-data"

PREPARE_COMMAND = "python3 -m models.tinyllama.prepare"
TRAIN_COMMAND = "python3 -m models.tinyllama.train --data .models-data/tinyllama"


# ---------------------------------------------------------------------------------------------
# HTML -> text


# elements whose whole content is dropped
SKIP_TAGS = frozenset({
    "script", "style", "head", "title", "nav", "noscript", "template", "svg", "math", "form",
    "button", "input", "select", "textarea", "iframe", "object", "canvas", "footer", "header",
    "map",
})
# elements dropped by class (Sphinx chrome: sidebars, navigation bars, permalink pilcrows, ...)
SKIP_CLASSES = frozenset({
    "sphinxsidebar", "sphinxsidebarwrapper", "related", "footer", "header", "headerlink",
    "mobile-nav", "menu-wrapper", "nav-content", "navigation", "breadcrumb", "breadcrumbs",
    "sidebar", "toc", "linenos", "copybutton", "inline-search", "version_switcher_placeholder",
    "language_switcher_placeholder", "clearer",
})
SKIP_ROLES = frozenset({"navigation", "search", "banner", "contentinfo", "complementary"})
# elements that end a line of text; the value is how many newlines separate it from the next
BLOCK_TAGS = {
    "p": 2, "div": 2, "pre": 2, "blockquote": 2, "section": 2, "article": 2, "main": 2,
    "h1": 2, "h2": 2, "h3": 2, "h4": 2, "h5": 2, "h6": 2, "table": 2, "figure": 2, "dl": 2,
    "ul": 2, "ol": 2, "hr": 2, "body": 2, "html": 2,
    "li": 1, "dt": 1, "dd": 1, "tr": 1, "caption": 1, "figcaption": 1, "br": 1, "thead": 1,
    "tbody": 1, "tfoot": 1,
}
CELL_TAGS = frozenset({"td", "th"})
VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                       "param", "source", "track", "wbr"})
_SPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class _TextExtractor(HTMLParser):
    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.main_only = main_only
        self.stack: List[Tuple[str, bool, bool, bool]] = []  # (tag, skip, pre, main)
        self.skip = 0  # open elements that drop their content
        self.pre = 0
        self.main = 0
        self.cell = 0  # open table cells: their paragraphs run together on the row's line
        self.inline: List[str] = []  # collapsing text of the current block
        self.pre_text: List[str] = []  # verbatim text of the current <pre>
        self.out: List[str] = []
        self.pending = 0  # newlines owed before the next text

    # -- output
    def _emit(self, text: str) -> None:
        if not text:
            return
        if self.out:
            self.out.append("\n" * max(self.pending, 1) if self.pending else " ")
        self.out.append(text)
        self.pending = 0

    def _flush_inline(self) -> None:
        text = _SPACE.sub(" ", "".join(self.inline)).strip()
        self.inline = []
        self._emit(text)

    def _break(self, n: int) -> None:
        self._flush_inline()
        self.pending = max(self.pending, n)

    def _collecting(self) -> bool:
        return not self.skip and (self.main or not self.main_only)

    def _block(self, tag: str) -> None:
        if not self._collecting():
            return
        if self.cell and tag not in ("table", "tr"):
            self.inline.append(" ")
        else:
            self._break(BLOCK_TAGS[tag])

    # -- parser callbacks
    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        skip = (tag in SKIP_TAGS or bool(classes & SKIP_CLASSES) or attrs.get("role") in SKIP_ROLES
                or "hidden" in attrs or attrs.get("aria-hidden") == "true")
        main = attrs.get("role") == "main" or tag == "main"
        if tag in BLOCK_TAGS:
            self._block(tag)
        if tag in CELL_TAGS and self._collecting():
            self.inline.append(" ")
        if tag in VOID_TAGS:
            return
        self.stack.append((tag, skip, tag == "pre", main))
        self.skip += skip
        self.main += main
        self.cell += tag in CELL_TAGS
        if tag == "pre":
            self.pre += 1
            if self.pre == 1:
                self.pre_text = []

    def handle_startendtag(self, tag, attrs):
        if tag in BLOCK_TAGS:
            self._block(tag)

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or not any(t == tag for t, *_ in self.stack):
            return  # a stray end tag
        while self.stack:
            t, skip, pre, main = self.stack.pop()
            collecting_inside = self._collecting()
            if pre:
                self.pre -= 1
                if self.pre == 0 and collecting_inside:
                    self._flush_inline()
                    lines = "".join(self.pre_text).expandtabs(8).split("\n")
                    lines = [line.rstrip() for line in lines]
                    while lines and not lines[0]:
                        lines.pop(0)
                    while lines and not lines[-1]:
                        lines.pop()
                    self.pending = max(self.pending, 2)
                    self._emit("\n".join(lines))
                    self.pending = max(self.pending, 2)
            self.skip -= skip
            self.main -= main
            self.cell -= t in CELL_TAGS
            if t in CELL_TAGS and collecting_inside:
                self.inline.append(" ")
            if t in BLOCK_TAGS and collecting_inside:
                self._block(t)
            if t == tag:
                break

    def handle_data(self, data):
        if not self._collecting():
            return
        if self.pre:
            self.pre_text.append(data)
        else:
            self.inline.append(data)

    def text(self) -> str:
        self._flush_inline()
        return "".join(self.out).strip()


def html_to_text(html: str) -> str:
    """Plain text of an HTML page, deterministic and standard-library only.

    Drops scripts, styles, navigation, sidebars, footers and Sphinx chrome (permalink pilcrows);
    when the page marks its main content (``role="main"`` or ``<main>``), keeps only that.
    Paragraph-like blocks are separated by a blank line, list items and table rows by a newline,
    whitespace inside a block is collapsed to single spaces, and ``<pre>`` blocks (code) keep their
    lines and indentation (tabs expanded, trailing spaces dropped).
    """
    main_only = bool(re.search(r"""role\s*=\s*["']?main\b|<main[\s>]""", html, re.IGNORECASE))
    parser = _TextExtractor(main_only)
    parser.feed(html)
    parser.close()
    text = parser.text().replace("\u00b6", "").replace("\r", "")
    text = _CONTROL.sub("", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


# ---------------------------------------------------------------------------------------------
# documents and splits

# the parts of the documentation tree that are prose (index pages, search and the generated
# indices are lists of links; license/copyright are boilerplate)
DOC_DIRS = ("c-api", "distributing", "distutils", "extending", "faq", "howto", "install",
            "installing", "library", "reference", "tutorial", "using", "whatsnew")
DOC_TOP_FILES = ("about.html", "bugs.html", "glossary.html")


def select_documents(html_root: PathLike) -> List[str]:
    """The document paths (relative, '/'-separated, sorted) that make up the corpus."""
    root = Path(html_root)
    paths = [name for name in DOC_TOP_FILES if (root / name).is_file()]
    for d in DOC_DIRS:
        for p in (root / d).rglob("*.html"):
            if p.name == "index.html" or not p.is_file():
                continue
            paths.append(p.relative_to(root).as_posix())
    return sorted(paths)


def split_of(path: str, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
    """train / validation / test for a document, from a salted sha256 of its relative path: the
    same path always lands in the same split, whatever else is in the corpus."""
    digest = hashlib.sha256((SPLIT_SALT + path).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    acc = 0.0
    for name, frac in zip(SPLITS, fractions):
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def split_jsonl(docs: Iterable[Tuple[str, str]]) -> bytes:
    """The canonical bytes of a split file: one {"path", "text"} object a line."""
    return "".join(json.dumps({"path": p, "text": t}, ensure_ascii=False, sort_keys=True) + "\n"
                   for p, t in docs).encode("utf-8")


def build_splits(html_root: PathLike, progress=None) -> Tuple[Dict[str, bytes], dict]:
    """Convert the selected documents and split them; returns ({split: jsonl bytes}, per-split
    stats). Empty documents are skipped."""
    root = Path(html_root)
    docs: Dict[str, List[Tuple[str, str]]] = {s: [] for s in SPLITS}
    paths = select_documents(root)
    for i, rel in enumerate(paths):
        html = (root / rel).read_text(encoding="utf-8", errors="replace")
        text = html_to_text(html)
        if text:
            docs[split_of(rel)].append((rel, text))
        if progress and (i + 1) % 100 == 0:
            progress(f"  converted {i + 1}/{len(paths)} pages")
    data = {s: split_jsonl(docs[s]) for s in SPLITS}
    stats = {s: {"documents": len(docs[s]), "characters": sum(len(t) for _, t in docs[s]),
                 "bytes": len(data[s]), "sha256": sha256_bytes(data[s])} for s in SPLITS}
    return data, stats


# ---------------------------------------------------------------------------------------------
# reading the corpus back


def cache_root() -> Path:
    from .default import cache_root as root

    return root()


def cache_corpus_dir() -> Path:
    return cache_root() / "corpus" / CORPUS_NAME


def models_data_root() -> Path:
    """$QCOMPILE_MODELS_DATA, else ``.models-data`` in the current directory, else the one at the
    root of this source checkout."""
    env = os.environ.get(MODELS_DATA_ENV)
    if env:
        return Path(env)
    here = Path.cwd() / MODELS_DATA_DIR
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / MODELS_DATA_DIR


def corpus_dirs() -> List[Path]:
    """Where a corpus may be, in order: the cache, then the prepared-data folder."""
    return [cache_corpus_dir(), models_data_root() / CORPUS_NAME]


def split_file(directory: Path, split: str) -> Optional[Path]:
    for name in (f"{split}.jsonl", f"{split}.jsonl.xz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_corpus(split: str = "test") -> Path:
    """The first corpus directory that has a manifest and ``split``; else a one-line error that
    says how to make it."""
    for d in corpus_dirs():
        if (d / "manifest.json").is_file() and split_file(d, split) is not None:
            return d
    looked = " or ".join(str(d) for d in corpus_dirs())
    raise QCompileError(f"the {split} split of the corpus is not in {looked}; produce it with "
                        f"`{PREPARE_COMMAND}` (downloads Debian's python3.11-doc with apt)")


def read_manifest(directory: PathLike) -> dict:
    with open(Path(directory) / "manifest.json") as f:
        return json.load(f)


def read_split(split: str, directory: Optional[PathLike] = None, verify: bool = True) -> List[dict]:
    """The documents of a split ([{"path", "text"}], sorted by path), sha256-checked against the
    manifest."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    d = Path(directory) if directory is not None else find_corpus(split)
    path = split_file(d, split)
    if path is None or not (d / "manifest.json").is_file():
        raise QCompileError(f"the {split} split of the corpus is not in {d}; produce it with "
                            f"`{PREPARE_COMMAND}`")
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    if verify:
        want = read_manifest(d)["splits"][split]["sha256"]
        got = sha256_bytes(raw)
        if got != want:
            raise QCompileError(f"{path} has sha256 {got[:16]}… but its manifest says {want[:16]}…; "
                                f"delete {d} and rerun `{PREPARE_COMMAND}`")
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line]


def encode_documents(tokenizer, docs: Iterable[Union[dict, str]], bos: bool = True,
                     eos: bool = True) -> List[int]:
    """One token stream: every document as ``<s> text </s>`` (the training format)."""
    texts = [d["text"] if isinstance(d, dict) else d for d in docs]
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: List[int] = []
    for e in encoded:
        if bos and bos_id is not None:
            ids.append(bos_id)
        ids.extend(e)
        if eos and eos_id is not None:
            ids.append(eos_id)
    return ids
