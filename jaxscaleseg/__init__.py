"""jaxscaleseg: embedding-based scalable semantic segmentation (ESS) in JAX/Flax.

Reimplements *Scaling Semantic Segmentation Beyond 1K Classes on a Single GPU* (Jain et al.,
ICCV 2021): pixels are embedded in a small D-dimensional space and classified by their nearest
class embedding, so memory does not grow with the number of classes C.
"""

__version__ = "0.1.0"
