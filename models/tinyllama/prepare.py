"""Steps 1 + 2 of the recipe, run where apt is (not on the GPU machine): the pinned corpus, the
tokenizer, and the prepared data that travels to the GPU machine.

    python3 -m models.tinyllama.prepare [--out .models-data] [--allow-unpinned] [--deb PATH]

Writes (git-ignored, carried to the device with ``carry: [".models-data"]``)::

    .models-data/tinyllama/     tokenizer.json, tokenizer_config.json   the trained BPE tokenizer
                                train.u16.xz validation.u16.xz test.u16.xz
                                    token ids, little-endian uint16, xz-compressed: every document
                                    of the split as <s> text </s>, documents sorted by path
                                data.json   recipe, corpus manifest, tokenizer sha256, and per split
                                    documents / tokens / sha256 of the uncompressed ids
    .models-data/python-docs/   manifest.json validation.jsonl.xz test.jsonl.xz
                                    the held-out text, so ``qcompile eval ppl`` works there too

If the compressed train ids exceed ``--train-budget-mb`` (default 2.0), whole train documents are
dropped deterministically (by their split hash) until they fit; data.json records the fraction kept.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "models.tinyllama"

from qcompile.errors import QCompileError  # noqa: E402
from qcompile.model import corpus as C  # noqa: E402

from .corpus import prepare_corpus  # noqa: E402
from .tokenizer import tokenizer_sha256, train_tokenizer  # noqa: E402

CONFIG_FILE = Path(__file__).with_name("config.json")
DATA_NAME = "tinyllama"
XZ_PRESET = 9 | lzma.PRESET_EXTREME


def load_config() -> dict:
    with open(CONFIG_FILE) as f:
        return json.load(f)


def ids_bytes(ids) -> bytes:
    import numpy as np

    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
        raise ValueError("token ids do not fit uint16")
    return arr.astype("<u2").tobytes()


def doc_rank(path: str) -> float:
    """Where a train document stands in the deterministic subsampling order (0..1)."""
    d = hashlib.sha256(("qcompile-subsample-v1:" + path).encode()).digest()
    return int.from_bytes(d[:8], "big") / 2.0 ** 64


def prepare(out_root: Path, budget_mb: float = 2.0, allow_unpinned: bool = False, deb: str = None,
            log=print) -> Path:
    """The whole CPU side: corpus (cache), tokenizer, prepared data under ``out_root``."""
    cfg = load_config()
    t0 = time.time()
    corpus_dir = prepare_corpus(allow_unpinned=allow_unpinned, deb=deb, log=log)
    manifest = C.read_manifest(corpus_dir)
    splits = {s: C.read_split(s, corpus_dir) for s in C.SPLITS}
    tcfg = cfg["tokenizer"]
    log(f"training the byte-level BPE tokenizer (vocab {tcfg['vocab_size']}) on the train split")
    tokenizer = train_tokenizer([d["text"] for d in splits["train"]], tcfg["vocab_size"], tcfg["min_frequency"])
    final = write_prepared(out_root, tokenizer, splits, manifest, cfg, budget_mb, log)
    log(f"({time.time() - t0:.0f} s)")
    return final


def write_prepared(out_root: Path, tokenizer, splits: dict, manifest: dict, cfg: dict, budget_mb: float = 2.0,
                   log=print) -> Path:
    """Write ``out_root/tinyllama`` (tokenizer, token ids, data.json) and ``out_root/python-docs``
    (held-out text) from the split documents ({split: [{"path", "text"}]}) and the corpus manifest."""
    tcfg = cfg["tokenizer"]
    tok_sha = tokenizer_sha256(tokenizer)
    encoded = {}
    for s in C.SPLITS:
        raw = ids_bytes(C.encode_documents(tokenizer, splits[s]))
        encoded[s] = (raw, lzma.compress(raw, preset=XZ_PRESET))
    kept = 1.0
    train_docs = splits["train"]
    budget = int(budget_mb * 1e6)
    while len(encoded["train"][1]) > budget:  # drop whole documents, lowest rank kept
        kept *= 0.97 * budget / len(encoded["train"][1])
        train_docs = [d for d in splits["train"] if doc_rank(d["path"]) < kept]
        raw = ids_bytes(C.encode_documents(tokenizer, train_docs))
        encoded["train"] = (raw, lzma.compress(raw, preset=XZ_PRESET))
        log(f"  train ids over {budget_mb} MB compressed: keeping {len(train_docs)}/{len(splits['train'])} documents")
    docs_used = {"train": train_docs, "validation": splits["validation"], "test": splits["test"]}

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / DATA_NAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{DATA_NAME}.tmp-", dir=out_root))
    final_text = out_root / C.CORPUS_NAME
    tmp_text = Path(tempfile.mkdtemp(prefix=f".{C.CORPUS_NAME}.tmp-", dir=out_root))
    try:
        tokenizer.save_pretrained(str(tmp))
        info = {
            "recipe": cfg["recipe"], "data_version": 1,
            "format": "little-endian uint16 token ids, xz-compressed; each document as <s> text </s>, sorted by path",
            "corpus": {k: manifest.get(k) for k in ("package", "version", "deb", "deb_sha256", "pinned",
                                                    "extract_version")},
            "corpus_splits": manifest["splits"],
            "tokenizer": {"sha256": tok_sha, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                          **tcfg},
            "train_fraction_kept": {"documents": len(train_docs) / max(1, len(splits["train"])),
                                    "characters": sum(len(d["text"]) for d in train_docs)
                                    / max(1, sum(len(d["text"]) for d in splits["train"]))},
            "splits": {},
        }
        info["tokenizer"]["vocab_size"] = len(tokenizer)
        for s in C.SPLITS:
            raw, xz = encoded[s]
            (tmp / f"{s}.u16.xz").write_bytes(xz)
            info["splits"][s] = {"documents": len(docs_used[s]), "tokens": len(raw) // 2,
                                 "characters": sum(len(d["text"]) for d in docs_used[s]),
                                 "sha256": C.sha256_bytes(raw), "xz_bytes": len(xz)}
        with open(tmp / "data.json", "w") as f:
            json.dump(info, f, indent=1)
        # the held-out text, in the corpus layout, for evaluation away from the cache
        for s in ("validation", "test"):
            raw = C.split_jsonl((d["path"], d["text"]) for d in splits[s])
            assert C.sha256_bytes(raw) == manifest["splits"][s]["sha256"], s
            (tmp_text / f"{s}.jsonl.xz").write_bytes(lzma.compress(raw, preset=XZ_PRESET))
        text_manifest = dict(manifest)
        text_manifest["splits"] = {s: manifest["splits"][s] for s in ("validation", "test")}
        text_manifest["note"] = "held-out splits only (xz-compressed); the train split is in ../tinyllama as token ids"
        with open(tmp_text / "manifest.json", "w") as f:
            json.dump(text_manifest, f, indent=1)
        for t, f in ((tmp, final), (tmp_text, final_text)):
            os.chmod(t, 0o755)
            if f.exists():
                shutil.rmtree(f)
            os.rename(t, f)
    finally:
        for t in (tmp, tmp_text):
            if t.exists():
                shutil.rmtree(t, ignore_errors=True)
    total = sum(p.stat().st_size for d in (final, final_text) for p in d.iterdir())
    log(f"tokenizer: vocab {len(tokenizer)}, sha256 {tok_sha[:16]}…")
    for s in C.SPLITS:
        i = info["splits"][s]
        log(f"  {s:<10} {i['documents']:>4} documents {i['tokens']:>10,} tokens  {i['xz_bytes']:>10,} B xz  "
            f"sha256 {i['sha256'][:16]}…")
    log(f"prepared data in {final} and {final_text}: {total:,} bytes in all")
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m models.tinyllama.prepare",
                                description="Corpus + tokenizer + the token data carried to the GPU machine.")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / C.MODELS_DATA_DIR),
                   help="prepared-data root (default: .models-data at the repo root)")
    p.add_argument("--train-budget-mb", type=float, default=2.0,
                   help="most MB of compressed train ids; whole documents are dropped to fit (default 2.0)")
    p.add_argument("--allow-unpinned", action="store_true", help="see models.tinyllama.corpus")
    p.add_argument("--deb", help="see models.tinyllama.corpus")
    args = p.parse_args(argv)
    try:
        prepare(Path(args.out), args.train_budget_mb, args.allow_unpinned, args.deb)
    except QCompileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
