"""Where `modeldeploy serve`'s memory goes, stage by stage, under the bench's workload.

`bench.py` reports one figure: the server's peak RSS over the whole run. This script
says which stage raised it. It starts one server, then reads /proc/PID/status at each
stage: ready, weights settled (the decode step compiled), each of three ~2000-token
prompts, then 128 tokens at 1, 4, 8 and 16 streams. At the settled and final stages
it also lists the mappings holding the most resident memory. The server is started
exactly as `bench.py` starts it (`bench.ours_command`, sources byte-compiled).
RssShmem (weights moved to anonymous memory by `memory.to_anonymous`, shown as `zero`)
is in VmRSS but in neither RssAnon nor RssFile.

    .venv/bin/python bench/rss_stages.py MODEL.gguf [extra `serve` options, e.g. --no-compile]
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request

from bench import compile_our_sources, free_port, ours_command, parse_args, threads_env

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "kernel",
    "tensor",
    "memory",
    "stream",
    "token",
    "server",
    "model",
    "layer",
]
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def status(pid: int) -> str:
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
    with open(f"/proc/{pid}/status") as f:
        fields = {
            k: int(v.split()[0]) // 1024 for k, _, v in (ln.partition(":") for ln in f) if k in keys
        }
    return " ".join(f"{k}={fields[k]}MB" for k in keys if k in fields)


def top_mappings(pid: int, n: int = 8) -> str:
    resident: collections.Counter[str] = collections.Counter()
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if _MAPPING.match(line):
                parts = line.split()
                name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
            elif line.startswith("Rss:"):
                resident[name] += int(line.split()[1])
    return ", ".join(f"{k} {v // 1024}MB" for k, v in resident.most_common(n))


def main() -> None:
    model, extra = sys.argv[1], sys.argv[2:]
    args = parse_args([model, f"--ours-args={' '.join(extra)}"])
    args.model = args.model.resolve()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, **threads_env(args))
    cmd = ours_command(args, port)
    compile_our_sources()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)

    def get(path: str) -> dict:
        return json.loads(urllib.request.urlopen(base + path, timeout=600).read())

    def post(prompt: str, max_tokens: int) -> dict:
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        req = urllib.request.Request(
            base + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        return json.loads(urllib.request.urlopen(req, timeout=600).read())

    def stage(tag: str) -> None:
        print(f"{tag:26s} {time.monotonic() - started:6.1f}s  {status(proc.pid)}", flush=True)

    try:
        while True:
            try:
                urllib.request.urlopen(base + "/ready", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit(f"server exited with {proc.returncode}")
                time.sleep(0.05)
        stage("ready")
        while not get("/model").get("weights", {}).get("settled", True):
            time.sleep(0.5)
        stage("settled")
        print("  decode step:", get("/model").get("weights", {}).get("decode_step"))
        print("  most resident:", top_mappings(proc.pid))
        name = get("/v1/models")["data"][0]["id"]
        rng = random.Random(1)
        for i in range(3):
            words = (rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(700))
            r = post(" ".join(words), 1)
            stage(f"prompt {i} ({r['usage']['prompt_tokens']} tokens)")
        for c in (1, 4, 8, 16):
            prompts = [
                f"story {c} {j} " + " ".join(rng.choice(WORDS) for _ in range(20)) for j in range(c)
            ]
            threads = [threading.Thread(target=post, args=(p, 128)) for p in prompts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stage(f"{c} streams x 128 tokens")
        print("  most resident:", top_mappings(proc.pid))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
