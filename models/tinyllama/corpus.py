"""Step 1 of the recipe: the pinned corpus.

Downloads Debian's python3.11-doc .deb (the HTML behind ``python3-doc``) at the version pinned in
corpus.json with ``apt-get download``, checks its sha256, unpacks it with ``dpkg-deb -x``, converts
the documentation pages to text (qcompile.model.corpus.html_to_text) and writes the train /
validation / test splits with a manifest to ``~/.cache/qcompile/corpus/python-docs/``.

    python3 -m models.tinyllama.corpus [--allow-unpinned] [--deb PATH] [--force]

Needs apt-get (run ``apt-get update`` once) and dpkg-deb, or ``--deb`` with the pinned file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qcompile.errors import QCompileError  # noqa: E402
from qcompile.model import corpus as C  # noqa: E402

PIN_FILE = Path(__file__).with_name("corpus.json")
COMMAND = "python3 -m models.tinyllama.corpus"


def load_pin() -> dict:
    with open(PIN_FILE) as f:
        return json.load(f)


def archive_versions(package: str) -> list:
    """The versions of ``package`` that apt can download, newest first."""
    if shutil.which("apt-cache") is None:
        raise QCompileError(f"apt-cache is not available here; pass --deb with the pinned {package} .deb "
                            f"(see {PIN_FILE})")
    out = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True).stdout
    versions = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 2 and parts[0] == package and parts[1] not in versions:
            versions.append(parts[1])
    return versions


def fetch_deb(pin: dict, cache: Path, allow_unpinned: bool, deb: str = None, log=print) -> tuple:
    """(path of the .deb, version, sha256); verified against the pin unless allow_unpinned."""
    package, version = pin["package"], pin["version"]
    cache.mkdir(parents=True, exist_ok=True)
    pinned = cache / pin["deb"]
    if deb is not None:
        src = Path(deb)
        if not src.is_file():
            raise QCompileError(f"--deb {deb}: no such file")
        sha = C.sha256_file(src)
        if sha != pin["deb_sha256"] and not allow_unpinned:
            raise QCompileError(f"--deb {deb} has sha256 {sha} but {PIN_FILE.name} pins {pin['deb_sha256']}; "
                                f"pass --allow-unpinned to use it anyway")
        return src, (version if sha == pin["deb_sha256"] else f"unknown ({src.name})"), sha
    if pinned.is_file() and C.sha256_file(pinned) == pin["deb_sha256"]:
        log(f"using cached {pinned}")
        return pinned, version, pin["deb_sha256"]
    versions = archive_versions(package)
    if not versions:
        raise QCompileError(f"apt knows no package {package}; run `apt-get update` (Debian 12 archive) or pass "
                            f"--deb with {pin['deb']}")
    if version in versions:
        want = version
    elif allow_unpinned:
        want = versions[0]
        log(f"warning: {package} {version} is pinned but the archive has {', '.join(versions)}; "
            f"using {want} (--allow-unpinned): the splits will not match the pinned sha256s")
    else:
        raise QCompileError(
            f"{package} {version} is pinned ({PIN_FILE}) but Debian's archive has {', '.join(versions)}; "
            f"pass --allow-unpinned to use {versions[0]}, or put the pinned {pin['deb']} "
            f"(sha256 {pin['deb_sha256'][:16]}…, {pin.get('snapshot', 'snapshot.debian.org')}) in {cache}")
    log(f"apt-get download {package}={want}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.chmod(tmp, 0o755)  # so apt's sandbox user may write
        r = subprocess.run(["apt-get", "download", f"{package}={want}"], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise QCompileError(f"apt-get download {package}={want} failed: "
                                f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no output']}")
        sha = C.sha256_file(debs[0])
        if want == version and sha != pin["deb_sha256"]:
            raise QCompileError(f"downloaded {debs[0].name} has sha256 {sha} but {PIN_FILE.name} pins "
                                f"{pin['deb_sha256']}: the archive's file changed; pass --allow-unpinned to use it")
        final = cache / debs[0].name
        os.replace(debs[0], final)
    return final, want, sha


def prepare_corpus(allow_unpinned: bool = False, deb: str = None, force: bool = False, log=print) -> Path:
    """Make (or check) ``<cache>/corpus/python-docs``; returns its directory."""
    pin = load_pin()
    cache = C.cache_root() / "corpus"
    out = cache / C.CORPUS_NAME
    if (out / "manifest.json").is_file() and not force:
        manifest = C.read_manifest(out)
        if (manifest.get("deb_sha256") == pin["deb_sha256"] and manifest.get("extract_version") == C.EXTRACT_VERSION):
            for split in C.SPLITS:
                C.read_split(split, out, verify=True)
            expected = pin.get("expected_splits") or {}
            same = all(expected.get(s) in (None, manifest["splits"][s]["sha256"]) for s in C.SPLITS)
            log(f"corpus already in {out} (sha256 verified{', matches the pinned splits' if same and expected else ''})")
            if not same:
                log(f"warning: the cached splits differ from the sha256s pinned in {PIN_FILE.name}; "
                    f"rerun with --force to remake them")
            return out
        if not allow_unpinned:
            log(f"corpus in {out} was made from another package or extraction; remaking it")
        else:
            log(f"corpus in {out} kept (--allow-unpinned)")
            return out

    path, version, sha = fetch_deb(pin, cache, allow_unpinned, deb, log)
    if shutil.which("dpkg-deb") is None:
        raise QCompileError("dpkg-deb is not available here; run the corpus step on a Debian/Ubuntu machine")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="python-docs-extract-") as tmp:
        subprocess.run(["dpkg-deb", "-x", str(path), tmp], check=True)
        html_root = Path(tmp) / pin["html_root"]
        if not html_root.is_dir():
            raise QCompileError(f"{path.name} has no {pin['html_root']}; is it the right package?")
        log(f"converting HTML under {pin['html_root']} to text")
        data, stats = C.build_splits(html_root, progress=log)
    manifest = {
        "corpus": C.CORPUS_NAME, "package": pin["package"], "version": version, "deb": path.name,
        "deb_sha256": sha, "pinned": sha == pin["deb_sha256"], "extract_version": C.EXTRACT_VERSION,
        "html_root": pin["html_root"], "split_rule": f"sha256('{C.SPLIT_SALT}' + path) -> {list(C.SPLIT_FRACTIONS)}",
        "splits": stats, "python": sys.version.split()[0],
    }
    expected = pin.get("expected_splits")
    if expected and sha == pin["deb_sha256"]:
        bad = [s for s in C.SPLITS if expected.get(s) != stats[s]["sha256"]]
        if bad and not allow_unpinned:
            raise QCompileError(f"the {', '.join(bad)} split(s) came out with other sha256s than {PIN_FILE.name} "
                                f"records (another Python's html.parser?); pass --allow-unpinned to keep them")
        manifest["matches_pinned_splits"] = not bad
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{C.CORPUS_NAME}.tmp-", dir=out.parent))
    try:
        for split in C.SPLITS:
            (tmp_out / f"{split}.jsonl").write_bytes(data[split])
        with open(tmp_out / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        os.chmod(tmp_out, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp_out, out)
    finally:
        if tmp_out.exists():
            shutil.rmtree(tmp_out, ignore_errors=True)
    for split in C.SPLITS:
        s = stats[split]
        log(f"  {split:<10} {s['documents']:>4} documents {s['characters']:>11,} characters  sha256 {s['sha256'][:16]}…")
    log(f"corpus written to {out} in {time.time() - t0:.0f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--allow-unpinned", action="store_true",
                   help="use the archive's version (or --deb file) even if it is not the pinned one")
    p.add_argument("--deb", help="use this python3.11-doc .deb instead of downloading it")
    p.add_argument("--force", action="store_true", help="remake the splits even if they are cached")
    args = p.parse_args(argv)
    try:
        prepare_corpus(args.allow_unpinned, args.deb, args.force)
    except QCompileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
