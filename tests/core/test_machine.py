"""Usable CPUs and memory, read from cgroup fixture trees (v1, v2, a container, no limit)."""

from __future__ import annotations

from pathlib import Path

from etl.core.machine import cgroup_limits, machine, usable_cpus

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cgroup"
MiB = 1 << 20


def test_cgroup_v1_takes_the_tightest_limit_on_the_nested_path() -> None:
    # cron.service: 1 GiB inside system.slice's 2 GiB; quota 1.5 CPUs on the service only
    cpus, memory = cgroup_limits(FIXTURES / "v1")
    assert memory == 1 << 30
    assert cpus == 1.5


def test_cgroup_v1_in_a_container_reads_the_mount_root() -> None:
    # /proc/self/cgroup names the host's path; the container sees its own cgroup at the mount
    cpus, memory = cgroup_limits(FIXTURES / "v1-container")
    assert memory == 512 * MiB
    assert cpus == 0.5
    assert machine(FIXTURES / "v1-container").cpus == 1  # half a CPU still runs one worker


def test_cgroup_v2_reads_memory_max_and_cpu_max_up_the_tree() -> None:
    cpus, memory = cgroup_limits(FIXTURES / "v2")
    assert memory == 768 * MiB  # the scope says "max"; its parent slice sets the limit
    assert cpus == 2.5


def test_cgroup_unlimited_means_no_limit() -> None:
    # v1 "no limit" is a huge page-rounded number and a -1 quota; v2 says "max"
    assert cgroup_limits(FIXTURES / "unlimited") == (None, None)
    box = machine(FIXTURES / "unlimited")
    assert box.cgroup_memory is None and box.memory == box.available


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_limits(tmp_path) == (None, None)


def test_usable_memory_is_the_lower_of_cgroup_and_available() -> None:
    box = machine(FIXTURES / "v1-container")
    assert box.memory == min(512 * MiB, box.available)


def test_usable_cpus_is_the_affinity_capped_by_the_quota() -> None:
    assert usable_cpus(FIXTURES / "v1-container") == 1  # quota of half a CPU
    assert usable_cpus(FIXTURES / "unlimited") == len(__import__("os").sched_getaffinity(0))
