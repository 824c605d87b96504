"""forgetless.reporting.plots.label_points: the labels of the report's scatter plots (Pareto fronts, gain against
drop) do not cover one another, and points at the same place share one label."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from forgetless.reporting.plots import label_points  # noqa: E402


def test_labels_of_a_tight_cluster_do_not_overlap_and_coincident_points_share_one():
    points = {f"method-{i}": (60 + 0.3 * (i % 4), 60 + 0.2 * (i // 4)) for i in range(8)}  # a 4 x 2 cluster
    points |= {"lora-nu-mu": (75.2, 60.5), "wise-ft": (75.2, 60.5), "far": (100.0, 50.0)}
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter([x for x, _ in points.values()], [y for _, y in points.values()])
    ax.margins(0.12)
    texts = label_points(ax, points)
    assert sorted(t.get_text() for t in texts) == sorted([f"method-{i}" for i in range(8)]
                                                         + ["lora-nu-mu = wise-ft", "far"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text alone, without its leader line
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    # the naive placement (every label up and to the right of its point) would overlap in this cluster
    naive = [ax.annotate(name, xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
             for name, xy in points.items() if name.startswith("method-")]
    naive_boxes = [t.get_window_extent(renderer) for t in naive]
    assert any(a.overlaps(b) for i, a in enumerate(naive_boxes) for b in naive_boxes[i + 1:])
    plt.close(fig)
