"""modeldeploy against llama.cpp and HF transformers on the same GGUF, side by side.

A benchmark, not a test (issue 9): one invocation runs every peer on the same file, the
same thread count and the same token counts, trials interleaved (A B C A B C ..., the
order rotated each repetition so no peer always runs first after an idle pause; the
peers not being measured are paused, see `alone`), and prints medians, min-max and
our/peer ratios; JSON and a Markdown table go to bench/results/. The machine is shared
and noisy: read medians, and re-run before believing a single figure.

Peers (installed by `make bench` into bench/.work, never into the product):
- ours: `modeldeploy serve` over HTTP (OpenAI /v1/completions, streamed);
- llama-cpp-python (in-process worker) for single-stream prompt and decode;
- llama-server (native, `-np N` continuous batching) over the same HTTP API: single
  stream and the concurrent runs;
- transformers (eager attention, in-process worker) for single stream.

Metrics: prompt tok/s at each --prompt-lens (time to the first token of a max_tokens=1
request, or the prompt eval for in-process peers), single-stream decode tok/s over
--decode-tokens (greedy, EOS ignored; first token excluded), aggregate decode tok/s
and p50/p95 TTFT at each --concurrency, process start -> ready, peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORK = HERE / ".work"
CORPUS = (
    "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
    "        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n"
    "The operator watches ModelDeployment objects and creates a Deployment, a Service and "
    "a PersistentVolumeClaim for each; the pod downloads the weights before it is ready. "
    "Continuous batching admits new requests between decode steps, so short requests do "
    "not wait for long ones. SELECT name, count(*) FROM requests GROUP BY name ORDER BY 2; "
)


# ---------------------------------------------------------------------------------------
# prompts of a given token count, unique per trial (defeats prompt caches)


class Prompts:
    def __init__(self, model: Path) -> None:
        from modeldeploy.server.engine.tokenizer import Tokenizer
        from modeldeploy.server.formats.gguf_file import GGUFFile

        self.tok = Tokenizer.from_files(None, GGUFFile.open(model).metadata)
        self.base = self.tok.encode(CORPUS * 200, add_special_tokens=False)

    def make(self, n_tokens: int, salt: int) -> str:
        """About n_tokens of text (peers count their own), starting with a unique salt."""
        head = f"Request {salt}: "
        room = n_tokens - len(self.tok.encode(head, add_special_tokens=False)) - 1
        start = (salt * 37) % 1000
        return head + self.tok.decode(self.base[start : start + room])


# ---------------------------------------------------------------------------------------
# peers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class HttpPeer:
    """A server process answering OpenAI /v1/completions; started (and restarted) here."""

    name: str
    argv: list[str]
    ready_path: str
    env: dict[str, str]
    port: int
    model_name: str = "model"
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> float:
        """Start the process; seconds until the ready path answers 200."""
        self.stop()
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".log")[1])
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    elapsed = time.perf_counter() - t0
                    self.model_name = self._served_name()
                    self._wait_settled(t0 + timeout)
                    return elapsed
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s (log {self.log})")

    def _wait_settled(self, until: float) -> None:
        """Ours finishes settling its weights in the background after /ready (gate|up's
        FBGEMM packing, copies out of the cache file, the head's FBGEMM packing: ~2.5 s
        of one core; compiling the decode step: ~14 s, seconds from a warm Inductor
        cache); measure the steady state, not that. Servers without `/model`
        `weights.settled` pass at once."""
        while time.perf_counter() < until:
            try:
                weights = httpx.get(self.url + "/model", timeout=2).json().get("weights") or {}
            except (httpx.HTTPError, ValueError, AttributeError):
                return
            if weights.get("settled") is not False:
                return
            time.sleep(0.1)

    def _served_name(self) -> str:
        """The id the server lists first in /v1/models (both servers name it differently)."""
        try:
            return httpx.get(self.url + "/v1/models", timeout=5).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            return self.model_name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def rss(self) -> int | None:
        return peak_rss(self.proc.pid) if self.proc else None

    def body(self, prompt: str, max_tokens: int, stream: bool) -> dict:
        return {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
            "ignore_eos": True,
            "cache_prompt": False,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }

    def prompt(self, text: str) -> dict:
        t0 = time.perf_counter()
        r = httpx.post(self.url + "/v1/completions", json=self.body(text, 1, False), timeout=600)
        r.raise_for_status()
        return {
            "prompt_tokens": r.json()["usage"]["prompt_tokens"],
            "seconds": time.perf_counter() - t0,
        }

    async def stream(self, client: httpx.AsyncClient, text: str, tokens: int) -> dict:
        """Times of each streamed token: TTFT, decode seconds after the first, count."""
        t0 = time.perf_counter()
        times: list[float] = []
        async with client.stream(
            "POST", self.url + "/v1/completions", json=self.body(text, tokens, True), timeout=900
        ) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices") or []):
                    times.append(time.perf_counter())
        if not times:
            raise RuntimeError(f"{self.name}: no tokens streamed")
        return {
            "ttft": times[0] - t0,
            "tokens": len(times),
            "start": t0,
            "end": times[-1],
            "decode_s": times[-1] - times[0],
        }

    def decode(self, text: str, tokens: int) -> dict:
        async def one() -> dict:
            async with httpx.AsyncClient() as client:
                return await self.stream(client, text, tokens)

        r = asyncio.run(one())
        return {"tokens": r["tokens"] - 1, "seconds": r["decode_s"]}

    def concurrent(self, texts: list[str], tokens: int) -> dict:
        async def run() -> list[dict]:
            limits = httpx.Limits(max_connections=len(texts) + 4)
            async with httpx.AsyncClient(limits=limits) as client:
                return await asyncio.gather(*(self.stream(client, t, tokens) for t in texts))

        rs = asyncio.run(run())
        wall = max(r["end"] for r in rs) - min(r["start"] for r in rs)
        ttfts = sorted(r["ttft"] for r in rs)
        return {
            "aggregate_tok_s": sum(r["tokens"] for r in rs) / wall,
            "ttft_p50": quantile(ttfts, 0.5),
            "ttft_p95": quantile(ttfts, 0.95),
        }


@dataclass
class WorkerPeer:
    """An in-process peer in its own interpreter (bench/peer_worker.py)."""

    name: str
    python: str
    load_args: dict
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died")
        result = json.loads(line)
        if "error" in result:
            raise RuntimeError(f"{self.name}: {result['error']}")
        return result

    def start(self, timeout: float = 900) -> float:
        self.stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [self.python, str(HERE / "peer_worker.py"), self.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **self.env},
        )
        self.call(op="load", **self.load_args)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def rss(self) -> int | None:
        return self.call(op="rss")["peak_rss_bytes"] if self.proc else None

    def prompt(self, text: str) -> dict:
        return self.call(op="prompt", text=text)

    def decode(self, text: str, tokens: int) -> dict:
        return self.call(op="decode", text=text, tokens=tokens)


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# ---------------------------------------------------------------------------------------
# the run


def compile_our_sources() -> None:
    """Byte-compile the product's modules, as installing it into an image does.

    `pip install .` (Dockerfile.server) writes every module's .pyc, so a pod imports
    them precompiled. The bench runs the editable checkout instead, and where
    PYTHONDONTWRITEBYTECODE is set (as in this workplace), every start would compile
    the sources again: 0.4-0.5 s of start-up that no pod pays (measured: importing the
    HTTP app and the engine took 2.73-2.91 s with .pyc files, 3.21-3.74 s without).
    """
    import compileall

    compileall.compile_dir(REPO / "server", quiet=1)


def serving_shape(args: argparse.Namespace) -> tuple[int, int]:
    """(slots, context) every server gets: one slot per stream of the highest
    concurrency, a context for the longest prompt plus the decoded tokens."""
    return max(args.concurrency), max(args.prompt_lens) + args.decode_tokens + 64


def threads_env(args: argparse.Namespace) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(args.threads), "MODELDEPLOY_THREADS": str(args.threads)}


def ours_command(args: argparse.Namespace, port: int) -> list[str]:
    """`modeldeploy serve` as the bench starts it (bench/rss_stages.py starts it so too)."""
    slots, ctx = serving_shape(args)
    return [
        str(REPO / ".venv/bin/modeldeploy"),
        "serve",
        str(args.model),
        "--port",
        str(port),
        "--max-concurrent",
        str(slots),
        "--max-model-len",
        str(ctx),
        "--log-level",
        "warning",
        "--slug-root",
        str(args.work / "slugs"),
        *args.ours_args,
    ]


def build_peers(args: argparse.Namespace) -> dict[str, HttpPeer | WorkerPeer]:
    work, t = args.work, args.threads
    slots, ctx = serving_shape(args)
    peers: dict[str, HttpPeer | WorkerPeer] = {}
    for name in args.peers:
        if name == "ours":
            compile_our_sources()
            peers[name] = HttpPeer(
                name,
                ours_command(args, port := free_port()),
                "/ready",
                threads_env(args),
                port,
                model_name=args.model.name,
            )
        elif name == "llama-server":
            binary = work / "llama-build/bin/llama-server"
            peers[name] = HttpPeer(
                name,
                [
                    str(binary),
                    "-m",
                    str(args.model),
                    "--port",
                    str(port := free_port()),
                    "-t",
                    str(t),
                    "-tb",
                    str(t),
                    "-np",
                    str(slots),
                    "-c",
                    str(ctx * slots),
                    "-b",
                    "512",
                    "--no-webui",
                    "-lv",
                    "0",
                ],
                "/health",
                {},
                port,
            )
        elif name == "llama-cpp-python":
            peers[name] = WorkerPeer(
                name,
                str(work / "venv/bin/python"),
                {"model": str(args.model), "threads": t, "ctx": ctx},
                {"LLAMA_CPP_LIB_PATH": str(work / "llama-build/bin")},
            )
        elif name == "transformers":
            peers[name] = WorkerPeer(
                name,
                str(REPO / ".venv/bin/python"),
                {
                    "model": str(args.model),
                    "threads": t,
                    "ctx": ctx,
                    "dtype": args.transformers_dtype,
                },
                threads_env(args),
            )
        else:
            raise SystemExit(f"unknown peer {name!r}")
    return peers


def summarize(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


@contextlib.contextmanager
def alone(peers: dict[str, HttpPeer | WorkerPeer], name: str):
    """Pause (SIGSTOP) every other peer's process while `name` is measured.

    An idle peer is not always idle: llama-server's worker threads poll for work and
    were measured at 100% of one core between requests, which on a 2-core machine took
    a core from whichever peer was being measured. Paused processes take no CPU.
    """
    stopped = [
        peer.proc
        for other, peer in peers.items()
        if other != name and peer.proc is not None and peer.proc.poll() is None
    ]
    for proc in stopped:
        _signal_group(proc, signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in stopped:
            _signal_group(proc, signal.SIGCONT)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a peer with its children when it leads its own process group."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def run(args: argparse.Namespace) -> dict:
    prompts = Prompts(args.model)
    peers = build_peers(args)
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in peers}
    errors: list[str] = []

    def record(peer: str, metric: str, value: float) -> None:
        samples[peer].setdefault(metric, []).append(value)
        print(f"  {peer:18s} {metric:28s} {value:10.2f}", flush=True)

    order = list(peers)
    salt = 0
    try:
        # Start-up: each peer started --startup-reps times, interleaved; the last stays up.
        for rep in range(args.startup_reps):
            for name in order[rep % len(order) :] + order[: rep % len(order)]:
                with alone(peers, name):
                    ready = peers[name].start()
                record(name, "ready_s", ready)
        for rep in range(args.reps):
            rot = order[rep % len(order) :] + order[: rep % len(order)]
            print(f"rep {rep + 1}/{args.reps}", flush=True)
            for n in args.prompt_lens:
                for name in rot:
                    salt += 1
                    try:
                        with alone(peers, name):
                            r = peers[name].prompt(prompts.make(n, salt))
                        record(name, f"prompt{n}_tok_s", r["prompt_tokens"] / r["seconds"])
                    except Exception as exc:  # a peer failing one trial must not end the run
                        errors.append(f"{name} prompt{n}: {exc}")
            for name in rot:
                salt += 1
                try:
                    with alone(peers, name):
                        r = peers[name].decode(prompts.make(32, salt), args.decode_tokens)
                    record(name, "decode_tok_s", r["tokens"] / r["seconds"])
                except Exception as exc:
                    errors.append(f"{name} decode: {exc}")
            for c in args.concurrency:
                for name in rot:
                    peer = peers[name]
                    if not isinstance(peer, HttpPeer):
                        continue
                    texts = []
                    for _ in range(c):
                        salt += 1
                        texts.append(prompts.make(32, salt))
                    try:
                        with alone(peers, name):
                            r = peer.concurrent(texts, args.decode_tokens)
                    except Exception as exc:
                        errors.append(f"{name} concurrent{c}: {exc}")
                        continue
                    record(name, f"c{c}_aggregate_tok_s", r["aggregate_tok_s"])
                    record(name, f"c{c}_ttft_p50_s", r["ttft_p50"])
                    record(name, f"c{c}_ttft_p95_s", r["ttft_p95"])
        for name, peer in peers.items():
            rss = peer.rss()
            if rss:
                record(name, "peak_rss_mb", rss / 2**20)
    finally:
        for peer in peers.values():
            peer.stop()
    return {
        "model": str(args.model),
        "model_mb": args.model.stat().st_size / 2**20,
        "threads": args.threads,
        "reps": args.reps,
        "decode_tokens": args.decode_tokens,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "samples": samples,
        "summary": {p: {m: summarize(v) for m, v in ms.items()} for p, ms in samples.items()},
        "errors": errors,
    }


LOWER_IS_BETTER = ("_s", "_mb")


def markdown(result: dict) -> str:
    summary = result["summary"]
    peers = list(summary)
    metrics = sorted({m for ms in summary.values() for m in ms}, key=_metric_order)
    others = [p for p in peers if p != "ours"] if "ours" in peers else []
    head = "| metric | " + " | ".join([*peers, *(f"ours/{p}" for p in others)]) + " |"
    lines = [
        f"Model `{Path(result['model']).name}` ({result['model_mb']:.0f} MiB), "
        f"{result['threads']} threads, {result['reps']} interleaved reps, {result['time']}. "
        "Cells: median (min-max). Ratios: ours/peer medians (for times and memory, "
        "below 1 is better).",
        "",
        head,
        "|" + "---|" * (1 + len(peers) + len(others)),
    ]
    for m in metrics:
        cells = []
        for p in peers:
            s = summary[p].get(m)
            cells.append(f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "-")
        ours = summary.get("ours", {}).get(m)
        for p in others:
            s = summary[p].get(m)
            cells.append(f"{ours['median'] / s['median']:.2f}x" if ours and s else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if result["errors"]:
        lines += ["", "Errors:", *(f"- {e}" for e in result["errors"])]
    return "\n".join(lines) + "\n"


def _metric_order(m: str) -> tuple:
    """ready, prompt by length, decode, concurrency by level, memory."""
    prefix = ["ready", "prompt", "decode", "c", "peak"]
    group = next((i for i, p in enumerate(prefix) if m.startswith(p)), 99)
    digits = "".join(ch if ch.isdigit() else " " for ch in m).split()
    return (group, int(digits[0]) if digits and group in (1, 3) else 0, m)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?", help="the .gguf every peer loads")
    ap.add_argument(
        "--peers",
        default="ours,llama-cpp-python,llama-server,transformers",
        type=lambda s: s.split(","),
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--startup-reps", type=int, default=2)
    ap.add_argument("--prompt-lens", default="256,2048", type=_ints)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4,8,16", type=_ints)
    ap.add_argument("--transformers-dtype", default="bfloat16")
    ap.add_argument("--ours-args", default="", type=str.split, help="extra serve options")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", type=Path, default=None, help="re-print a saved JSON result")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        table = markdown(json.loads(args.render.read_text()))
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return 0
    args.model = args.model.resolve()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{args.model.stem}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    table = markdown(result)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table)
    (args.out / "latest.md").write_text(table)
    print(table)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


if __name__ == "__main__":
    sys.exit(main())
