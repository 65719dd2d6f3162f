"""The picture of docs/napari.md's training section: the IAUNet training widget after a short run.

    xvfb-run -a -s "-screen 0 1600x1000x24" \
        python tools/napari_training_picture.py OUT START [ITERS]

Three synthetic nuclei fields with their labels as layers, both IAUNet widgets docked, the three
pairs added to a training set in ``OUT/training_set``, ITERS (60) iterations from the starting model
START into ``OUT/runs``, then a screenshot of the window: ``OUT/napari_training.png``.
"""

import os
import sys
import time

import napari
import numpy as np
from detectron2.structures import polygons_to_bitmask
from qtpy.QtWidgets import QApplication

from iaunet.data.datasets.synthetic import render_nuclei_scene

out, start = sys.argv[1], sys.argv[2]
viewer = napari.Viewer(show=True)
viewer.window.resize(1500, 900)
for k, seed in enumerate((90000001, 90000002, 90000003)):
    image, polys = render_nuclei_scene(seed, (192, 192))
    labels = np.zeros(image.shape, np.uint16)
    for i, p in enumerate(polys, 1):
        labels[polygons_to_bitmask([p.ravel()], *image.shape)] = i
    viewer.add_image((image * 4000).astype(np.uint16), name=f"field {k + 1}")
    viewer.add_labels(labels, name=f"field {k + 1} labels", opacity=0.4)
_, predict = viewer.window.add_plugin_dock_widget("iaunet", "IAUNet prediction")
_, widget = viewer.window.add_plugin_dock_widget("iaunet", "IAUNet training")
widget.folder.value = os.path.join(out, "training_set")
for k in range(3):
    widget.image.value, widget.labels.value = f"field {k + 1}", f"field {k + 1} labels"
    widget.add_to_training_set()
widget.source.value = "a file"
widget.weights.value = start
widget.output.value = os.path.join(out, "runs")
widget.iterations.value = int(sys.argv[3]) if len(sys.argv) > 3 else 60
widget.run()
app = QApplication.instance()
while widget.worker is not None:
    app.processEvents()
    time.sleep(0.05)
for layer in viewer.layers:
    layer.visible = layer.name in ("field 1", "field 1 labels")
viewer.reset_view()
print(widget.status.value)
app.processEvents()
time.sleep(1)
app.processEvents()
viewer.screenshot(os.path.join(out, "napari_training.png"), canvas_only=False)
