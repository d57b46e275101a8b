"""A real slow network on this machine for tests and benchmarks: N network namespaces
`lmf-<pid>-<i>`, each with one veth end `eth0` (10.77.0.<i+1>/24) whose peer sits on a bridge in a
hub namespace `lmf-<pid>-hub`; every `eth0` sends through `netem delay` then `tbf rate`, so a
round trip costs 2 x delay and each rank's uplink carries at most `rate`. Kernels built without
netem (e.g. 6.18.44-fc, measured 2026-12-03) get the rate limit only, and `delayed` says so. Nothing is added to the
machine's own namespace: servers inside bind to the 10.77 addresses or their own 127.0.0.1.

Everything is removed on leaving the context, also on an error. Where namespaces cannot be made
(no root / CAP_NET_ADMIN, no iproute2) the context yields loopback addresses with `slowed` False
and a `message` saying the network is NOT slowed; callers print it (or skip).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

SUBNET = "10.77.0"
IFACE = "eth0"  # the veth end inside each rank's namespace (GLOO_SOCKET_IFNAME)


@dataclass
class SlowNetwork:
    """What the context yields: one address per rank and how to run a command at that address."""

    addresses: list[str]
    namespaces: list[str] = field(default_factory=list)  # empty when not slowed
    slowed: bool = False  # rate-limited namespaces (False: plain loopback)
    delayed: bool = False  # the one-way delay applied as well (needs netem in the kernel)
    message: str = ""
    interface: str = "lo"

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """`argv` run inside rank i's namespace (`ip netns exec`), or unchanged on loopback."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv] if self.slowed else list(argv)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _tc(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True, capture_output=True, text=True)


def _shape(ns: str, rate: str, delay: str) -> bool:
    """tbf holds `eth0`'s rate; under it netem delays every packet leaving, where the kernel has
    netem (CONFIG_NET_SCH_NETEM: some kernels lack it). Returns whether the delay is applied.
    The token bucket is 256 KiB: veth hands over 64 KiB GSO packets, and a bucket smaller than
    a packet drops it."""
    tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "200ms"]
    try:
        _tc(ns, "qdisc", "add", "dev", IFACE, "root", "handle", "1:", "netem", "delay", delay, "limit", "100000")
    except subprocess.CalledProcessError:
        _tc(ns, "qdisc", "add", "dev", IFACE, "root", "handle", "10:", *tbf)
        return False
    _tc(ns, "qdisc", "add", "dev", IFACE, "parent", "1:1", "handle", "10:", *tbf)
    return True


def namespace_names(n: int, pid: int | None = None) -> tuple[list[str], str]:
    """The rank namespaces and the hub namespace of this process's network."""
    tag = f"lmf-{pid or os.getpid()}"
    return [f"{tag}-{i}" for i in range(n)], f"{tag}-hub"


@contextmanager
def slow_network(n: int, rate: str = "1gbit", delay: str = "1ms") -> Iterator[SlowNetwork]:
    """N namespaces joined by a bridge, each uplink limited to `rate` with `delay` one way (tc
    units: "100mbit", "1gbit", "1ms"). Yields a SlowNetwork; removes everything on exit."""
    names, hub = namespace_names(n)
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", hub)
        except (OSError, subprocess.CalledProcessError) as e:
            reason = getattr(e, "stderr", None) or str(e)
            yield SlowNetwork(addresses=["127.0.0.1"] * n, message=(
                f"network NOT slowed: cannot make network namespaces ({reason.strip()}); ranks talk over "
                "loopback at full speed"))
            return
        made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", f"v{i}", "netns", hub)
            _ip("-n", hub, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            delayed = _shape(ns, rate, delay)
        how = f"{delay} one way" if delayed else f"delay NOT applied (no netem qdisc in kernel {os.uname().release})"
        yield SlowNetwork(addresses=[f"{SUBNET}.{i + 1}" for i in range(n)], namespaces=names, slowed=True,
                          delayed=delayed, message=f"network slowed: {n} namespaces, each uplink {rate}, {how}",
                          interface=IFACE)
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its veth ends and the bridge
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def existing_namespaces() -> list[str]:
    """Names `ip netns list` shows (to check that nothing is left behind)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
