"""Thread count from the container's CPU limit (cgroup v2 cpu.max, v1 CFS quota, affinity)."""

from __future__ import annotations

import os

import pytest
import torch
from modeldeploy.server.engine import cpu


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("content", "limit"),
    [("200000 100000", 2.0), ("150000 100000", 1.5), ("max 100000", None), ("50000", 0.5)],
)
def test_cgroup_v2_cpu_max(tmp_path, content, limit):
    (tmp_path / "cpu.max").write_text(content + "\n")
    assert cpu.cgroup_cpu_limit(tmp_path) == limit


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cpu.cgroup_cpu_limit(tmp_path) is None
    assert cpu.available_cpus(tmp_path) == affinity()


def test_fractional_limit_rounds_up_and_never_exceeds_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000")
    assert cpu.available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity() + 8) * 100000} 100000")
    assert cpu.available_cpus(tmp_path) == affinity()


def test_configure_threads_honours_env_override(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(cpu.THREADS_ENV, "1")
        assert cpu.configure_threads() == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(cpu.THREADS_ENV, "lots")
        assert cpu.configure_threads() == cpu.available_cpus()
    finally:
        torch.set_num_threads(before)
