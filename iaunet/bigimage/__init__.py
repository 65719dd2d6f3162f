"""Images larger than memory: one plane of an OME-Zarr / TIFF read region by region
(:mod:`iaunet.data.lazy_image`), prediction block by block on Dask with stitching across blocks
(:mod:`.big_image`, :mod:`.blocks`) and OME-Zarr writing (:mod:`.ome_zarr`; docs/predict.md,
"Whole slides")."""
