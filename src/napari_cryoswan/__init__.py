"""napari-cryoswan: explore cryo-EM density maps with the Cryo-SWAN autoencoder.

Kept import-light on purpose: napari imports this package at start-up, so torch,
umap and matplotlib are imported only inside the functions that need them.
"""

__version__ = "0.1.0"
