"""What the host is and how it is doing, sampled with psutil in NodeGet's report shapes.

``Monitor.static()`` is a ``StaticMonitoringData`` (CPU, system, GPU; ``data_hash``
is NodeGet's: SHA-256 over the canonical JSON of the three parts, first 16 bytes),
``Monitor.dynamic()`` a ``DynamicMonitoringData`` and ``summarize(dynamic)`` the
flat ``DynamicMonitoringSummaryData`` (CPU usage and loads times 10 as integers).
Times are milliseconds, ``boot_time`` seconds, sizes bytes and speeds bytes per
second, computed from the counter deltas between two samples (the first sample
is taken when the Monitor is made).

Where psutil has no answer the kernel's own files are read: the CPU's model and
vendor (``/proc/cpuinfo``), disk kind and removability (``/sys/dev/block``), and
the connection counts. ``psutil.net_connections`` maps every socket to its
process by walking ``/proc/*/fd`` (about 17 ms of CPU per sample with 500
sockets; counting lines of ``/proc/net/tcp`` still takes 7 ms): TCP is the
kernel's ``CurrEstab`` counter from ``/proc/net/snmp`` (ESTABLISHED and
CLOSE-WAIT, IPv4 and IPv6) and UDP the open UDP sockets of
``/proc/net/sockstat{,6}``, both well under 0.1 ms.

Every method blocks (it reads /proc and /sys and stats file systems): call them
off the event loop, from one thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import ipaddress
import math
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import psutil

I16_MAX = (1 << 15) - 1
I32_MAX = (1 << 31) - 1
I64_MAX = (1 << 63) - 1

SKIPPED_FILE_SYSTEMS = frozenset({"squashfs", "iso9660", "udf"})
"""Read-only images (snap packages, CDs) that are always full: not disks worth reporting."""

SUMMARY_EXCLUDED_FILE_SYSTEMS = frozenset(
    {
        "autofs",
        "bpf",
        "cgroup",
        "cgroup2",
        "debugfs",
        "devtmpfs",
        "fusectl",
        "nsfs",
        "overlay",
        "proc",
        "pstore",
        "securityfs",
        "squashfs",
        "sysfs",
        "tmpfs",
        "tracefs",
    }
)
SUMMARY_EXCLUDED_MOUNTS = (
    "/tmp",
    "/var/tmp",
    "/dev",
    "/run",
    "/var/lib/containerd",
    "/var/lib/containers",
    "/var/lib/docker",
    "/var/lib/kubelet",
    "/var/lib/rancher/k3s/agent",
    "/proc",
    "/sys",
    "/etc/resolv.conf",
    "/etc/hostname",
    "/etc/hosts",
    "/nix/store",
)
SUMMARY_EXCLUDED_INTERFACES = (
    "br",
    "cni",
    "docker",
    "podman",
    "flannel",
    "lo",
    "veth",
    "virbr",
    "vmbr",
    "tap",
    "fwbr",
    "fwpr",
)
"""NodeGet's summary rules: the totals count real disks and interfaces, not containers' ones."""

VIRTUALIZATION_NAMES = {
    "none": "Physical",
    "kvm": "KVM",
    "qemu": "QEMU",
    "vmware": "VMware",
    "microsoft": "Hyper-V",
    "oracle": "VirtualBox",
    "xen": "Xen",
    "bochs": "Bochs",
    "parallels": "Parallels",
    "bhyve": "bhyve",
    "amazon": "Amazon EC2",
    "google": "Google Compute Engine",
    "docker": "Docker",
    "podman": "Podman",
    "lxc": "LXC",
    "lxc-libvirt": "LXC",
    "openvz": "OpenVZ",
    "systemd-nspawn": "systemd-nspawn",
    "wsl": "WSL",
    "rkt": "rkt",
}
"""systemd-detect-virt's identifiers → the names NodeGet reports."""

DMI_VENDORS = (
    ("KVM", "KVM"),
    ("QEMU", "QEMU"),
    ("VMware", "VMware"),
    ("VirtualBox", "VirtualBox"),
    ("Microsoft Corporation", "Hyper-V"),
    ("Xen", "Xen"),
    ("Amazon EC2", "Amazon EC2"),
    ("Google", "Google Compute Engine"),
    ("Parallels", "Parallels"),
)

NVML_ARCHITECTURES = {
    2: "Kepler",
    3: "Maxwell",
    4: "Pascal",
    5: "Volta",
    6: "Turing",
    7: "Ampere",
    8: "Ada",
    9: "Hopper",
    10: "Blackwell",
}


class BlockDevice(NamedTuple):
    """What /sys says about the device under a mount point."""

    io_key: str
    kind: str
    removable: bool


def data_hash(cpu: Any, system: Any, gpu: Any) -> list[int]:
    """NodeGet's static-data hash: SHA-256 of the canonical JSON of the parts, first 16 bytes."""
    digest = hashlib.sha256()
    for index, part in enumerate((cpu, system, gpu)):
        if index:
            digest.update(b"\n")
        digest.update(orjson.dumps(part, option=orjson.OPT_SORT_KEYS))
    return list(digest.digest()[:16])


def _saturate(value: float, high: int) -> int:
    return max(0, min(int(value), high))


def _scaled(value: float, high: int) -> int | None:
    """Ten times a value as an integer for the summary; None for NaN or infinity."""
    if not math.isfinite(value):
        return None
    return max(0, min(int(value * 10), high))


def summarize(
    dynamic: Mapping[str, Any],
    select_disk: Iterable[str] = (),
    select_interface: Iterable[str] = (),
) -> dict[str, Any]:
    """The flat DynamicMonitoringSummaryData of a dynamic report (NodeGet's rules).

    Disks and interfaces are summed over ``select_disk`` mount points and
    ``select_interface`` names when given, otherwise over all but containers',
    pseudo file systems and virtual interfaces; a file system mounted at several
    places counts once.
    """
    wanted_disks, wanted_interfaces = set(select_disk), set(select_interface)
    disks, devices = [], set()
    for disk in dynamic["disk"]:
        if wanted_disks:
            chosen = disk["mount_point"] in wanted_disks
        else:
            chosen = not _excluded_mount(disk["mount_point"]) and (
                disk["file_system"].lower() not in SUMMARY_EXCLUDED_FILE_SYSTEMS
            )
        if chosen and disk["name"] not in devices:
            devices.add(disk["name"])
            disks.append(disk)
    interfaces = [
        nic
        for nic in dynamic["network"]["interfaces"]
        if (
            nic["interface_name"] in wanted_interfaces
            if wanted_interfaces
            else not nic["interface_name"].startswith(SUMMARY_EXCLUDED_INTERFACES)
        )
    ]
    ram, load, system, network = (
        dynamic["ram"],
        dynamic["load"],
        dynamic["system"],
        dynamic["network"],
    )
    gpus = dynamic["gpu"]
    return {
        "uuid": dynamic["uuid"],
        "time": dynamic["time"],
        "cpu_usage": _scaled(dynamic["cpu"]["total_cpu_usage"], 1000),
        "gpu_usage": gpus[0]["utilization_gpu"] if gpus else None,
        "used_swap": _saturate(ram["used_swap"], I64_MAX),
        "total_swap": _saturate(ram["total_swap"], I64_MAX),
        "used_memory": _saturate(ram["used_memory"], I64_MAX),
        "total_memory": _saturate(ram["total_memory"], I64_MAX),
        "available_memory": _saturate(ram["available_memory"], I64_MAX),
        "load_one": _scaled(load["one"], I16_MAX),
        "load_five": _scaled(load["five"], I16_MAX),
        "load_fifteen": _scaled(load["fifteen"], I16_MAX),
        "uptime": _saturate(system["uptime"], I32_MAX),
        "boot_time": _saturate(system["boot_time"], I64_MAX),
        "process_count": _saturate(system["process_count"], I32_MAX),
        "total_space": _saturate(sum(d["total_space"] for d in disks), I64_MAX),
        "available_space": _saturate(sum(d["available_space"] for d in disks), I64_MAX),
        "read_speed": _saturate(sum(d["read_speed"] for d in disks), I64_MAX),
        "write_speed": _saturate(sum(d["write_speed"] for d in disks), I64_MAX),
        "tcp_connections": _saturate(network["tcp_connections"], I32_MAX),
        "udp_connections": _saturate(network["udp_connections"], I32_MAX),
        "total_received": _saturate(sum(n["total_received"] for n in interfaces), I64_MAX),
        "total_transmitted": _saturate(sum(n["total_transmitted"] for n in interfaces), I64_MAX),
        "transmit_speed": _saturate(sum(n["transmit_speed"] for n in interfaces), I64_MAX),
        "receive_speed": _saturate(sum(n["receive_speed"] for n in interfaces), I64_MAX),
    }


def _excluded_mount(mount_point: str) -> bool:
    return any(
        mount_point == prefix or mount_point.startswith(prefix + "/")
        for prefix in SUMMARY_EXCLUDED_MOUNTS
    )


def _busy(times: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds of a psutil cpu_times sample, as psutil's cpu_percent counts."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


def _usage(before: Any, after: Any) -> float:
    """Percent busy between two cpu_times samples, 0-100."""
    busy_before, total_before = _busy(before)
    busy_after, total_after = _busy(after)
    elapsed = total_after - total_before
    if elapsed <= 0:
        return 0.0
    return round(max(0.0, min(100.0, 100.0 * (busy_after - busy_before) / elapsed)), 2)


def _rate(before: int | None, after: int, seconds: float) -> int:
    """Bytes per second between two counter values; 0 across a reset or for a new counter."""
    if before is None or after < before:
        return 0
    return int((after - before) / seconds)


def _read(path: str) -> str:
    """A small kernel file's text, or "" when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def connection_counts() -> tuple[int, int]:
    """(TCP, UDP) connections: established TCP connections and open UDP sockets."""
    snmp = _read("/proc/net/snmp")
    if snmp:
        tcp = udp = 0
        rows = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
        if len(rows) == 2 and "CurrEstab" in rows[0]:
            tcp = int(rows[1][rows[0].index("CurrEstab")])
        for path, label in (("/proc/net/sockstat", "UDP:"), ("/proc/net/sockstat6", "UDP6:")):
            for line in _read(path).splitlines():
                fields = line.split()
                if fields[:2] == [label, "inuse"]:
                    udp += int(fields[2])
        return tcp, udp
    try:  # not Linux: psutil's answer, where the platform lets an unprivileged process see it
        sockets = psutil.net_connections("inet")
    except (psutil.Error, OSError):
        return 0, 0
    tcp = sum(1 for s in sockets if s.type == socket.SOCK_STREAM and s.status == "ESTABLISHED")
    return tcp, sum(1 for s in sockets if s.type == socket.SOCK_DGRAM)


def _os_release() -> dict[str, str]:
    with contextlib.suppress(OSError):
        return platform.freedesktop_os_release()
    return {}


def _os_version(release: Mapping[str, str]) -> str:
    """The distribution's version, as precise as the system tells (Debian's 12.5, not 12)."""
    distribution = release.get("ID", "")
    exact = {"debian": "/etc/debian_version", "alpine": "/etc/alpine-release"}.get(distribution)
    if exact and (precise := _read(exact).strip()) and precise[0].isdigit():
        return precise
    if distribution in ("rhel", "centos", "rocky", "almalinux"):
        text = _read("/etc/redhat-release")
        if "release " in text:
            after = text.split("release ", 1)[1]
            precise = "".join(c for c in after.split(" ", 1)[0] if c.isdigit() or c == ".")
            if precise:
                return precise
    if release:
        return release.get("VERSION_ID", "")
    return platform.mac_ver()[0] or platform.release()


def _cpu_identity() -> tuple[str, str]:
    """(vendor id, model name) of the CPU."""
    vendor = brand = ""
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "vendor_id" and not vendor:
            vendor = value
        elif key in ("model name", "Model", "Processor", "cpu model") and not brand:
            brand = value
    return vendor, brand or platform.processor()


def _virtualization() -> str:
    """The hypervisor or container the host runs in, "Physical" on bare metal."""
    if detect := shutil.which("systemd-detect-virt"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [detect], capture_output=True, text=True, timeout=5, check=False
            ).stdout.strip()
            if found:
                return VIRTUALIZATION_NAMES.get(found, found)
    if os.path.exists("/.dockerenv"):
        return "Docker"
    if os.path.exists("/run/.containerenv"):
        return "Podman"
    dmi = _read("/sys/class/dmi/id/sys_vendor") + _read("/sys/class/dmi/id/product_name")
    for needle, name in DMI_VENDORS:
        if needle in dmi:
            return name
    if platform.system() != "Linux":
        return "Unknown"
    return "Unknown hypervisor" if " hypervisor" in _read("/proc/cpuinfo") else "Physical"


def _addresses() -> tuple[list[str], list[str]]:
    """The host's global IPv4 and IPv6 interface addresses (no loopback or link-local)."""
    v4: list[str] = []
    v6: list[str] = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            with contextlib.suppress(ValueError):
                ip = ipaddress.ip_address(address.address.split("%", 1)[0])
                if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                    continue
                found = v4 if ip.version == 4 else v6
                if str(ip) not in found:
                    found.append(str(ip))
    return v4, v6


class _Gpus:
    """NVIDIA GPUs through NVML, when the ``pynvml`` module and a driver are there; else none."""

    def __init__(self) -> None:
        self.nvml: Any = None
        with contextlib.suppress(Exception):  # no module, no driver, no device: no GPUs
            nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
            self.nvml = nvml

    def _call(self, name: str, *args: Any, default: Any = 0) -> Any:
        """One NVML query; ``default`` when the driver does not answer it for this GPU."""
        try:
            return getattr(self.nvml, name)(*args)
        except Exception:
            return default

    def _handles(self) -> list[Any]:
        if self.nvml is None:
            return []
        count = self._call("nvmlDeviceGetCount")
        return [self._call("nvmlDeviceGetHandleByIndex", i, default=None) for i in range(count)]

    def static(self) -> list[dict[str, Any]]:
        """StaticGpuData of every GPU."""
        found = []
        for index, handle in enumerate(self._handles(), 1):
            name = self._call("nvmlDeviceGetName", handle, default="")
            architecture = self._call("nvmlDeviceGetArchitecture", handle, default=-1)
            found.append(
                {
                    "id": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "cuda_cores": int(self._call("nvmlDeviceGetNumGpuCores", handle)),
                    "architecture": NVML_ARCHITECTURES.get(architecture, "Unknown"),
                }
            )
        return found

    def dynamic(self) -> list[dict[str, Any]]:
        """DynamicGpuData of every GPU."""
        found = []
        for index, handle in enumerate(self._handles(), 1):
            memory = self._call("nvmlDeviceGetMemoryInfo", handle, default=None)
            rates = self._call("nvmlDeviceGetUtilizationRates", handle, default=None)
            clocks = {
                field: int(self._call("nvmlDeviceGetClockInfo", handle, getattr(self.nvml, kind)))
                for field, kind in (
                    ("graphics_clock_mhz", "NVML_CLOCK_GRAPHICS"),
                    ("sm_clock_mhz", "NVML_CLOCK_SM"),
                    ("memory_clock_mhz", "NVML_CLOCK_MEM"),
                    ("video_clock_mhz", "NVML_CLOCK_VIDEO"),
                )
            }
            sensor = getattr(self.nvml, "NVML_TEMPERATURE_GPU", 0)
            found.append(
                {
                    "id": index,
                    "used_memory": int(memory.used) if memory else 0,
                    "total_memory": int(memory.total) if memory else 0,
                    **clocks,
                    "utilization_gpu": _saturate(rates.gpu, 100) if rates else 0,
                    "utilization_memory": _saturate(rates.memory, 100) if rates else 0,
                    "temperature": _saturate(
                        self._call("nvmlDeviceGetTemperature", handle, sensor), 255
                    ),
                }
            )
        return found


class Monitor:
    """Samples one host for one agent identity; keeps the counters that rates are made from."""

    def __init__(
        self,
        agent_uuid: str,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent_uuid = agent_uuid
        self._clock = clock
        self._monotonic = monotonic
        self._gpus = _Gpus()
        self._virtualization: str | None = None
        self._devices: dict[tuple[str, str], BlockDevice] = {}
        self._cores = psutil.cpu_times(percpu=True)
        self._cpu = psutil.cpu_times()
        self._disk_io = self._disk_counters()
        self._net_io = self._net_counters()
        self._sampled = monotonic()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # ------------------------------------------------------------------ static

    def static(self) -> dict[str, Any]:
        """StaticMonitoringData: CPU model and cores, system, GPUs, and the hash of the three."""
        vendor, brand = _cpu_identity()
        logical = psutil.cpu_count() or 0
        cpu = {
            "physical_cores": psutil.cpu_count(logical=False) or 0,
            "logical_cores": logical,
            "per_core": [
                {"id": i + 1, "name": f"cpu{i}", "vendor_id": vendor, "brand": brand}
                for i in range(logical)
            ],
        }
        if self._virtualization is None:
            self._virtualization = _virtualization()
        release = _os_release()
        uname = platform.uname()
        v4, v6 = _addresses()
        system = {
            "system_name": release.get("NAME", uname.system),
            "system_kernel": uname.release,
            "system_kernel_version": uname.version,
            "system_os_version": _os_version(release),
            "system_os_long_version": release.get("PRETTY_NAME", f"{uname.system} {uname.release}"),
            "distribution_id": release.get("ID", uname.system.lower()),
            "system_host_name": socket.gethostname(),
            "arch": uname.machine,
            "virtualization": self._virtualization,
            "ipv4": v4,
            "ipv6": v6,
        }
        gpu = self._gpus.static()
        return {
            "uuid": self.agent_uuid,
            "time": self._now_ms(),
            "data_hash": data_hash(cpu, system, gpu),
            "cpu": cpu,
            "system": system,
            "gpu": gpu,
        }

    # ------------------------------------------------------------------ dynamic

    def dynamic(self) -> dict[str, Any]:
        """DynamicMonitoringData: usage and rates since the previous sample."""
        now = self._monotonic()
        seconds = max(now - self._sampled, 0.01)
        self._sampled = now
        cores, cpu = psutil.cpu_times(percpu=True), psutil.cpu_times()
        try:
            frequencies = [int(f.current) for f in psutil.cpu_freq(percpu=True)]
        except (NotImplementedError, OSError, AttributeError):
            frequencies = []
        per_core = [
            {
                "id": i + 1,
                "cpu_usage": _usage(before, after),
                "frequency_mhz": frequencies[i] if i < len(frequencies) else 0,
            }
            for i, (before, after) in enumerate(zip(self._cores, cores, strict=False))
        ]
        total_cpu = _usage(self._cpu, cpu)
        self._cores, self._cpu = cores, cpu
        memory, swap = psutil.virtual_memory(), psutil.swap_memory()
        one, five, fifteen = psutil.getloadavg()
        boot = int(psutil.boot_time())
        tcp, udp = connection_counts()
        return {
            "uuid": self.agent_uuid,
            "time": self._now_ms(),
            "cpu": {"per_core": per_core, "total_cpu_usage": total_cpu},
            "ram": {
                "total_memory": memory.total,
                "available_memory": memory.available,
                # as NodeGet (and Komari) count it: what is not available is used
                "used_memory": memory.total - memory.available,
                "total_swap": swap.total,
                "used_swap": swap.used,
            },
            "load": {"one": round(one, 2), "five": round(five, 2), "fifteen": round(fifteen, 2)},
            "system": {
                "boot_time": boot,
                "uptime": max(0, int(self._clock()) - boot),
                "process_count": len(psutil.pids()),
            },
            "disk": self._disks(seconds),
            "network": {
                "interfaces": self._interfaces(seconds),
                "udp_connections": udp,
                "tcp_connections": tcp,
            },
            "gpu": self._gpus.dynamic(),
        }

    def _disk_counters(self) -> dict[str, tuple[int, int]]:
        try:
            counters = psutil.disk_io_counters(perdisk=True) or {}
        except (OSError, RuntimeError):
            return {}
        return {name: (c.read_bytes, c.write_bytes) for name, c in counters.items()}

    def _net_counters(self) -> dict[str, tuple[int, int]]:
        try:
            stats = psutil.net_if_stats()
            counters = psutil.net_io_counters(pernic=True)
        except OSError:
            return {}
        return {
            name: (c.bytes_recv, c.bytes_sent)
            for name, c in counters.items()
            if "loopback" not in getattr(stats.get(name), "flags", "") and name != "lo"
        }

    def _device(self, device: str, mount_point: str) -> BlockDevice:
        """The block device under a mount point, found once through /sys/dev/block."""
        key = (device, mount_point)
        found = self._devices.get(key)
        if found is None:
            found = BlockDevice(os.path.basename(os.path.realpath(device)), "Unknown", False)
            with contextlib.suppress(OSError):
                st_dev = os.stat(mount_point).st_dev
                sys_path = Path(
                    os.path.realpath(f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}")
                )
                if sys_path.exists():
                    whole = sys_path.parent if (sys_path / "partition").exists() else sys_path
                    rotational = _read(str(whole / "queue" / "rotational")).strip()
                    found = BlockDevice(
                        sys_path.name,
                        {"0": "Ssd", "1": "Hdd"}.get(rotational, "Unknown"),
                        _read(str(whole / "removable")).strip() == "1",
                    )
            self._devices[key] = found
        return found

    def _disks(self, seconds: float) -> list[dict[str, Any]]:
        counters = self._disk_counters()
        before, self._disk_io = self._disk_io, counters
        disks = []
        for partition in psutil.disk_partitions(all=False):
            if partition.fstype.lower() in SKIPPED_FILE_SYSTEMS:
                continue
            try:
                usage = psutil.disk_usage(partition.mountpoint)
            except OSError:  # unmounted meanwhile, or not ours to stat
                continue
            device = self._device(partition.device, partition.mountpoint)
            read_now, write_now = counters.get(device.io_key, (0, 0))
            read_before, write_before = before.get(device.io_key, (None, None))
            disks.append(
                {
                    "kind": device.kind,
                    "name": partition.device,
                    "file_system": partition.fstype,
                    "mount_point": partition.mountpoint,
                    "total_space": usage.total,
                    "available_space": usage.free,
                    "is_removable": device.removable,
                    "is_read_only": "ro" in partition.opts.split(","),
                    "read_speed": _rate(read_before, read_now, seconds),
                    "write_speed": _rate(write_before, write_now, seconds),
                }
            )
        return disks

    def _interfaces(self, seconds: float) -> list[dict[str, Any]]:
        counters = self._net_counters()
        before, self._net_io = self._net_io, counters
        interfaces = []
        for name, (received, sent) in counters.items():
            received_before, sent_before = before.get(name, (None, None))
            interfaces.append(
                {
                    "interface_name": name,
                    "total_received": received,
                    "total_transmitted": sent,
                    "receive_speed": _rate(received_before, received, seconds),
                    "transmit_speed": _rate(sent_before, sent, seconds),
                }
            )
        return interfaces
