r"""python -m jaxscaleseg.train --config configs/pascal_voc_resnet50_ess.py --workdir DIR

PASCAL VOC 2012 with SBD (21 classes), DeepLabV3+ ResNet-50 (output stride 16), ESS head.

Tiny variant: ``:smoke``. Needs the prepared dataset (``python -m jaxscaleseg.data.prepare
pascal_voc --config voc2012_aug ...``) and ``~/jaxscaleseg_weights/resnet50_imagenet.npz``.

Where each setting comes from: the authors wrote down no VOC schedule, so everything dataset
specific is chosen here and marked so.

* temperature 20, margin 0.2, separation weight 1, optimiser, poly schedules, BatchNorm
  momentum, augmentation: the paper and the original code.
* chosen: ResNet-50 at output stride 16 (the paper's backbone family), D = 6 and k = 7 (as for
  the other small label set, Cityscapes; with 21 classes k = 7 is a third of them), batch 10,
  crop 512, base lr 0.01 (as ADE20K), 30 000 iterations on ``voc2012_aug`` (the usual
  DeepLabV3+ VOC recipe), evaluation on ``validation`` padded to 512x512 (VOC images are at
  most 500x500, so nothing is resized).
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.dataset.name = "seg_pascal_voc"
    c.dataset.config = "voc2012_aug"
    c.dataset.num_classes = 21
    c.dataset.crop_size = (512, 512)
    c.dataset.eval_pad_to = (512, 512)
    c.batch_size = 10
    c.num_train_steps = 30_000
    c.eval_every_steps = 5_000
    c.model.backbone = "resnet50"
    c.model.output_stride = 16
    c.model.embedding_dim = 6
    c.model.pretrained = "~/jaxscaleseg_weights/resnet50_imagenet.npz"
    c.loss.name = "ess"
    c.loss.num_neighbors = 7
    c.optim.base_lr = 0.01
    if "smoke" in config_schema.variants(variant):
        config_schema.smoke(c)
    return c
