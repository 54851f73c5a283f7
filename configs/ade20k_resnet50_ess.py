r"""python -m jaxscaleseg.train --config configs/ade20k_resnet50_ess.py --workdir DIR

ADE20K (150 classes), DeepLabV3+ ResNet-50 (output stride 16), ESS head.

Variants: ``:smoke``, ``:original`` (as ``ade20k_mobilenetv2_ess.py``: the original code's
negative-set rule, BatchNorm momenta and ``--crop_val`` evaluation). Needs the prepared dataset
(``python -m jaxscaleseg.data.prepare ade20k ...``); the ImageNet backbone is torchvision's,
fetched once (``model.pretrained``).

Where each setting comes from (the original code is github.com/shipra25jain/ESSNet):

* ResNet-50, D = 12, k = 8, batch 10, base lr 0.01: a user's report in the original
  repository's issue #5 (a table of the settings that user trained with, reaching 34.4 mIoU
  after 85 000 iterations). The authors' reply there does not confirm them; they are not the
  authors' recommendation.
* crop 512, output stride 16, the ``multi_poly`` schedule: as the original README's ADE20K
  command (README.md line 28), which uses MobileNetV2.
* temperature 20, margin 0.2, separation weight 1, optimiser, poly schedules, augmentation,
  BatchNorm momenta, negatives, evaluation: as ``ade20k_mobilenetv2_ess.py``, with the
  sources given there.
* chosen here: 160 000 iterations (the usual ADE20K ResNet schedule; nothing written down
  gives one for this backbone, and issue #5's 85 000 fell short of the paper).
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
    c.model.pretrained = "torchvision:resnet50"
    c.loss.name = "ess"
    c.loss.num_neighbors = 8
    c.optim.base_lr = 0.01
    names = config_schema.variants(variant)
    if "original" in names:
        config_schema.original_model_and_loss(c)
        c.dataset.eval_protocol = "crop_val"
    if "smoke" in names:
        config_schema.smoke(c)
    return c
