"""Host sampling with the real psutil on this machine: NodeGet's shapes, sane values, rates."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from taskd.agent.monitor import Monitor, connection_counts, data_hash, summarize

AGENT_UUID = str(uuid.uuid4())

# Every structure and field name of NodeGet's docs/api/monitoring/index.md
STATIC_KEYS = {"uuid", "time", "data_hash", "cpu", "system", "gpu"}
STATIC_CPU_KEYS = {"physical_cores", "logical_cores", "per_core"}
STATIC_CORE_KEYS = {"id", "name", "vendor_id", "brand"}
STATIC_SYSTEM_KEYS = {
    "system_name",
    "system_kernel",
    "system_kernel_version",
    "system_os_version",
    "system_os_long_version",
    "distribution_id",
    "system_host_name",
    "arch",
    "virtualization",
}
TASKD_SYSTEM_EXTRAS = {"ipv4", "ipv6"}
DYNAMIC_KEYS = {"uuid", "time", "cpu", "ram", "load", "system", "disk", "network", "gpu"}
DYNAMIC_CORE_KEYS = {"id", "cpu_usage", "frequency_mhz"}
RAM_KEYS = {"total_memory", "available_memory", "used_memory", "total_swap", "used_swap"}
DISK_KEYS = {
    "kind",
    "name",
    "file_system",
    "mount_point",
    "total_space",
    "available_space",
    "is_removable",
    "is_read_only",
    "read_speed",
    "write_speed",
}
INTERFACE_KEYS = {
    "interface_name",
    "total_received",
    "total_transmitted",
    "receive_speed",
    "transmit_speed",
}
SUMMARY_KEYS = {
    "uuid",
    "time",
    "cpu_usage",
    "gpu_usage",
    "used_swap",
    "total_swap",
    "used_memory",
    "total_memory",
    "available_memory",
    "load_one",
    "load_five",
    "load_fifteen",
    "uptime",
    "boot_time",
    "process_count",
    "total_space",
    "available_space",
    "read_speed",
    "write_speed",
    "tcp_connections",
    "udp_connections",
    "total_received",
    "total_transmitted",
    "transmit_speed",
    "receive_speed",
}


def _busy(seconds: float) -> None:
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        pass


def test_static_report_has_nodeget_fields_and_real_values() -> None:
    """The static report is NodeGet's structure with this host's CPU, OS and hostname."""
    static = Monitor(AGENT_UUID).static()
    assert set(static) == STATIC_KEYS
    assert static["uuid"] == AGENT_UUID
    assert abs(static["time"] - time.time() * 1000) < 60_000
    cpu = static["cpu"]
    assert set(cpu) == STATIC_CPU_KEYS
    assert cpu["logical_cores"] == psutil.cpu_count() > 0
    assert 0 < cpu["physical_cores"] <= cpu["logical_cores"]
    assert [core["id"] for core in cpu["per_core"]] == list(range(1, cpu["logical_cores"] + 1))
    assert all(set(core) == STATIC_CORE_KEYS for core in cpu["per_core"])
    assert cpu["per_core"][0]["brand"]
    system = static["system"]
    assert set(system) == STATIC_SYSTEM_KEYS | TASKD_SYSTEM_EXTRAS
    assert system["system_host_name"] == socket.gethostname()
    assert system["system_kernel"] == os.uname().release
    assert system["arch"] == os.uname().machine
    assert system["system_name"] and system["distribution_id"] and system["virtualization"]
    assert all("." in a for a in system["ipv4"]) and all(":" in a for a in system["ipv6"])
    assert "127.0.0.1" not in system["ipv4"] and "::1" not in system["ipv6"]
    assert static["gpu"] == []  # no GPU library on this host: skipped cleanly


def test_data_hash_is_nodegets_and_stable() -> None:
    """data_hash is 16 bytes of SHA-256 over the parts, the same while the host is the same."""
    monitor = Monitor(AGENT_UUID)
    first, second = monitor.static(), monitor.static()
    assert first["data_hash"] == second["data_hash"]
    assert first["data_hash"] == data_hash(first["cpu"], first["system"], first["gpu"])
    assert len(first["data_hash"]) == 16 and all(0 <= b <= 255 for b in first["data_hash"])
    # key order does not matter (NodeGet sorts keys), content does
    shuffled = dict(reversed(list(first["system"].items())))
    assert data_hash(first["cpu"], shuffled, []) == first["data_hash"]
    assert data_hash(first["cpu"], {**shuffled, "arch": "riscv64"}, []) != first["data_hash"]


def test_dynamic_report_has_nodeget_fields_and_sane_values(tmp_path: Path) -> None:
    """After two samples every percentage is 0-100, totals are positive and rates non-negative."""
    monitor = Monitor(AGENT_UUID)
    _busy(0.2)
    with open(tmp_path / "written", "wb") as handle:  # disk traffic between the samples
        handle.write(os.urandom(4 << 20))
        handle.flush()
        os.fsync(handle.fileno())
    time.sleep(0.3)
    dynamic = monitor.dynamic()
    assert set(dynamic) == DYNAMIC_KEYS
    assert dynamic["uuid"] == AGENT_UUID
    cpu = dynamic["cpu"]
    assert set(cpu) == {"per_core", "total_cpu_usage"}
    assert len(cpu["per_core"]) == psutil.cpu_count()
    for core in cpu["per_core"]:
        assert set(core) == DYNAMIC_CORE_KEYS
        assert 0 <= core["cpu_usage"] <= 100 and core["frequency_mhz"] >= 0
    assert 0 < cpu["total_cpu_usage"] <= 100  # this test itself kept a core busy
    ram = dynamic["ram"]
    assert set(ram) == RAM_KEYS
    assert ram["total_memory"] == psutil.virtual_memory().total > 0
    assert ram["used_memory"] + ram["available_memory"] == ram["total_memory"]
    assert 0 <= ram["used_swap"] <= ram["total_swap"]
    assert set(dynamic["load"]) == {"one", "five", "fifteen"}
    assert all(v >= 0 for v in dynamic["load"].values())
    system = dynamic["system"]
    assert set(system) == {"boot_time", "uptime", "process_count"}
    assert system["boot_time"] == int(psutil.boot_time())
    assert abs(system["boot_time"] + system["uptime"] - time.time()) < 5
    assert system["process_count"] >= 1
    disks = dynamic["disk"]
    assert disks, "no file system found"
    for disk in disks:
        assert set(disk) == DISK_KEYS
        assert disk["kind"] in ("Ssd", "Hdd", "Unknown")
        assert 0 <= disk["available_space"] <= disk["total_space"]
        assert disk["read_speed"] >= 0 and disk["write_speed"] >= 0
        assert disk["file_system"] not in ("proc", "sysfs", "tmpfs", "cgroup2", "squashfs")
    here = max(
        (d for d in disks if str(tmp_path).startswith(d["mount_point"])),
        key=lambda d: len(d["mount_point"]),
    )
    assert here["write_speed"] > 0, here
    network = dynamic["network"]
    assert set(network) == {"interfaces", "udp_connections", "tcp_connections"}
    assert network["tcp_connections"] >= 0 and network["udp_connections"] >= 0
    names = {nic["interface_name"] for nic in network["interfaces"]}
    assert "lo" not in names and names
    for nic in network["interfaces"]:
        assert set(nic) == INTERFACE_KEYS
        assert nic["receive_speed"] >= 0 and nic["transmit_speed"] >= 0
    assert dynamic["gpu"] == []


def test_summary_of_a_real_sample_has_exactly_nodegets_fields() -> None:
    """The summary flattens a real sample: CPU and load times 10, totals over the real disks."""
    monitor = Monitor(AGENT_UUID)
    time.sleep(0.2)
    dynamic = monitor.dynamic()
    summary = summarize(dynamic)
    assert set(summary) == SUMMARY_KEYS
    assert summary["time"] == dynamic["time"] and summary["uuid"] == AGENT_UUID
    assert 0 <= summary["cpu_usage"] <= 1000
    assert summary["cpu_usage"] == int(dynamic["cpu"]["total_cpu_usage"] * 10)
    assert summary["load_one"] == int(dynamic["load"]["one"] * 10)
    assert summary["gpu_usage"] is None
    assert summary["total_memory"] == dynamic["ram"]["total_memory"]
    assert 0 < summary["available_space"] <= summary["total_space"]
    assert all(isinstance(v, int) for k, v in summary.items() if k not in ("uuid", "gpu_usage"))


def _dynamic(disks: list[dict[str, Any]], nics: list[dict[str, Any]], **parts: Any) -> Any:
    return {
        "uuid": AGENT_UUID,
        "time": 1_700_000_000_000,
        "cpu": parts.get("cpu", {"per_core": [], "total_cpu_usage": 12.34}),
        "ram": {
            "total_memory": 8,
            "available_memory": 6,
            "used_memory": 2,
            "total_swap": 4,
            "used_swap": 1,
        },
        "load": parts.get("load", {"one": 1.26, "five": 0.5, "fifteen": 0.0}),
        "system": {"boot_time": 1_699_000_000, "uptime": 1000, "process_count": 99},
        "disk": disks,
        "network": {"interfaces": nics, "udp_connections": 3, "tcp_connections": 7},
        "gpu": parts.get("gpu", []),
    }


def _disk(mount: str, fs: str = "ext4", device: str | None = None, size: int = 100) -> Any:
    return {
        "kind": "Ssd",
        "name": device or f"/dev/{mount.strip('/') or 'root'}",
        "file_system": fs,
        "mount_point": mount,
        "total_space": size,
        "available_space": size // 2,
        "is_removable": False,
        "is_read_only": False,
        "read_speed": 10,
        "write_speed": 20,
    }


def _nic(name: str, speed: int = 5) -> Any:
    return {
        "interface_name": name,
        "total_received": 1000,
        "total_transmitted": 500,
        "receive_speed": speed,
        "transmit_speed": speed * 2,
    }


def test_summary_totals_follow_nodegets_rules() -> None:
    """Container, pseudo and duplicate mounts and virtual interfaces stay out of the totals."""
    disks = [
        _disk("/", device="/dev/sda1", size=1000),
        _disk("/home", device="/dev/sda2", size=500),
        _disk("/srv/bind", device="/dev/sda2", size=500),  # the same file system again
        _disk("/var/lib/docker/overlay2/x", fs="ext4", size=7),
        _disk("/run", fs="tmpfs", size=7),
        _disk("/snap/core", fs="squashfs", size=7),
    ]
    nics = [_nic("eth0", 5), _nic("wlan0", 1), _nic("docker0", 100), _nic("veth12", 100)]
    summary = summarize(_dynamic(disks, nics))
    assert summary["total_space"] == 1500 and summary["available_space"] == 750
    assert summary["read_speed"] == 20 and summary["write_speed"] == 40
    assert summary["receive_speed"] == 6 and summary["transmit_speed"] == 12
    assert summary["total_received"] == 2000 and summary["total_transmitted"] == 1000
    assert summary["cpu_usage"] == 123 and summary["load_one"] == 12
    assert summary["tcp_connections"] == 7 and summary["udp_connections"] == 3
    chosen = summarize(_dynamic(disks, nics), select_disk=["/home"], select_interface=["veth12"])
    assert chosen["total_space"] == 500 and chosen["receive_speed"] == 100


def test_summary_clamps_and_saturates_like_nodeget() -> None:
    """Out-of-range CPU is clamped to 0-1000, NaN becomes null, huge values saturate."""
    gpu = [{"utilization_gpu": 42}]
    hot = summarize(_dynamic([], [], cpu={"per_core": [], "total_cpu_usage": 250.0}, gpu=gpu))
    assert hot["cpu_usage"] == 1000 and hot["gpu_usage"] == 42
    nan = summarize(_dynamic([], [], cpu={"per_core": [], "total_cpu_usage": math.nan}))
    assert nan["cpu_usage"] is None
    huge = summarize(_dynamic([], [], load={"one": 1e9, "five": -1.0, "fifteen": math.inf}))
    assert huge["load_one"] == 32767 and huge["load_five"] == 0 and huge["load_fifteen"] is None
    big = summarize(_dynamic([_disk("/", size=1 << 70)], []))
    assert big["total_space"] == (1 << 63) - 1


def test_connection_counts_follow_real_sockets() -> None:
    """Opening loopback TCP connections and UDP sockets raises the counts accordingly."""
    tcp_before, udp_before = connection_counts()
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=300))
        port = listener.getsockname()[1]
        for _ in range(200):
            stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            stack.enter_context(listener.accept()[0])
        for _ in range(20):
            udp = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            udp.bind(("127.0.0.1", 0))
        tcp_during, udp_during = connection_counts()
    # 400 established ends; other processes on this machine come and go meanwhile
    assert tcp_during - tcp_before >= 300
    assert udp_during - udp_before >= 15
