"""Opens OME-Zarr outputs in napari (with the napari-ome-zarr reader) and saves a screenshot
of the canvas, printing each layer's kind and shape.

    xvfb-run -a python scripts/napari_screenshot.py OUT.png GROUP [GROUP ...]

Needs `napari[pyqt5]` and `napari-ome-zarr` (PyPI); under a headless X server (xvfb-run) it
renders offscreen. docs/volumes.md shows one such screenshot.
"""

import sys
import time

import napari
from PIL import Image


def main(out, groups):
    viewer = napari.Viewer(show=True)
    for group in groups:
        for layer in viewer.open(group, plugin="napari-ome-zarr"):
            shape = layer.data[0].shape if layer.multiscale else layer.data.shape
            print(f"{group}: {type(layer).__name__} layer {layer.name!r}, shape {shape}")
            # The reader adds label images hidden (they usually sit over their image).
            layer.visible = True
    viewer.dims.set_current_step(0, 0)
    viewer.reset_view()
    # Slicing and the first draw of lazily read (dask) data happen in the event loop.
    for _ in range(30):
        napari.qt.get_qapp().processEvents()
        time.sleep(0.1)
    Image.fromarray(viewer.screenshot(canvas_only=True, flash=False)).save(out)
    viewer.close()
    print(f"screenshot -> {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
