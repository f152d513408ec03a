"""Command-line tools to build corpora, train and evaluate models: ``python -m training.<tool>``.

They call the same core functions (``napari_cryoswan``) that the napari plugin calls.
"""
