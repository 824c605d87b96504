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


def test_the_training_curves_tick_whole_steps(tmp_path, monkeypatch):
    """A stage of two steps was drawn with a tick at step 1.5 (matplotlib's default locator)."""
    from forgetless.reporting.plots import plot_training_curves

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    plot_training_curves([{"method": "lora-nu-mu", "task": "t", "seed": 0,
                           "stages": [{"stage": "general", "history": history},
                                      {"stage": "domain", "history": history}]}], tmp_path / "curves.png")
    (fig,) = figures
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_one_method_pareto_front_is_ringed_and_its_legend_shows_it(tmp_path, monkeypatch):
    """A front of one method was a zero-length step line: a legend entry with nothing drawn."""
    from forgetless.reporting.report import Results, load_runs, plot_pareto
    from tests.unit.test_report import write_runs

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    for name, data, size in (("one", {"hlora": {"t1": [(10.0, 50.0)]}, "lora-mu": {"t1": [(12.0, 40.0)]}}, 1),
                             ("two", {"hlora": {"t1": [(10.0, 40.0)]}, "lora-mu": {"t1": [(12.0, 50.0)]}}, 2)):
        plot_pareto(Results(load_runs(write_runs(tmp_path / name, data))), tmp_path / f"{name}.png")
        (ax,) = figures.pop().axes
        handles, labels = ax.get_legend_handles_labels()
        assert labels == ["Pareto front"] and len(handles[0].get_offsets()) == size
        assert len([line for line in ax.get_lines() if len(line.get_xdata()) > 1]) == (size > 1)
