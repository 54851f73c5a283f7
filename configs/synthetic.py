r"""python -m jaxscaleseg.train --config configs/synthetic.py --workdir workdirs/demo

The CPU demo: ESS on the built-in 1284-class synthetic set.

Softmax head on the same data: ``--config configs/synthetic.py:softmax``; tiny run:
``--config configs/synthetic.py:smoke``.
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.seed = 0
    c.dataset.name = "synthetic"
    c.dataset.num_classes = 1284
    c.dataset.synthetic.image_size = (64, 64)
    c.dataset.synthetic.train_examples = 4000
    c.dataset.synthetic.eval_examples = 100
    c.dataset.crop_size = (64, 64)
    c.dataset.scale_range = (1.0, 1.0)
    c.dataset.flip = True
    c.dataset.eval_batch_size = 20
    c.batch_size = 16
    c.num_train_steps = 1000
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.model.backbone = "tiny"
    c.model.embedding_dim = 12
    c.loss.name = "ess"
    c.optim.base_lr = 0.1
    c.optim.backbone_lr_mult = 1.0
    if "softmax" in variant:
        c.loss.name = "softmax"
    if "smoke" in variant:
        config_schema.smoke(c)
    return c
