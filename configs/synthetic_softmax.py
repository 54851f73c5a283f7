r"""python -m jaxscaleseg.train --config configs/synthetic_softmax.py --workdir DIR

The softmax baseline of ``synthetic.py``: the same data, model, optimiser and schedule with a
C-way softmax head and its cross-entropy (the ESS-only fields D, k, temperature and margin are
unused). Tiny variant: ``:smoke``.
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.sibling_config(__file__, "synthetic", variant)
    c.loss.name = "softmax"
    return c
