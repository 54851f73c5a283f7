r"""python -m jaxscaleseg.train --config configs/coco_stuff10k_resnet50_softmax.py --workdir DIR

The softmax baseline of ``coco_stuff10k_resnet50_ess.py``: the same setup with a C-way softmax head.

Variants ``:smoke`` and ``:original`` as there (``:original``'s negative-set rule does not
apply to a softmax head). Every setting, and where it comes from, is as in
``coco_stuff10k_resnet50_ess.py``; only the head and loss differ (softmax cross-entropy; the
ESS-only fields D, k, temperature and margin are unused). The same schedule as the ESS config:
chosen here (the original code's baseline, ``--loss_type cross_entropy``, takes the same
flags, main.py lines 427-433).
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.sibling_config(__file__, "coco_stuff10k_resnet50_ess", variant)
    c.loss.name = "softmax"
    return c
