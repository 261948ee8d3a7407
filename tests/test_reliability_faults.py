"""Faults around the server process: a shard gone after the harvest, a device error, a harvest
SIGKILLed at random moments (including mid-download from a hub), hostile hub file names.

tests/test_harvest.py already kills a local harvest after *every* filesystem change; here the
kill comes at random wall-clock moments of a real `modeldeploy harvest` process fetching from a
local Hub, which also lands inside huggingface_hub's download (a half-written blob), and the
next run must produce exactly the reference result.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
from hubserver import HubServer
from modeldeploy.server.errors import SourceError
from modeldeploy.server.harvest import harvest, read_record
from serve_process import ServerProcess

KILLS = int(os.environ.get("MODELDEPLOY_HARVEST_KILLS", "20"))


def _poll_failed(proc: ServerProcess, within: float = 120) -> tuple[dict, int, int]:
    """Poll /ready until it says failed; return its body, /health's status and the exit code."""
    proc.wait_listening()
    deadline = time.monotonic() + within
    failed: dict = {}
    health = 0
    with httpx.Client(base_url=proc.url, timeout=10) as http:
        while proc.proc.poll() is None and not failed and time.monotonic() < deadline:
            try:
                ready = http.get("/ready")
                if ready.json().get("status") == "failed":
                    assert ready.status_code == 503
                    failed, health = ready.json(), http.get("/health").status_code
            except httpx.TransportError:
                break
            time.sleep(0.05)
    return failed, health, proc.wait_exit(timeout=60)


def test_a_shard_deleted_after_the_harvest_fails_the_load_naming_it(
    tiny_models, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_models.hf("llama", sharded=True), model)
    slugs = tmp_path / "slugs"
    harvest(str(model), slugs)
    shards = sorted(model.glob("*-of-*.safetensors"))
    assert len(shards) >= 2
    victim = shards[-1]
    victim.unlink()
    log = tmp_path / "termination-log"
    log.write_text("")  # the kubelet creates it; the server writes only into an existing one
    proc = ServerProcess(
        model, "--slug-root", str(slugs),
        env={"MODELDEPLOY_TERMINATION_LOG": str(log)}, cache_root=tmp_path / "cache",
    )  # fmt: skip
    with proc:
        failed, health, code = _poll_failed(proc)
    assert victim.name in failed.get("reason", ""), (failed, proc.log_tail())
    assert code == 2, proc.log_tail()
    assert health == 503
    assert log.read_text() == failed["reason"]
    assert "Traceback" not in "\n".join(proc.lines)


def test_a_device_error_at_the_first_step_turns_health_503(tiny_models, tmp_path: Path) -> None:
    proc = ServerProcess(
        tiny_models.gguf("llama", "F32"),
        env={"MODELDEPLOY_INJECT_DEVICE_FAULT": "1"}, cache_root=tmp_path / "cache",
    )  # fmt: skip
    with proc, httpx.Client(timeout=30) as http:
        proc.wait_listening()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.proc.poll() is not None:
                break
            health = http.get(f"{proc.url}/health")
            if health.status_code == 503:
                break
            if http.get(f"{proc.url}/ready").status_code == 200:
                step = http.post(
                    f"{proc.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}
                )
                assert step.status_code == 503, step.text
                assert step.json()["error"]["code"] == "model_poisoned"
            time.sleep(0.1)
        health = http.get(f"{proc.url}/health")
        assert health.status_code == 503, proc.log_tail()
        assert health.json()["status"] == "poisoned"
        assert http.get(f"{proc.url}/ready").status_code == 503
        assert proc.proc.poll() is None  # the kubelet restarts it; the process does not exit


# ---- harvest killed at random moments while fetching from a hub -------------------------


def _slug_state(slug_dir: Path) -> dict[str, str]:
    return {
        e.name: os.readlink(e.path)
        for e in sorted(os.scandir(slug_dir), key=lambda e: e.name)
        if not e.name.startswith(".modeldeploy-")
    }


def _harvest_in_child(source: str, slugs: Path, cache: Path) -> None:
    harvest(source, slugs, cache_dir=cache)


def test_a_harvest_sigkilled_at_random_moments_then_rerun_is_correct(
    tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KILLS harvests (forked, so no interpreter start-up per run) SIGKILLed after a random
    delay within an uncut harvest's duration; the next run (same cache, same slug root) must
    give exactly the reference result. Every other run starts from the previous half-done
    state, so kills also land on top of earlier kills."""
    root = tmp_path / "hub"
    shutil.copytree(tiny_models.hf("qwen2", sharded=True), root / "org" / "Tiny")
    fork = multiprocessing.get_context("fork")
    hub = HubServer(root)
    hub._httpd.handle_error = lambda *_: None  # killed clients: broken pipes are expected
    with hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        harvest("hf://org/Tiny", tmp_path / "warm-slugs", cache_dir=tmp_path / "warm")  # imports
        start = time.monotonic()
        reference = harvest("hf://org/Tiny", tmp_path / "ref-slugs", cache_dir=tmp_path / "ref")
        full = time.monotonic() - start
        ref_state = _cacheless(_slug_state(Path(reference.slug_dir)), tmp_path / "ref")
        rng = random.Random(1234)
        killed = 0
        for i in range(KILLS):
            slugs, cache = tmp_path / f"slugs-{i}", tmp_path / f"cache-{i}"
            if i % 2:
                shutil.copytree(tmp_path / f"slugs-{i - 1}", slugs, symlinks=True)
                shutil.copytree(tmp_path / f"cache-{i - 1}", cache, symlinks=True)
            child = fork.Process(target=_harvest_in_child, args=("hf://org/Tiny", slugs, cache))
            child.start()
            time.sleep(rng.uniform(0.0, 0.75 * full))  # mostly before it would finish
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
            killed += child.exitcode == -signal.SIGKILL
            slug_dir = slugs / reference.slug
            record = read_record(slug_dir) if slug_dir.exists() else None
            if record is not None:  # whatever a kill leaves vouched for is complete
                assert sorted(record.linked_files) == sorted(ref_state), f"run {i}"
            rerun = harvest("hf://org/Tiny", slugs, cache_dir=cache)
            assert _cacheless(_slug_state(slug_dir), cache) == ref_state, f"run {i}"
            assert read_record(slug_dir) == rerun
            for weight in rerun.weight_files:  # no half-downloaded weight accepted
                original = root / "org" / "Tiny" / Path(weight).name
                assert Path(weight).read_bytes() == original.read_bytes(), f"run {i}: {weight}"
        print(
            f"\nharvest kills: {KILLS} runs, {killed} killed before finishing (an uncut "
            f"harvest takes {full:.2f}s); every re-run equal to the reference"
        )
    assert killed >= KILLS // 2


def _cacheless(state: dict[str, str], cache: Path) -> dict[str, str]:
    """Link targets with the (per-run) cache directory replaced, so runs compare."""
    return {k: v.replace(str(cache.resolve()), "<cache>") for k, v in state.items()}


# ---- hostile names from a hub ----------------------------------------------------------


class _LyingHub(HubServer):
    """A Hub whose listing of org/M also names `extra` (served with harmless bytes)."""

    extra = ""

    def repo_files(self, repo_id: str) -> dict[str, Path]:
        files = super().repo_files(repo_id)
        if repo_id == "org/M":
            files[self.extra] = files["config.json"]
        return files


@pytest.mark.parametrize(
    "name",
    ["../escape.json", "sub/../../escape.json", "/etc/escape.json", "a\\..\\escape.json", ".."],
)
def test_hub_file_names_that_escape_are_refused_before_any_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    root = tmp_path / "hub"
    (root / "org" / "M").mkdir(parents=True)
    (root / "org" / "M" / "config.json").write_text("{}")
    (root / "org" / "M" / "model.safetensors").write_bytes(b"W")
    hub = _LyingHub(root)
    hub.extra = name
    with hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(SourceError, match="unsafe file name"):
            harvest("hf://org/M", tmp_path / "slugs", cache_dir=tmp_path / "cache")
        assert hub.downloads() == []
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "slugs").exists()


def test_a_planted_symlink_in_the_slug_dir_is_replaced_not_followed(tmp_path: Path) -> None:
    """Someone with write access to the volume plants `config.json -> /etc/passwd` (or a link
    to a directory) in the slug dir: the harvest replaces the entry, never writes through it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"ok": 1}')
    (model / "extra.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"W")
    first = harvest(str(model), tmp_path / "slugs")
    slug_dir = Path(first.slug_dir)
    target = tmp_path / "victim.txt"
    target.write_text("untouched")
    (slug_dir / "config.json").unlink()
    (slug_dir / "config.json").symlink_to(target)
    (slug_dir / "extra.json").unlink()
    (slug_dir / "extra.json").symlink_to(tmp_path, target_is_directory=True)
    assert read_record(slug_dir) is None
    again = harvest(str(model), tmp_path / "slugs")
    assert target.read_text() == "untouched"
    assert _slug_state(slug_dir) == {
        "config.json": str(model / "config.json"),
        "extra.json": str(model / "extra.json"),
    }
    assert read_record(slug_dir) == again


def test_a_slug_directory_planted_as_a_symlink_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    """`<slug-root>/<slug>` itself replaced by a link to another directory (say, another
    model's): the harvest must not put its links and record there."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"W")
    first = harvest(str(model), tmp_path / "slugs")
    slug_dir = Path(first.slug_dir)
    shutil.rmtree(slug_dir)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text('{"victim": true}')
    slug_dir.symlink_to(victim, target_is_directory=True)
    again = harvest(str(model), tmp_path / "slugs")
    assert sorted(os.listdir(victim)) == ["config.json"]
    assert (victim / "config.json").read_text() == '{"victim": true}'
    assert not slug_dir.is_symlink() and read_record(slug_dir) == again
