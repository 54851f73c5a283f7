r"""python -m jaxscaleseg.train --config configs/coco_lvis_resnet50_ess.py --workdir DIR

COCO+LVIS (1284 classes), DeepLabV3+ ResNet-50 (output stride 16), ESS head.

Tiny variant: ``:smoke``. Needs the prepared dataset (``python -m jaxscaleseg.data.prepare
coco_lvis ...``) and ``~/jaxscaleseg_weights/resnet50_imagenet.npz``.

Where each setting comes from: the authors wrote down no COCO+LVIS schedule; the dataset
specific values are chosen here and marked so.

* temperature 20, margin 0.2, separation weight 1, optimiser, poly schedules, BatchNorm
  momentum, augmentation: the paper and the original code.
* D = 12, k = 7: as the paper's other large label sets (ADE20K, COCO-Stuff).
* chosen: ResNet-50 at output stride 16, batch 10, crop 512, base lr 0.01 (as COCO-Stuff 10k,
  from which the images come), 200 000 iterations (twice COCO-Stuff's: 7x the classes),
  LVIS repeat-factor sampling with threshold 0.001 for the long tail, evaluation shrinks to fit
  and pads to 640x640 (COCO images are at most 640 on a side).
"""

from jaxscaleseg import config_schema


def get_config(variant: str = ""):
    c = config_schema.base_config()
    c.dataset.name = "seg_coco_lvis"
    c.dataset.num_classes = 1284
    c.dataset.crop_size = (512, 512)
    c.dataset.eval_crop_size = (640, 640)
    c.dataset.repeat_factor_threshold = 0.001
    c.batch_size = 10
    c.num_train_steps = 200_000
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
