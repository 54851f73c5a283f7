r"""python -m jaxscaleseg.train --config configs/cityscapes_mobilenetv2_ess.py --workdir DIR

Cityscapes (19 classes), DeepLabV3+ MobileNetV2 (output stride 16), ESS head.

Tiny variant: ``:smoke``. Needs the prepared dataset (``python -m jaxscaleseg.data.prepare
cityscapes ...``) and ``~/jaxscaleseg_weights/mobilenet_v2_imagenet.npz``.

Where each setting comes from:

* MobileNetV2, D = 6, k = 7, batch 12, base lr 0.1: the authors' published recommendation
  (a learning rate "higher than 0.01").
* temperature 20, margin 0.2, separation weight 1, optimiser, poly schedules, BatchNorm
  momentum, augmentation: the paper and the original code.
* chosen here (unknown): crop 768x768 and 90 000 iterations (the common DeepLabV3+ Cityscapes
  recipe); evaluation at full resolution 1024x2048, one image per device batch.
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.dataset.name = "seg_cityscapes"
    c.dataset.num_classes = 19
    c.dataset.crop_size = (768, 768)
    c.dataset.eval_pad_to = (1024, 2048)
    c.batch_size = 12
    c.num_train_steps = 90_000
    c.model.backbone = "mobilenet_v2"
    c.model.output_stride = 16
    c.model.embedding_dim = 6
    c.model.pretrained = "~/jaxscaleseg_weights/mobilenet_v2_imagenet.npz"
    c.loss.name = "ess"
    c.loss.num_neighbors = 7
    c.optim.base_lr = 0.1
    if "smoke" in config_schema.variants(variant):
        config_schema.smoke(c)
    return c
