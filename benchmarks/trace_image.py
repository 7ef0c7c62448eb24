"""One batched request's trace drawn as a trace viewer shows it, from spans an OTLP receiver got (a PNG).

Rows, top to bottom: the request's server span and its steps, then the batch span it rode in (linked both ways),
then the other requests that batch served. The x axis is milliseconds from the request's start.
"""

from __future__ import annotations

from pathlib import Path

from otlp_receiver import ReceivedSpan


def descendants(spans: list[ReceivedSpan], root: ReceivedSpan) -> list[tuple[int, ReceivedSpan]]:
    """(depth, span) for `root` and every span under it, depth first, children by start time."""
    out = [(0, root)]
    below = sorted(
        (s for s in spans if s.parent_id == root.span_id and s.trace_id == root.trace_id), key=lambda s: s.start_ns
    )
    for child in below:
        out += [(depth + 1, span) for depth, span in descendants(spans, child)]
    return out


def pick_batch(spans: list[ReceivedSpan]) -> ReceivedSpan:
    """The batch span that served the most requests (at least two)."""
    batches = [s for s in spans if s.name.startswith("batch ") and len(s.links) >= 2]
    if not batches:
        raise ValueError("no batch served two requests or more: nothing batched to draw")
    return max(batches, key=lambda s: (len(s.links), s.start_ns))


def draw_batched_trace(spans: list[ReceivedSpan], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = pick_batch(spans)
    by_id = {(s.trace_id, s.span_id): s for s in spans}
    requests = [by_id[(trace_id, span_id)] for trace_id, span_id, _ in batch.links if (trace_id, span_id) in by_id]
    request, others = requests[0], requests[1:]
    rows = [(f"{'   ' * depth}{span.name}", span, "#4c78a8") for depth, span in descendants(spans, request)]
    size = batch.attributes.get("vitae.batch.size")
    rows.append((f"{batch.name} (size {size}; its own trace)", batch, "#f58518"))
    rows += [(f"another request in it: {s.name}", s, "#9d9d9d") for s in others]
    t0 = request.start_ns
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.4))
    for y, (_, span, color) in enumerate(rows):
        start, width = (span.start_ns - t0) / 1e6, max((span.end_ns - span.start_ns) / 1e6, 0.05)
        ax.barh(y, width, left=start, color=color, height=0.6)
        ax.text(start + width, y, f" {width:.1f} ms", va="center", fontsize=8)
    inference = [y for y, (_, span, _) in enumerate(rows) if span.name == "inference" and span.links]
    for y in inference:  # the span links, both ways, between the request's inference and its batch
        ax.annotate(
            "",
            xy=((batch.start_ns - t0) / 1e6, len(rows) - len(others) - 1),
            xytext=((rows[y][1].start_ns - t0) / 1e6, y),
            arrowprops={"arrowstyle": "<->", "linestyle": "--", "color": "k"},
        )
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("ms from the request's start")
    model = f"{batch.attributes.get('vitae.model.name')} {batch.attributes.get('vitae.model.version')}"
    engine = f"{batch.attributes.get('vitae.backend')} {batch.attributes.get('vitae.precision')}"
    ax.set_title(
        f"POST /classify in a batch of {size} ({model}, {engine}); trace {request.trace_id[:12]}…", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
