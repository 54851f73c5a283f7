r"""python -m jaxscaleseg.train --config configs/coco_stuff10k_resnet50_ess.py --workdir DIR

COCO-Stuff 10k (171 classes), DeepLabV3+ ResNet-50 (output stride 16), ESS head.

Tiny variant: ``:smoke``. Needs the prepared dataset (``python -m jaxscaleseg.data.prepare
coco_stuff --config stuff10k_171 ...``) and ``~/jaxscaleseg_weights/resnet50_imagenet.npz``.

Where each setting comes from:

* ResNet-50, D = 12, k = 7, batch 10, crop 512, base lr 0.01, at least 100 000 iterations
  (we use 100 000): the authors' published recommendation.
* temperature 20, margin 0.2, separation weight 1, optimiser, poly schedules, BatchNorm
  momentum, augmentation: the paper and the original code.
* chosen here: the 171-class label set (``stuff10k_171``, the usual benchmark; the 182-id set
  is ``--config.dataset.config=stuff10k_182 --config.dataset.num_classes=182``), split
  ``test`` for evaluation (COCO-Stuff 10k has train/test), evaluation shrinks to fit and pads
  to 512x512.
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.dataset.name = "seg_coco_stuff"
    c.dataset.config = "stuff10k_171"
    c.dataset.num_classes = 171
    c.dataset.eval_split = "test"
    c.dataset.crop_size = (512, 512)
    c.dataset.eval_crop_size = (512, 512)
    c.batch_size = 10
    c.num_train_steps = 100_000
    c.model.backbone = "resnet50"
    c.model.output_stride = 16
    c.model.embedding_dim = 12
    c.model.pretrained = "~/jaxscaleseg_weights/resnet50_imagenet.npz"
    c.loss.name = "ess"
    c.loss.num_neighbors = 7
    c.optim.base_lr = 0.01
    if "smoke" in config_schema.variants(variant):
        config_schema.smoke(c)
    return c
