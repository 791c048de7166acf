"""Plots of benchmark results (matplotlib, written to files, no display)."""
import math

MARKERS = "osD^vP*Xhp<>"


def plot_ratio_speed(results, path):
    """Compression ratio against decompress speed (log x): one panel per
    dataset, since their ratios differ by orders of magnitude, and in it one
    labelled point per codec; colour and marker = codec, shared legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    names = list(results["datasets"])
    codecs = list(dict.fromkeys(c for r in results["datasets"].values() for c in r["codecs"]))
    colour = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(codecs)}
    marker = {c: MARKERS[i % len(MARKERS)] for i, c in enumerate(codecs)}
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1.8, 3.6 * rows), squeeze=False)
    for ax, d in zip(axes.flat, names):
        ratios = []
        for c, e in results["datasets"][d]["codecs"].items():
            if not e["ratio"] or not e["decompress_mb_s"]:
                continue
            ratios.append(e["ratio"])
            ax.scatter(e["decompress_mb_s"], e["ratio"], color=colour[c], marker=marker[c], s=40,
                       edgecolors="black", linewidths=0.4, zorder=3)
            ax.annotate(c, (e["decompress_mb_s"], e["ratio"]), xytext=(4, 3), textcoords="offset points",
                        fontsize=7, color=colour[c])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ratios and max(ratios) / min(ratios) > 10:
            ax.set_yscale("log")
        ax.set_title(d, fontsize=10)
        ax.set_xlabel("decompress MB/s (1 thread, log)", fontsize=8)
        ax.set_ylabel("ratio raw / compressed", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles = [Line2D([], [], linestyle="", marker=marker[c], color=colour[c], label=c) for c in codecs]
    fig.legend(handles=handles, fontsize=8, loc="center right", frameon=False)
    m = results.get("machine", {})
    fig.suptitle(f"Compression ratio vs decompress speed ({m.get('cpu', '?')}, one thread)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
