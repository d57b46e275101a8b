"""The sparsity a pruned model actually has, counted from its weights (not from the masks asked
for): per pruned weight, over all pruned weights, over all parameters; and the rich table of it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from torch import nn


def sparsity_table(model: nn.Module, pruned: list[str], outliers: dict[str, float] | None = None) -> dict:
    """{"layers": [...], "pruned_weights": {...}, "all_parameters": {...}}: zeros / elements each.
    `pruned`: the weight names (fully qualified) that were pruned, in order."""
    params = dict(model.named_parameters())
    layers = []
    for name in pruned:
        w = params[name].detach()
        zeros = int((w == 0).sum())
        row = {"name": name, "shape": list(w.shape), "params": w.numel(), "zeros": zeros,
               "sparsity": zeros / w.numel()}
        module = name.removesuffix(".weight")
        if outliers and module in outliers:
            row["input_feature_max_over_median"] = outliers[module]
        layers.append(row)
    p_params = sum(r["params"] for r in layers)
    p_zeros = sum(r["zeros"] for r in layers)
    all_params = sum(p.numel() for p in params.values())
    all_zeros = sum(int((p.detach() == 0).sum()) for p in params.values())
    return {"layers": layers,
            "pruned_weights": {"params": p_params, "zeros": p_zeros, "sparsity": p_zeros / p_params if p_params else 0.0},
            "all_parameters": {"params": all_params, "zeros": all_zeros, "sparsity": all_zeros / all_params}}


def print_sparsity(report: dict, console: Console | None = None) -> None:
    """The per-layer table, the totals and (with recovery) the loss before/after."""
    console = console or Console(width=120)
    s = report["sparsity"]
    wanda = any("input_feature_max_over_median" in r for r in s["layers"])
    t = Table(title=f"{report['method']} pruning, {report['scheme']} (compared within {report['comparison_group']})",
              title_justify="left")
    for col in ["weight", "shape", "params", "zeros", "sparsity", *(["|X_j| max/median"] if wanda else [])]:
        t.add_column(col, justify="left" if col == "weight" else "right")
    for r in s["layers"]:
        extra = [f"{r['input_feature_max_over_median']:.1f}"] if wanda else []
        t.add_row(r["name"], "x".join(map(str, r["shape"])), f"{r['params']:,}", f"{r['zeros']:,}",
                  f"{r['sparsity']:.2%}", *extra)
    for label, key in (("total, pruned weights", "pruned_weights"), ("total, all parameters", "all_parameters")):
        d = s[key]
        t.add_row(label, "", f"{d['params']:,}", f"{d['zeros']:,}", f"{d['sparsity']:.2%}", *([""] if wanda else []))
    console.print(t)
    rec = report.get("recovery")
    if rec:
        r = Table(title=f"recovery fine-tune: {rec['steps']} steps, lr {rec['lr']:g}, masks held", title_justify="left")
        for col in ("measure", "before", "after"):
            r.add_column(col, justify="left" if col == "measure" else "right")
        r.add_row(f"val loss (first {rec['val_micro_batches']} micro-batches)", f"{rec['val_loss_before']:.4f}",
                  f"{rec['val_loss_after']:.4f}")
        r.add_row("val perplexity", f"{rec['val_perplexity_before']:.2f}", f"{rec['val_perplexity_after']:.2f}")
        r.add_row("train loss (first / last 10% of steps)", f"{rec['train_loss_first']:.4f}",
                  f"{rec['train_loss_last']:.4f}")
        console.print(r)
