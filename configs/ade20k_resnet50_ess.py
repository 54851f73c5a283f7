r"""python -m jaxscaleseg.train --config configs/ade20k_resnet50_ess.py --workdir DIR

ADE20K (150 classes), DeepLabV3+ ResNet-50 (output stride 16), ESS head.

Tiny variant: ``:smoke``. Needs the prepared dataset (``python -m jaxscaleseg.data.prepare
ade20k ...``) and ``~/jaxscaleseg_weights/resnet50_imagenet.npz`` (``python -m
jaxscaleseg.models.pretrained --arch resnet50 ...``).

Where each setting comes from:

* ResNet-50, D = 12, k = 8, batch 10, crop 512, base lr 0.01: the authors' published
  recommendation for ResNet-50 on ADE20K.
* temperature 20, margin 0.2, separation weight 1, optimiser, poly schedules, BatchNorm
  momentum, augmentation: as ``ade20k_mobilenetv2_ess.py`` (the paper and the original code).
* chosen here (unknown): 160 000 iterations (the usual ADE20K ResNet schedule; the authors
  give none for this backbone); evaluation shrinks to fit and pads to 512x512.
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.dataset.name = "seg_ade20k"
    c.dataset.num_classes = 150
    c.dataset.crop_size = (512, 512)
    c.dataset.eval_crop_size = (512, 512)
    c.batch_size = 10
    c.num_train_steps = 160_000
    c.model.backbone = "resnet50"
    c.model.output_stride = 16
    c.model.embedding_dim = 12
    c.model.pretrained = "~/jaxscaleseg_weights/resnet50_imagenet.npz"
    c.loss.name = "ess"
    c.loss.num_neighbors = 8
    c.optim.base_lr = 0.01
    if "smoke" in config_schema.variants(variant):
        config_schema.smoke(c)
    return c
