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
    forward_us = 0                 # optional fixed costs beyond the operators (`lmforge bench cluster`
    tp_forward_us = 0              #   measures them): per forward + backward (embedding, loss, output),
    tp_block_us = 0                #   the same under tp and per block under tp (DTensor dispatch), per
    fsdp_unit_us = 0               #   FSDP2 unit (its hooks), per MoE layer (routing) and per MoE layer
    moe_layer_us = 0               #   under ep (dispatch and combine)
    ep_layer_us = 0
    attention_max = 0.25           # optional: the fused attention kernel's own curve (one head's
    attention_half_gflop = 0.002   #   W = 2 seq^2 head_dim); absent: the matmul curve above
    activation_passes = 3          # memory passes over each activation byte the blocks produce
                                   #   (default 3: written in forward, read twice in backward)
    [collectives]                  # optional: measured seconds of each collective on `ranks` ranks of
    ranks = 2                      #   one node, [[bytes, us], ...] per kind; used instead of the link
    all_reduce = [[4096, 300], [16777216, 18000]]   # model for groups of that size inside a node
    all_gather = [[4096, 300], [16777216, 45000]]   # (all-gather: bytes of the gathered tensor;
    reduce_scatter = [[4096, 300], [16777216, 24000]]  # reduce-scatter: of its input)
    all_to_all = [[4096, 300], [16777216, 9000]]
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
    (small matmuls are bound by memory and launch; large ones approach `max`); the same curve of
    the fused attention kernel where it was measured (it runs well below the matmul rate on CPUs:
    softmax, masking and a backward that recomputes the scores); the memory passes over each
    activation byte the model produces; and the fixed costs per operator and per parallel
    construct that no FLOP count shows."""

    max: float
    half_flops: float
    op_overhead_s: float
    comm_overlap: float = 1.0
    forward_s: float = 0.0  # per forward + backward of a micro-batch: embedding, loss, output head
    tp_forward_s: float = 0.0  # the same, in addition, under tensor parallelism (vocab-parallel loss)
    tp_block_s: float = 0.0  # per block forward + backward under tensor parallelism
    fsdp_unit_s: float = 0.0  # per FSDP-wrapped unit (each block and the root) per forward + backward
    moe_layer_s: float = 0.0  # per MoE layer forward + backward (routing, permutation)
    ep_layer_s: float = 0.0  # per MoE layer forward + backward under expert parallelism
    attention_max: float | None = None  # None: attention runs on the matmul curve
    attention_half_flops: float = 0.0
    activation_passes: float = 3.0  # written in forward, read twice in backward, unless measured

    def of(self, flops: float) -> float:
        return self.max * flops / (flops + self.half_flops) if flops > 0 else self.max

    def of_attention(self, flops: float) -> float:
        """Fraction of peak the attention kernel reaches on one head's W = 2 s^2 head_dim FLOPs."""
        if self.attention_max is None:
            return self.of(flops)
        return self.attention_max * flops / (flops + self.attention_half_flops) if flops > 0 else self.attention_max


# The fixed costs of `Efficiency` beyond the per-operator one (cluster file keys: <name>_us).
FIXED_COSTS = ("forward", "tp_forward", "tp_block", "fsdp_unit", "moe_layer", "ep_layer")
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@dataclass(frozen=True)
class CollectiveTable:
    """Measured seconds of each collective kind on `ranks` ranks of one node, by message bytes:
    on CPUs the cost is not one latency and one bandwidth (gloo's all-gather and reduce-scatter
    of large tensors are 2-5x its all-reduce), so where a calibration measured it the time model
    reads it here (log-log interpolation; linear in bytes past the largest point)."""

    ranks: int
    points: dict[str, tuple[tuple[float, float], ...]]  # kind -> ((bytes, seconds), ...) by bytes

    def time(self, kind: str, nbytes: float, n: int) -> float | None:
        """Seconds of one `kind` collective of `nbytes` on `n` ranks; None when not measured."""
        pts = self.points.get(kind)
        if n != self.ranks or not pts or nbytes <= 0:
            return None
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if nbytes <= b1:
                f = math.log(nbytes / b0) / math.log(b1 / b0)
                return math.exp(math.log(t0) + f * math.log(t1 / t0))
        if len(pts) == 1:
            return pts[0][1] * nbytes / pts[0][0]
        (b0, t0), (b1, t1) = pts[-2], pts[-1]
        return t1 + (nbytes - b1) * max(t1 - t0, 0.0) / (b1 - b0)


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
    collectives: CollectiveTable | None = None  # the `[collectives]` table, where measured
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
               "shared_host_memory", "description", "failures", "price", "collectives"},
          "collectives": {"ranks", *COLLECTIVE_KINDS},
          "failures": {"device_mtbf_h", "node_mtbf_h", "restart_s", "storage_gbps"},
          "price": {"on_demand_per_device_h", "reserved_per_device_h", "spot_per_device_h",
                    "spot_preemptions_per_node_h"},
          "accelerator": {"name", "peak_bf16_tflops", "peak_fp8_tflops", "peak_fp32_tflops", "memory_gib", "hbm_gbps",
                          "power_w"},
          "intra_node": {"bandwidth_gbps", "latency_us", "call_overhead_us"},
          "inter_node": {"bandwidth_gbps", "latency_us", "call_overhead_us"},
          "efficiency": {"max", "half_gflop", "op_overhead_us", "comm_overlap", "attention_max", "attention_half_gflop",
                         "activation_passes", *(f"{k}_us" for k in FIXED_COSTS)}}


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
                     comm_overlap=_get(eff_t, "comm_overlap", e, float, default=1.0, allow_zero=True),
                     **{f"{k}_s": _get(eff_t, f"{k}_us", e, float, default=0.0, allow_zero=True) * 1e-6
                        for k in FIXED_COSTS},
                     attention_max=_get(eff_t, "attention_max", e, float) if "attention_max" in eff_t else None,
                     attention_half_flops=_get(eff_t, "attention_half_gflop", e, float, default=0.0,
                                               allow_zero=True) * 1e9,
                     activation_passes=_get(eff_t, "activation_passes", e, float, default=3.0, allow_zero=True))
    for key, value in (("max", eff.max), ("comm_overlap", eff.comm_overlap), ("attention_max", eff.attention_max or 0)):
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
    collectives = _collectives(data["collectives"], f"{where}: collectives") if "collectives" in data else None
    return Cluster(name=_get(data, "name", where, str, positive=False),
                   accelerator=acc,
                   devices_per_node=_get(data, "devices_per_node", where, int),
                   nodes=_get(data, "nodes", where, int, default=1),
                   intra=link(intra_t, "intra_node"), inter=link(inter_t, "inter_node"),
                   efficiency=eff, shared_host_memory=shared, collectives=collectives, failures=failures,
                   price=price)


def _collectives(table: dict[str, Any], where: str) -> CollectiveTable:
    """The `[collectives]` table: `ranks` and per kind a list of [bytes, microseconds] pairs."""
    ranks = _get(table, "ranks", where, int)
    if ranks < 2:
        raise ClusterError(f"{where}.ranks = {ranks}: must be >= 2 (a collective needs two ranks)")
    points: dict[str, tuple[tuple[float, float], ...]] = {}
    for kind in COLLECTIVE_KINDS:
        if kind not in table:
            continue
        rows = table[kind]
        ok = isinstance(rows, list) and rows and all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                        and math.isfinite(v) and v > 0 for v in r) for r in rows)
        if not ok:
            raise ClusterError(f"{where}.{kind}: must be a list of [bytes, microseconds] pairs, both > 0")
        pts = sorted((float(b), float(us) * 1e-6) for b, us in rows)
        if len({b for b, _ in pts}) != len(pts):
            raise ClusterError(f"{where}.{kind}: two points have the same byte count")
        points[kind] = tuple(pts)
    return CollectiveTable(ranks=ranks, points=points)


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
