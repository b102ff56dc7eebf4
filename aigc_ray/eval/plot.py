"""metrics.png: a run's per-epoch curves (losses, D outputs, FID against its floor) drawn
with matplotlib's Agg backend (no display needed). No Ray."""

from __future__ import annotations

import io


def plot_history(history: list[dict], title: str = "") -> bytes:
    """PNG bytes of up to three panels over epochs: every *loss* key (and recon/kl), D(x) and
    D(G(z)), and the evaluated FID with its floor (log scale: early FIDs are far above it)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    keys = sorted({k for h in history for k in h})
    losses = [k for k in keys if k.startswith("loss") or k in ("recon", "kl")]
    d_out = [k for k in keys if k in ("d_real", "d_fake")]
    evaluated = [h for h in history if h.get("fid") is not None]
    panels = [p for p in ("loss", "d", "fid") if {"loss": losses, "d": d_out, "fid": evaluated}[p]]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.4), dpi=100)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if panel == "loss":
            for k in losses:
                ax.plot(epochs, [h.get(k) for h in history], label=k)
            ax.set_title("losses")
        elif panel == "d":
            labels = {"d_real": "D(x)", "d_fake": "D(G(z))"}
            for k in d_out:
                ax.plot(epochs, [h.get(k) for h in history], label=labels[k])
            ax.set_title("discriminator outputs")
        else:
            xs = [h["epoch"] for h in evaluated]
            ax.plot(xs, [h["fid"] for h in evaluated], "o-", label="FID")
            if any("fid_floor" in h for h in evaluated):
                ax.plot(xs, [h.get("fid_floor") for h in evaluated], "--", color="grey", label="floor (real test)")
            best = min(evaluated, key=lambda h: h["fid"])
            ax.plot([best["epoch"]], [best["fid"]], "*", markersize=12, color="tab:red", label="best")
            ax.set_yscale("log")
            ax.set_title("domain FID (lower is better)")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
