r"""python -m jaxscaleseg.train --config configs/ade20k_mobilenetv2_ess.py --workdir DIR

ADE20K (150 classes), DeepLabV3+ MobileNetV2 (output stride 16), ESS head.

Tiny variant: ``--config configs/ade20k_mobilenetv2_ess.py:smoke``. Needs the prepared dataset
(``python -m jaxscaleseg.data.prepare ade20k --manual_dir ARCHIVES --data_dir
~/tensorflow_datasets``) and the converted ImageNet backbone (``python -m
jaxscaleseg.models.pretrained --arch mobilenet_v2 --input mobilenet_v2.pth --output
~/jaxscaleseg_weights/mobilenet_v2_imagenet.npz``).

Where each setting comes from:

* backbone MobileNetV2, output stride 16, D = 12, k = 7, batch 10, crop 512, base lr 0.01,
  200 000 iterations: the original code's README command and defaults.
* temperature 20, margin 0.2, separation weight 1: the paper (used throughout).
* SGD momentum 0.9, weight decay 1e-4, backbone at 0.1x, poly powers 0.9/0.9/0.95 down to
  1e-6 (``multi_poly``), BatchNorm momentum 0.01 (PyTorch) = 0.99 (flax): the original code.
* scale 0.5-2.0, flips: the original code's augmentation.
* chosen here (not written down by the authors): evaluation shrinks images larger than
  512x512 to fit (aspect kept) and pads to 512x512 so one compiled step serves the whole set;
  an evaluation every 10 000 steps; a checkpoint every 2 000.
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.dataset.name = "seg_ade20k"
    c.dataset.num_classes = 150
    c.dataset.crop_size = (512, 512)
    c.dataset.eval_crop_size = (512, 512)
    c.batch_size = 10
    c.num_train_steps = 200_000
    c.model.backbone = "mobilenet_v2"
    c.model.output_stride = 16
    c.model.embedding_dim = 12
    c.model.pretrained = "~/jaxscaleseg_weights/mobilenet_v2_imagenet.npz"
    c.loss.name = "ess"
    c.loss.num_neighbors = 7
    c.optim.base_lr = 0.01
    if "smoke" in config_schema.variants(variant):
        config_schema.smoke(c)
    return c
