"""The learning-curves figure every trial logs: its margins are fixed (no layout engine), so nothing may fall
outside the figure or overlap the other panel, whatever the numbers and the title."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from flows.figures import learning_curves_figure


def decaying(scale, iterations):
    return list(scale * np.exp(-np.arange(iterations) / 300) + scale / 100)


@pytest.mark.parametrize("loss, title", [
    (decaying(2.3, 3), "groupnorm batch_size=4 seed 0"),
    (decaying(12345.0, 3000),
     "mnist-convnet: batchnorm batch_size=2 norm_batch=2 train_seed=4 weight_scale=0.001 lr=0.0125"),
    (decaying(0.0012345, 40), "none batch_size=32 seed 1"),
    (list(2.302585 + 1e-6 * np.random.default_rng(0).standard_normal(500)), "stuck at ln 10"),  # an offset
], ids=["digits", "huge", "tiny", "flat"])
def test_every_label_lies_inside_the_figure_and_its_own_panel(loss, title):
    epochs = list(range(12))
    fig = learning_curves_figure(loss, epochs, list(np.linspace(0.1, 0.99, 12)), list(np.linspace(0.1, 0.9, 12)),
                                 title)
    renderer = FigureCanvasAgg(fig).get_renderer()
    figure_box = fig.bbox
    loss_ax, acc_ax = fig.axes
    boxes = {ax: ax.get_tightbbox(renderer) for ax in (loss_ax, acc_ax)}
    for ax, box in boxes.items():  # tick labels, axis labels, titles and the offset text
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1, (ax.get_title(), box, figure_box)
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1, (ax.get_title(), box, figure_box)
    assert boxes[loss_ax].x1 < boxes[acc_ax].x0  # the accuracy panel's labels clear the loss panel
    title_box = fig._suptitle.get_window_extent(renderer)
    assert title_box.y0 > max(box.y1 for box in boxes.values())  # above both panels' titles
    assert figure_box.x0 <= title_box.x0 and title_box.x1 <= figure_box.x1
