"""A cluster file: the accelerator, how many per node, and the links between them, as the planner's
time and memory models read them. TOML in, a frozen `Cluster` out; every bad value is one
`ClusterError` line naming the file and key (the CLI exits 2 on it).

Units in the file are the ones datasheets use (TFLOP/s, GiB, GB/s, microseconds, watts); the
dataclasses hold SI units (FLOP/s, bytes, bytes/s, seconds) so the models never convert.

    name = "h100-sxm-node"
    devices_per_node = 8
    nodes = 1                      # how many nodes `lmforge plan` may use (world = nodes x devices_per_node)
    [accelerator]
    name = "H100 SXM"
    peak_bf16_tflops = 989.4       # dense matmul peaks per device
    peak_fp8_tflops = 1978.9       # 0: no fp8
    peak_fp32_tflops = 66.9        # matmul without tensor cores (CPU presets: the measured fp32 peak)
    memory_gib = 80                # per device (CPU: the host memory one rank may use)
    hbm_gbps = 3350                # memory bandwidth per device
    power_w = 700
    [intra_node]                   # per device, one direction (NVLink, or the host's shared memory)
    bandwidth_gbps = 450
    latency_us = 3
    call_overhead_us = 0           # fixed cost per collective call beyond the link (launch, rank skew)
    [inter_node]                   # per device (its NIC share), one direction
    bandwidth_gbps = 50
    latency_us = 10
    [efficiency]                   # achieved / peak FLOP/s of a matmul doing W FLOPs:
    max = 0.6                      #   max * W / (W + half_gflop * 1e9)
    half_gflop = 2.0
    op_overhead_us = 10            # fixed time per operator launch (kernel launch / Python dispatch)
    comm_overlap = 1.0             # fraction of FSDP / DP / EP communication that can hide behind
                                   # compute (GPUs: separate engines; CPU: 0, the cores do both)
    [failures]                     # optional (`lmforge plan --scaling / --cost`); defaults shown
    device_mtbf_h = 50700          # mean hours between job-stopping failures of one device (the Llama 3
                                   # paper's 419 interruptions of 16,384 GPUs in 54 days, all charged to GPUs)
    node_mtbf_h = 0                # of one host apart from its devices; 0: not counted separately
    restart_s = 600                # detection + rescheduling + start, before the checkpoint is read
    storage_gbps = 100             # checkpoint write and read bandwidth of the whole job (GB/s)
    [price]                        # optional; needed by `lmforge plan --cost`; per device-hour
    on_demand_per_device_h = 4.0
    reserved_per_device_h = 2.5    # optional
    spot_per_device_h = 1.6        # optional
    spot_preemptions_per_node_h = 0.005  # how often one spot machine is reclaimed
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.plan.cost import Pricing

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ClusterError(ValueError):
    """A cluster file that cannot be used: one line naming the file, the key and what is allowed."""


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_bf16_flops: float
    peak_fp8_flops: float  # 0.0: no fp8 tensor cores
    peak_fp32_flops: float
    memory_bytes: int
    hbm_bytes_per_s: float
    power_w: float

    def peak_flops(self, precision: str) -> float:
        """Dense matmul peak for a training precision ("fp32", "bf16", "fp16", "fp8")."""
        if precision == "fp8" and self.peak_fp8_flops > 0:
            return self.peak_fp8_flops
        return self.peak_fp32_flops if precision == "fp32" else self.peak_bf16_flops


@dataclass(frozen=True)
class Link:
    bytes_per_s: float  # per device, one direction
    latency_s: float
    call_overhead_s: float = 0.0  # once per collective call (dispatch, waiting for the slowest rank)

    def time(self, nbytes: float) -> float:
        """One point-to-point message of `nbytes`."""
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Efficiency:
    """Fraction of peak a matmul of W FLOPs reaches: max * W / (W + half), a saturating curve
    (small matmuls are bound by memory and launch; large ones approach `max`)."""

    max: float
    half_flops: float
    op_overhead_s: float
    comm_overlap: float = 1.0

    def of(self, flops: float) -> float:
        return self.max * flops / (flops + self.half_flops) if flops > 0 else self.max


@dataclass(frozen=True)
class FleetFailures:
    """The `[failures]` table: what interrupts a job on this cluster and what a restart costs
    (failures.FailureModel per world size; checkpoint write / read = state bytes / storage)."""

    device_mtbf_h: float = 50_700.0  # Llama 3 paper, 3.3.4: 16,384 GPUs x 54 days / 419 interruptions
    node_mtbf_h: float = math.inf
    restart_s: float = 600.0
    storage_bytes_per_s: float = 100e9


@dataclass(frozen=True)
class Cluster:
    name: str
    accelerator: Accelerator
    devices_per_node: int
    nodes: int
    intra: Link
    inter: Link
    efficiency: Efficiency
    # CPU clusters: the devices of a node are processes sharing one host memory; `memory_bytes`
    # is then what one rank may use (the file says so with shared_host_memory = true).
    shared_host_memory: bool = False
    failures: FleetFailures = field(default_factory=FleetFailures)
    price: Pricing | None = None  # the `[price]` table; None: the file has none

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def link(self, group_size: int, stride: int) -> Link:
        """The slowest link a group of `group_size` ranks, `stride` apart in rank order, crosses:
        intra-node while it fits one node (ranks are numbered node by node)."""
        return self.intra if group_size * stride <= self.devices_per_node or group_size == 1 else self.inter


def _get(table: dict[str, Any], key: str, where: str, kind: type, *, default: Any = None, positive: bool = True,
         allow_zero: bool = False) -> Any:
    if key not in table:
        if default is not None:
            return default
        raise ClusterError(f"{where}.{key}: missing (see lmforge/plan/cluster.py for the format)")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ClusterError(f"{where}.{key} = {value!r}: must be a {kind.__name__}")
    if kind in (int, float):
        ok = value == value and value != float("inf") and (value > 0 or (allow_zero and value == 0))
        if positive and not ok:
            raise ClusterError(f"{where}.{key} = {value!r}: must be a finite number > 0"
                               + (" (or 0)" if allow_zero else ""))
    return value


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ClusterError(f"{where}: missing table [{key}] (see lmforge/plan/cluster.py for the format)")
    return value


_KNOWN = {"": {"name", "devices_per_node", "nodes", "accelerator", "intra_node", "inter_node", "efficiency",
               "shared_host_memory", "description", "failures", "price"},
          "failures": {"device_mtbf_h", "node_mtbf_h", "restart_s", "storage_gbps"},
          "price": {"on_demand_per_device_h", "reserved_per_device_h", "spot_per_device_h",
                    "spot_preemptions_per_node_h"},
          "accelerator": {"name", "peak_bf16_tflops", "peak_fp8_tflops", "peak_fp32_tflops", "memory_gib", "hbm_gbps",
                          "power_w"},
          "intra_node": {"bandwidth_gbps", "latency_us", "call_overhead_us"},
          "inter_node": {"bandwidth_gbps", "latency_us", "call_overhead_us"},
          "efficiency": {"max", "half_gflop", "op_overhead_us", "comm_overlap"}}


def cluster_from_dict(data: dict[str, Any], where: str = "cluster") -> Cluster:
    """Validate a parsed cluster file; unknown keys are refused (a typo would silently use a default)."""
    for section, known in _KNOWN.items():
        table = data if not section else data.get(section, {})
        if not isinstance(table, dict):
            raise ClusterError(f"{where}: [{section}] must be a table")
        for key in table:
            if key not in known:
                raise ClusterError(f"{where}: unknown key {(section + '.' if section else '') + key!r}; "
                                   f"known: {', '.join(sorted(known))}")
    acc_t, intra_t, inter_t = (_table(data, k, where) for k in ("accelerator", "intra_node", "inter_node"))
    eff_t = data.get("efficiency", {})
    a, e = f"{where}: accelerator", f"{where}: efficiency"
    acc = Accelerator(
        name=_get(acc_t, "name", a, str, positive=False),
        peak_bf16_flops=_get(acc_t, "peak_bf16_tflops", a, float) * 1e12,
        peak_fp8_flops=_get(acc_t, "peak_fp8_tflops", a, float, default=0.0, allow_zero=True) * 1e12,
        peak_fp32_flops=_get(acc_t, "peak_fp32_tflops", a, float) * 1e12,
        memory_bytes=int(_get(acc_t, "memory_gib", a, float) * 2**30),
        hbm_bytes_per_s=_get(acc_t, "hbm_gbps", a, float) * 1e9,
        power_w=_get(acc_t, "power_w", a, float))

    def link(t: dict[str, Any], name: str) -> Link:
        return Link(_get(t, "bandwidth_gbps", f"{where}: {name}", float) * 1e9,
                    _get(t, "latency_us", f"{where}: {name}", float, allow_zero=True) * 1e-6,
                    _get(t, "call_overhead_us", f"{where}: {name}", float, default=0.0, allow_zero=True) * 1e-6)

    eff = Efficiency(max=_get(eff_t, "max", e, float, default=0.5),
                     half_flops=_get(eff_t, "half_gflop", e, float, default=1.0, allow_zero=True) * 1e9,
                     op_overhead_s=_get(eff_t, "op_overhead_us", e, float, default=5.0, allow_zero=True) * 1e-6,
                     comm_overlap=_get(eff_t, "comm_overlap", e, float, default=1.0, allow_zero=True))
    for key, value in (("max", eff.max), ("comm_overlap", eff.comm_overlap)):
        if value > 1:
            raise ClusterError(f"{e}.{key} = {value}: must be in [0, 1] (a fraction)")
    fail_t, f = data.get("failures", {}), f"{where}: failures"
    node_mtbf = _get(fail_t, "node_mtbf_h", f, float, default=0.0, allow_zero=True)
    failures = FleetFailures(device_mtbf_h=_get(fail_t, "device_mtbf_h", f, float, default=50_700.0),
                             node_mtbf_h=node_mtbf or math.inf,
                             restart_s=_get(fail_t, "restart_s", f, float, default=600.0, allow_zero=True),
                             storage_bytes_per_s=_get(fail_t, "storage_gbps", f, float, default=100.0) * 1e9)
    price = None
    if "price" in data:
        price_t, pw = data["price"], f"{where}: price"

        def optional(key: str, allow_zero: bool = False) -> float | None:
            return _get(price_t, key, pw, float, allow_zero=allow_zero) if key in price_t else None

        price = Pricing(on_demand_per_device_h=_get(price_t, "on_demand_per_device_h", pw, float),
                        spot_per_device_h=optional("spot_per_device_h"),
                        spot_preemptions_per_node_h=optional("spot_preemptions_per_node_h", True) or 0.0,
                        reserved_per_device_h=optional("reserved_per_device_h"))
    shared = data.get("shared_host_memory", False)
    if not isinstance(shared, bool):
        raise ClusterError(f"{where}.shared_host_memory = {shared!r}: must be true or false")
    return Cluster(name=_get(data, "name", where, str, positive=False),
                   accelerator=acc,
                   devices_per_node=_get(data, "devices_per_node", where, int),
                   nodes=_get(data, "nodes", where, int, default=1),
                   intra=link(intra_t, "intra_node"), inter=link(inter_t, "inter_node"),
                   efficiency=eff, shared_host_memory=shared, failures=failures, price=price)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_cluster(path_or_preset: str, nodes: int | None = None) -> Cluster:
    """A cluster file path, or a preset name (lmforge/plan/presets/<name>.toml); `nodes`
    overrides the file's node count."""
    from dataclasses import replace

    path = Path(path_or_preset)
    if not path.suffix and not path.exists():
        if path_or_preset not in preset_names():
            raise ClusterError(f"cluster {path_or_preset!r}: no such file and no such preset; presets: "
                               f"{', '.join(preset_names())}")
        path = PRESETS_DIR / f"{path_or_preset}.toml"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ClusterError(f"cluster file {path}: not found") from None
    except IsADirectoryError:
        raise ClusterError(f"cluster file {path}: is a directory") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ClusterError(f"cluster file {path}: not valid TOML ({err})") from None
    cluster = cluster_from_dict(data, where=str(path))
    if nodes is not None:
        if nodes < 1:
            raise ClusterError(f"--nodes {nodes}: must be >= 1")
        cluster = replace(cluster, nodes=nodes)
    return cluster
