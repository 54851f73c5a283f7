"""Datasets and input pipeline.

* ``synthetic``: the built-in many-class dataset (no download, no preparation).
* ``augment``: pure numpy augmentation functions (joint image/label transforms).
* ``pipeline``: the grain pipelines, ``make_train_iterator`` and ``make_eval_iterator``.
* ``builders``/``prepare``: TFDS builders for the real datasets.

Submodules are imported explicitly (``from jaxscaleseg.data import pipeline``) so that importing
one does not pull in the others' dependencies.
"""
