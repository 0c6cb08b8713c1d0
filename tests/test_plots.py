"""The figures: labels that can be read (matplotlib's Agg backend, nothing shown)."""

import itertools

import pytest
from conftest import synthetic_lut

from amoeba_profile.cli.plots import validation_figure
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.schema import meta_fields
from amoeba_profile.core.subnet import Subnet
from amoeba_profile.core.timing import Measurement
from amoeba_profile.table.lut import Lut, frame_rows, measured_row, rows_frame


def _table(arch, measured_ms):
    """A table whose whole-model decode rows measured ``measured_ms`` (one model per value)."""
    lut = synthetic_lut(arch, lambda h, p, c: 0.1 * h, lambda f, p: 0.01 * f, lambda p, c: 0.5)
    rows = frame_rows(lut.frame)
    for context, value in zip(range(16, 16 + len(measured_ms)), measured_ms):
        entry = Entry("model", "decode", 1, 1, context, subnet=Subnet.uniform(arch, 1 + context % arch.num_layers, 1.0))
        rows.append(
            measured_row(entry, Measurement.from_samples([value] * 3), "ok", method="whole", repeat=1, wall_s=0.0)
        )
    return Lut(rows_frame(rows), {**meta_fields(lut.meta), "dtype": "float32", "device_slug": "cpu-test"})


def _overlaps(fig):
    """Pairs of tick labels (of one axis) whose boxes intersect once drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    found = []
    for axis in (ax.xaxis, ax.yaxis):
        boxes = [
            (t.get_text(), t.get_window_extent(renderer))
            for t in axis.get_ticklabels(which="both")
            if t.get_visible() and t.get_text()
        ]
        found += [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]
    return found


@pytest.mark.parametrize(
    "measured_ms",
    [
        [2.0, 3.1, 4.8, 7.5, 11.6, 18.0],  # about a decade: matplotlib labelled 3x10^0 and 4x10^0 into each other
        [3.0, 5.0, 9.0, 15.0, 22.0, 36.0],
        [15.0, 31.0, 66.0, 140.0, 290.0, 600.0],
        [0.9, 4.0, 30.0, 200.0, 1500.0, 9000.0],  # four decades
    ],
)
def test_validation_tick_labels_do_not_overlap(tiny_arch, measured_ms):
    import matplotlib.pyplot as plt

    fig = validation_figure(_table(tiny_arch, measured_ms))
    try:
        labels = [t.get_text() for t in fig.axes[0].xaxis.get_ticklabels() if t.get_text()]
        assert len(labels) >= 2, labels  # thinned, not emptied
        assert _overlaps(fig) == []
    finally:
        plt.close(fig)
