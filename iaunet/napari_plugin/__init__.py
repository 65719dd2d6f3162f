"""napari plugin (npe2 manifest ``napari.yaml``, entry point ``napari.manifest`` in setup.py).

* *Plugins > IAUNet prediction*: a dock widget that runs a checkpoint on the selected image layer
  in a worker thread and adds the flattened labels, the overlap-preserving mask pages (one Labels
  layer per page) and the instances' scores (a Points layer) -- :mod:`.widget`.
* A reader that opens ``iaunet-predict``'s ``_masks.tif`` and ``_labels.tif`` as Labels layers --
  :mod:`.reader`.

Install with ``python -m pip install -e ".[napari]"``; see docs/napari.md.
"""
