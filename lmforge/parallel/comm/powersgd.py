"""PowerSGD (Vogels et al., 2019) through torch's own DDP hook (`powerSGD_hook`, whose
`PowerSGDState` keeps the error feedback and the warm-started Q factors), plus what lmforge
needs around it: byte accounting and checkpoints that survive DDP re-laying out its buckets.

torch keys its error and P/Q memories by bucket index; DDP lays buckets out in parameter order,
then again in gradient order after the first step, and a resumed run starts from the first
layout. So the state is saved per parameter (name -> its slice of the error, of P and of Q) and
laid out again for whatever bucket asks for it; the same happens when DDP re-lays out buckets
while training.

No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.
"""

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from lmforge.parallel.comm.accounting import CommAccounting, allreduce_bytes

Layout = list[tuple[str, torch.Size]]  # a bucket's parameters: (name, shape), in bucket order
KINDS = ("error", "p", "q")


class PowerSGDHook:
    """Owns a `PowerSGDState`; `hook` is the DDP comm hook (registered with this object as state)."""

    def __init__(self, group: dist.ProcessGroup, names: dict[int, str], rank: int, error_feedback: bool = True,
                 start_step: int = 2, seed: int = 0) -> None:
        """`start_step`: plain all-reduce before it (torch's start_powerSGD_iter; its minimum is 2)."""
        self.state = PowerSGDState(process_group=group, matrix_approximation_rank=rank,
                                   start_powerSGD_iter=start_step, use_error_feedback=error_feedback,
                                   warm_start=True, random_seed=seed)
        self.world = dist.get_world_size(group)
        self.names = names  # id(parameter) -> name
        self.layouts: dict[int, Layout] = {}  # bucket index -> the layout its state was built for
        self.pending: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}  # per parameter, to lay out
        self.accounting = CommAccounting()

    @staticmethod
    def hook(self: "PowerSGDHook", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        index = bucket.index()
        layout = [(self.names[id(p)], p.shape) for p in bucket.parameters()]
        if self.layouts.get(index, layout) != layout:  # DDP re-laid out its buckets
            self._park()
        if any(self.pending.values()):
            self._unpark(index, layout)
        self.layouts[index] = layout
        st = self.state
        vanilla = st.iter < st.start_powerSGD_iter
        after = st.total_numel_after_compression
        # Waited for here: torch chains the P and Q all-reduces in callbacks, which under gloo run on
        # its completion thread and could be issued in a different order than the next bucket's
        # all-reduce on another rank (a collective mismatch, seen with several buckets).
        reduced = powerSGD_hook(st, bucket).wait()
        numel = bucket.buffer().numel()
        sent = numel if vanilla else st.total_numel_after_compression - after  # fp32 values all-reduced
        self.accounting.add_fp32_allreduce(allreduce_bytes(4 * sent, self.world), numel, self.world)
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(reduced)
        return fut

    def dense_grad_norm(self) -> None:
        """Clipping measures the decoded gradients themselves (CommHookState)."""
        return None

    def set_selection_divisors(self, divisors: dict) -> None:
        """Not a top-k: nothing to pick (CommHookState)."""

    # -- per-parameter state -------------------------------------------------------------------

    def _compressed(self, layout: Layout) -> list[tuple[str, int, int, int]]:
        """(name, n, m, rank) of the matrices torch compresses, in the order of its P/Q memory:
        grouped by matrix shape in order of first appearance (powerSGD_hook's shape_to_tensors)."""
        st = self.state
        groups: dict[tuple[int, int], list[tuple[str, int, int, int]]] = defaultdict(list)
        for name, shape in layout:
            n = shape[0]
            m = shape.numel() // n
            r = min(n, m, st.matrix_approximation_rank)
            if (n + m) * r * st.min_compression_rate < n * m:
                groups[(n, m)].append((name, n, m, r))
        return [t for group in groups.values() for t in group]

    def _per_parameter(self) -> dict[str, dict[str, torch.Tensor]]:
        """The live state of every bucket cut into per-parameter pieces (plus what is pending)."""
        st = self.state
        out = {k: dict(v) for k, v in self.pending.items()}
        for index, layout in self.layouts.items():
            if index in st.error_dict:
                sizes = [shape.numel() for _, shape in layout]
                for (name, _), piece in zip(layout, st.error_dict[index].split(sizes)):
                    out["error"][name] = piece
            if index in st.p_memory_dict and index in st.q_memory_dict:
                mats = self._compressed(layout)
                ps = st.p_memory_dict[index].split([n * r for _, n, _, r in mats])
                qs = st.q_memory_dict[index].split([m * r for _, _, m, r in mats])
                for (name, *_), p, q in zip(mats, ps, qs):
                    out["p"][name], out["q"][name] = p, q
        return out

    def _park(self) -> None:
        """Move the state of every bucket to per-parameter pieces (buckets changed)."""
        self.pending = self._per_parameter()
        st = self.state
        for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            d.clear()
        self.layouts.clear()

    def _unpark(self, index: int, layout: Layout) -> None:
        """Lay out bucket `index`'s state from the pending pieces of its parameters."""
        st, pend = self.state, self.pending
        names = [name for name, _ in layout]
        like = next((pend["error"][n] for n in names if n in pend["error"]), None)
        if like is not None:  # a parameter without a saved error starts from zero
            st.error_dict[index] = torch.cat([pend["error"].pop(n) if n in pend["error"]
                                              else like.new_zeros(shape.numel()) for n, shape in layout])
        mats = self._compressed(layout)
        if mats and all(n in pend["p"] and n in pend["q"] for n, *_ in mats):
            st.p_memory_dict[index] = torch.cat([pend["p"].pop(n) for n, *_ in mats])
            st.q_memory_dict[index] = torch.cat([pend["q"].pop(n) for n, *_ in mats])

    # -- checkpoint ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        st = self.state
        pieces = {k: {n: t.detach().clone() for n, t in v.items()} for k, v in self._per_parameter().items()}
        return {"iter": st.iter, "rng": st.rng.get_state(), **pieces, "world": self.world,
                "totals": (st.total_numel_before_compression, st.total_numel_after_compression)}

    def load_state_dict(self, state: dict) -> None:
        """Q factors (the same on every rank) always; the errors only from as many ranks as now."""
        st = self.state
        st.iter = state["iter"]
        st.rng.set_state(state["rng"])
        st.total_numel_before_compression, st.total_numel_after_compression = state["totals"]
        for d in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            d.clear()
        self.layouts.clear()
        self.pending = {k: {n: t.clone() for n, t in state[k].items()} for k in KINDS}
        if state.get("world") != self.world:  # rank 0's errors would be sent again by every rank
            self.pending["error"] = {}
