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
    extra = [k for k in ("checkpoints", "threads") if results.get(k)]
    cols = min(3, max(1, len(names) + len(extra)))
    rows = max(1, math.ceil((len(names) + len(extra)) / cols))
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
    panels = list(axes.flat)[len(names):]
    if "checkpoints" in extra:
        files = results["checkpoints"]
        _bars(panels.pop(0), list(files), {
            "compress": [f["codecs"]["ibp"]["compress_mb_s"] / f["codecs"]["zstd-3"]["compress_mb_s"]
                         if "zstd-3" in f["codecs"] else 0 for f in files.values()],
            "decompress": [f["codecs"]["ibp"]["decompress_mb_s"] / f["codecs"]["zstd-3"]["decompress_mb_s"]
                           if "zstd-3" in f["codecs"] else 0 for f in files.values()]},
            "checkpoint files: ibp speed / zstd-3 speed", "x zstd-3 (1 thread)")
    if "threads" in extra:
        t = results["threads"]
        kinds = ("compress", "decompress") + (("fill_fresh",) if all("fill_fresh" in e["speedup"] for e in t.values())
                                              else ())
        _bars(panels.pop(0), list(t), {k.replace("_", " "): [e["speedup"][k] for e in t.values()] for k in kinds},
              "ibp on two threads / one (fill fresh: this machine's ceiling)", "speedup")
    for ax in panels:
        ax.set_visible(False)
    handles = [Line2D([], [], linestyle="", marker=marker[c], color=colour[c], label=c) for c in codecs]
    fig.legend(handles=handles, fontsize=8, loc="center right", frameon=False)
    m = results.get("machine", {})
    fig.suptitle(f"Compression ratio vs decompress speed ({m.get('cpu', '?')}, one thread)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _bars(ax, labels, series, title, ylabel):
    """Grouped bars: one group per label, one bar per series, a line at 1."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
