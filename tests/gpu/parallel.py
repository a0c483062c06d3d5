"""Run the gpu-marked tests in N pytest processes at once: kernel compiles (CPU) dominate the GPU
suite, so on a 16-core GPU machine 12-16 processes take it from ~9 to ~4 minutes.

    python3 tests/gpu/parallel.py [N] [PATHS...]     (default: 12 processes, tests/gpu)

Tests are dealt round-robin; each process logs to a temporary directory, and the logs are joined
into one file, $OUT/gpu-suite.log (or /tmp/gpu-suite.log), after the summary: the device machine
returns only a few files from $OUT, so one file per shard crowded out the rest. Exits non-zero when
any process fails (a crash inside TVM ends that process only)."""
import os
import subprocess
import sys
import tempfile
import time


def main(argv):
    n = int(argv[0]) if argv else 12
    paths = argv[1:] or ["tests/gpu"]
    out = os.environ.get("OUT", "/tmp")
    logs = tempfile.mkdtemp(prefix="gpu-suite-")
    listed = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", *paths],
                            capture_output=True, text=True)
    ids = [line for line in listed.stdout.split() if "::" in line]
    if not ids:
        print(listed.stdout[-2000:], listed.stderr[-2000:], "no gpu tests collected", sep="\n")
        return 1
    procs = []
    for i in range(min(n, len(ids))):
        log = open(os.path.join(logs, f"shard{i}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfs", "-p",
                                       "no:cacheprovider", *ids[i::n]], stdout=log, stderr=subprocess.STDOUT))
    start = time.time()
    codes = [p.wait() for p in procs]
    lines = [f"{len(ids)} tests in {len(procs)} processes, {time.time() - start:.0f} s, exit codes {codes}"]
    texts = []
    for i in range(len(procs)):
        with open(os.path.join(logs, f"shard{i}.log")) as f:
            texts.append(f.read())
        lines.append(f"shard{i}: " + " | ".join(texts[-1].strip().splitlines()[-2:]))
    print("\n".join(lines))
    with open(os.path.join(out, "gpu-suite.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
        for i, text in enumerate(texts):
            f.write(f"\n===== shard{i} =====\n{text}")
    return int(any(codes))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
