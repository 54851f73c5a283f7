"""Tiny archives in the official layouts of the five datasets, for builder tests.

Each ``make_*`` writes the archive(s) a builder expects into ``manual_dir`` and returns the
expected stored labels, ``{split: {file_name: uint16 [H, W]}}`` (void = STORED_VOID). The
expected values are written out by hand here, independent of the mapping code under test.
Images are ``H x W`` = 32 x 48.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from jaxscaleseg.labels import STORED_VOID

H, W = 32, 48
V = STORED_VOID


def stripes(values, dtype=np.uint16) -> np.ndarray:
    """``[H, W]`` array of ``len(values)`` vertical stripes holding ``values`` left to right."""
    out = np.zeros((H, W), dtype=np.int64)
    for i, v in enumerate(np.array_split(np.arange(W), len(values))):
        out[:, v] = values[i]
    return out.astype(dtype)


def image_array(seed: int, channels: int = 3) -> np.ndarray:
    """A smooth random ``[H, W, channels]`` uint8 image (smooth so JPEG stays close)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 6, channels))
    return np.kron(base, np.ones((8, 8, 1))).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, palette: np.ndarray | None = None) -> bytes:
    """PIL-encodes ``array`` as ``fmt`` (``JPEG``/``PNG``); ``palette`` makes a mode-P PNG."""
    from PIL import Image

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if palette is not None:
        im = Image.new("P", (array.shape[1], array.shape[0]))
        im.putdata(array.reshape(-1).tolist())
        im.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    else:
        im = Image.fromarray(array)
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def jpeg(seed: int, channels: int = 3) -> bytes:
    return encode(image_array(seed, channels), "JPEG")


def png(array: np.ndarray) -> bytes:
    return encode(np.asarray(array, np.uint8), "PNG")


CORRUPT_IMAGE = b"\xff\xd8\xff\xe0 this is not a JPEG"


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def savemat(variables: dict) -> bytes:
    from scipy import io as sio

    out = io.BytesIO()
    sio.savemat(out, variables)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------


def make_ade20k(manual_dir: Path, *, corrupt: bool = False) -> dict:
    """``ADEChallengeData2016.zip``: 2 (3 with ``corrupt``) training and 1 validation image.

    Raw 0 is void, 1..150 become 0..149, and 151+ (never used) is void. The second training
    image is a grey JPEG; with ``corrupt`` a third training image is not a JPEG.
    """
    root = "ADEChallengeData2016/"
    raws = {
        "training/ADE_train_00000001": [0, 1, 75, 150],
        "training/ADE_train_00000002": [150, 0, 200, 2],
        "validation/ADE_val_00000001": [3, 0, 149],
    }
    expected_values = {
        "training/ADE_train_00000001": [V, 0, 74, 149],
        "training/ADE_train_00000002": [149, V, V, 1],
        "validation/ADE_val_00000001": [2, V, 148],
    }
    members, expected = {}, {"train": {}, "validation": {}}
    for i, (stem, raw) in enumerate(raws.items()):
        name = f"{root}images/{stem}.jpg"
        members[name] = jpeg(i, channels=1 if "00000002" in stem else 3)
        members[f"{root}annotations/{stem}.png"] = png(stripes(raw))
        split = "train" if stem.startswith("training") else "validation"
        expected[split][name] = stripes(expected_values[stem])
    if corrupt:
        members[f"{root}images/training/ADE_train_00000003.jpg"] = CORRUPT_IMAGE
        members[f"{root}annotations/training/ADE_train_00000003.png"] = png(stripes([1]))
    members[f"{root}sceneCategories.txt"] = b"ADE_train_00000001 airport_terminal\n"
    write_zip(Path(manual_dir) / "ADEChallengeData2016.zip", members)
    return expected


def make_cityscapes(manual_dir: Path) -> dict:
    """``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``: 2 train, 1 val image.

    Label ids 7 -> 0, 26 -> 13, 33 -> 18, 24 -> 11; 0, 1, 34 and 255 are void. The other gtFine
    files (colour, instance ids, polygons) and a test image are ignored by the builder.
    """
    frames = {
        ("train", "aachen", "aachen_000000_000019"): ([0, 7, 26, 33], [V, 0, 13, 18]),
        ("train", "bochum", "bochum_000000_000313"): ([24, 255, 1, 34], [11, V, V, V]),
        ("val", "frankfurt", "frankfurt_000000_000294"): ([8, 21, 23], [1, 8, 10]),
    }
    images, labels = {}, {}
    expected = {"train": {}, "validation": {}}
    for i, ((split, city, stem), (raw, want)) in enumerate(frames.items()):
        name = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
        images[name] = encode(image_array(10 + i), "PNG")
        gt = f"gtFine/{split}/{city}/{stem}_gtFine_"
        labels[gt + "labelIds.png"] = png(stripes(raw))
        labels[gt + "color.png"] = encode(image_array(20 + i), "PNG")
        labels[gt + "instanceIds.png"] = png(stripes([1]))
        labels[gt + "polygons.json"] = b"{}"
        expected["train" if split == "train" else "validation"][name] = stripes(want)
    images["leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png"] = png(stripes([0]))
    images["license.txt"] = b"licence"
    write_zip(Path(manual_dir) / "leftImg8bit_trainvaltest.zip", images)
    write_zip(Path(manual_dir) / "gtFine_trainvaltest.zip", labels)
    return expected


def voc_palette() -> np.ndarray:
    """VOC's 256-entry colour map, written out independently of the package's."""
    cmap = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def make_pascal_voc(manual_dir: Path, *, sbd: bool = False) -> dict:
    """``VOCtrainval_11-May-2012.tar`` (and with ``sbd`` SBD's ``benchmark.tgz``).

    VOC train = [A], val = [B]; SBD train = [C, B], val = [A, D], so ``train_aug`` = A (VOC
    label), C and D (SBD labels). VOC labels are palette PNGs with 255 borders (void).
    """
    root = "VOCdevkit/VOC2012/"
    ids = {"A": "2007_000032", "B": "2007_000033", "C": "2008_000002", "D": "2008_000003"}
    voc_raw = {"A": [0, 1, 255, 20], "B": [15, 255, 0]}
    voc_want = {"A": [0, 1, V, 20], "B": [15, V, 0]}
    sbd_raw = {"A": [5], "B": [6], "C": [0, 7, 19], "D": [20, 3]}
    members = {}
    for i, key in enumerate(ids.values()):
        members[f"{root}JPEGImages/{key}.jpg"] = jpeg(30 + i)
    for k, raw in voc_raw.items():
        members[f"{root}SegmentationClass/{ids[k]}.png"] = encode(
            stripes(raw, np.uint8), "PNG", palette=voc_palette()
        )
    members[f"{root}ImageSets/Segmentation/train.txt"] = f"{ids['A']}\n".encode()
    members[f"{root}ImageSets/Segmentation/val.txt"] = f"{ids['B']}\n".encode()
    members[f"{root}ImageSets/Segmentation/trainval.txt"] = f"{ids['A']}\n{ids['B']}\n".encode()
    write_tar(Path(manual_dir) / "VOCtrainval_11-May-2012.tar", members)

    def name(k):
        return f"{root}JPEGImages/{ids[k]}.jpg"

    expected = {
        "train": {name("A"): stripes(voc_want["A"])},
        "validation": {name("B"): stripes(voc_want["B"])},
    }
    if sbd:
        sbd_members = {}
        for k, raw in sbd_raw.items():
            seg = {"Segmentation": stripes(raw, np.uint8), "CategoriesPresent": np.array([1])}
            sbd_members[f"benchmark_RELEASE/dataset/cls/{ids[k]}.mat"] = savemat({"GTcls": seg})
        sbd_members["benchmark_RELEASE/dataset/train.txt"] = f"{ids['C']}\n{ids['B']}\n".encode()
        sbd_members["benchmark_RELEASE/dataset/val.txt"] = f"{ids['A']}\n{ids['D']}\n".encode()
        write_tar(Path(manual_dir) / "benchmark.tgz", sbd_members, mode="w:gz")
        expected["train_aug"] = {
            name("A"): stripes(voc_want["A"]),
            name("C"): stripes([0, 7, 19]),
            name("D"): stripes([20, 3]),
        }
    return expected


def make_coco_stuff_164k(manual_dir: Path) -> dict:
    """``stuffthingmaps_trainval2017.zip`` + ``train2017.zip`` + ``val2017.zip``.

    PNG values are id - 1 and 255 = unlabeled; in the 171-class space 0 (person) -> 0,
    10 (fire hydrant) -> 10, 11 (street sign, dropped) -> void, 12 (stop sign) -> 11,
    89 (toothbrush) -> 79, 90 (hair brush, dropped) -> void, 91 (banner) -> 80, 181 (wood) -> 170.
    """
    maps, train, val = {}, {}, {}
    expected = {"train": {}, "validation": {}}
    cases = {
        "train2017/000000000009": ([0, 10, 11, 12], [0, 10, V, 11]),
        "train2017/000000000025": ([91, 181, 255], [80, 170, V]),
        "val2017/000000000139": ([255, 90, 89, 5], [V, V, 79, 5]),
    }
    for i, (stem, (raw, want)) in enumerate(cases.items()):
        maps[f"{stem}.png"] = png(stripes(raw))
        target = train if stem.startswith("train") else val
        target[f"{stem}.jpg"] = jpeg(40 + i)
        expected["train" if target is train else "validation"][f"{stem}.jpg"] = stripes(want)
    write_zip(Path(manual_dir) / "stuffthingmaps_trainval2017.zip", maps)
    write_zip(Path(manual_dir) / "train2017.zip", train)
    write_zip(Path(manual_dir) / "val2017.zip", val)
    return expected


def make_coco_stuff_10k(manual_dir: Path) -> dict:
    """``cocostuff-10k-v1.1.zip`` with ``.mat`` labels (``S``: 0 = unlabeled, ids 1..182).

    Returns ``{num_classes: {split: {file_name: label}}}`` for the 171 and 182 spaces.
    """
    cases = {
        ("train", "COCO_train2014_000000000077"): (
            [0, 1, 12, 13],
            {171: [V, 0, V, 11], 182: [V, 0, 11, 12]},
        ),
        ("train", "COCO_train2014_000000000078"): (
            [92, 182, 183],
            {171: [80, 170, V], 182: [91, 181, V]},
        ),
        ("test", "COCO_train2014_000000000080"): (
            [91, 2],
            {171: [V, 1], 182: [90, 1]},
        ),
    }
    members = {}
    expected = {171: {"train": {}, "test": {}}, 182: {"train": {}, "test": {}}}
    for i, ((split, stem), (raw, want)) in enumerate(cases.items()):
        members[f"images/{stem}.jpg"] = jpeg(50 + i)
        members[f"annotations/{stem}.mat"] = savemat(
            {"S": stripes(raw), "names": np.array(["unlabeled"], dtype=object)}
        )
        for c in (171, 182):
            expected[c][split][f"images/{stem}.jpg"] = stripes(want[c])
    for split in ("train", "test"):
        stems = [stem for (s, stem) in cases if s == split]
        members[f"imageLists/{split}.txt"] = "".join(f"{s}\n" for s in stems).encode()
    members["imageLists/all.txt"] = "".join(f"{s}\n" for _, s in cases).encode()
    write_zip(Path(manual_dir) / "cocostuff-10k-v1.1.zip", members)
    return expected


def _box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[rows, cols] = 1
    return mask


def rle_compressed(mask: np.ndarray) -> dict:
    """COCO compressed RLE (``counts`` a string), as in the stuff and LVIS JSONs."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.reshape(-1, order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": [int(c) for c in counts]}


def _coco_image(image_id: int, folder: str) -> dict:
    return {
        "id": image_id,
        "height": H,
        "width": W,
        "coco_url": f"http://images.cocodataset.org/{folder}/{image_id:012d}.jpg",
    }


def make_coco_lvis(
    manual_dir: Path, *, blanket_cabinet: bool = False, bad_category: bool = False
) -> dict:
    """LVIS v1 JSONs, the stuff JSONs zip and COCO 2017 image zips for 3 images.

    Train image 1: LVIS polygon (cat 1) rows 2..9 x cols 4..19, then a compressed RLE
    (cat 1203) rows 6..13 x cols 12..27 that overlaps it (the polygon keeps the overlap), then an
    uncompressed RLE (cat 5) rows 20..29 x cols 0..9; stuff banner (92 -> LVIS 50 -> 49) fills
    rows 0..15 where no LVIS mask is, stuff "other" (183) stays void, the rest is void.
    Validation: image 2 (val2017) with a cat 1203 polygon and banner stuff everywhere else; image 3
    from train2017 with only stuff road (149 -> 1254 -> 1253) on its left half.

    ``blanket_cabinet``: image 3's right half also has stuff blanket (93, rows 0..15) and
    cabinet (98, rows 16..31), LVIS ids 110 and 181 (train ids 109, 180) in the returned
    labels. ``bad_category``: a fourth image (train) whose second LVIS annotation has category
    id 1300; it has no expected label (the builder must skip it).
    """
    categories = [  # LVIS's frequency labels, as in lvis_v1_*.json
        {"id": 1, "name": "aerosol_can", "frequency": "c"},
        {"id": 5, "name": "alcohol", "frequency": "r"},
        {"id": 50, "name": "banner", "frequency": "f"},
        {"id": 1203, "name": "zucchini", "frequency": "c"},
    ]
    poly = [[4, 2, 20, 2, 20, 10, 4, 10]]  # rows 2..9, cols 4..19 once rasterised
    train = {
        "images": [_coco_image(1, "train2017")],
        "categories": categories,
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": poly},
            {
                "id": 12,
                "image_id": 1,
                "category_id": 1203,
                "segmentation": rle_compressed(_box(slice(6, 14), slice(12, 28))),
            },
            {
                "id": 13,
                "image_id": 1,
                "category_id": 5,
                "segmentation": rle_uncompressed(_box(slice(20, 30), slice(0, 10))),
            },
        ],
    }
    val = {
        "images": [_coco_image(3, "train2017"), _coco_image(2, "val2017")],
        "categories": categories,
        "annotations": [
            {"id": 21, "image_id": 2, "category_id": 1203, "segmentation": poly},
        ],
    }
    stuff_train = {
        "annotations": [
            {
                "image_id": 1,
                "category_id": 92,
                "segmentation": rle_compressed(_box(slice(0, 16), slice(0, W))),
            },
            {
                "image_id": 1,
                "category_id": 183,
                "segmentation": rle_compressed(_box(slice(16, H), slice(30, W))),
            },
            {
                "image_id": 3,
                "category_id": 149,
                "segmentation": rle_compressed(_box(slice(0, H), slice(0, 24))),
            },
        ]
    }
    if blanket_cabinet:
        stuff_train["annotations"] += [
            {
                "image_id": 3,
                "category_id": 93,
                "segmentation": rle_compressed(_box(slice(0, 16), slice(24, W))),
            },
            {
                "image_id": 3,
                "category_id": 98,
                "segmentation": rle_compressed(_box(slice(16, H), slice(24, W))),
            },
        ]
    if bad_category:
        train["images"].append(_coco_image(4, "train2017"))
        train["annotations"] += [
            {"id": 14, "image_id": 4, "category_id": 1, "segmentation": poly},
            {"id": 15, "image_id": 4, "category_id": 1300, "segmentation": poly},
        ]
    stuff_val = {
        "annotations": [
            {
                "image_id": 2,
                "category_id": 92,
                "segmentation": rle_compressed(np.ones((H, W), np.uint8)),
            }
        ]
    }
    manual_dir = Path(manual_dir)
    write_zip(manual_dir / "lvis_v1_train.json.zip", {"lvis_v1_train.json": json.dumps(train)})
    (manual_dir / "lvis_v1_val.json").write_text(json.dumps(val))
    write_zip(
        manual_dir / "stuff_annotations_trainval2017.zip",
        {
            "annotations/stuff_train2017.json": json.dumps(stuff_train),
            "annotations/stuff_val2017.json": json.dumps(stuff_val),
            "annotations/stuff_train2017_pixelmaps.zip": b"not used",
        },
    )
    write_zip(
        manual_dir / "train2017.zip",
        {
            "train2017/000000000001.jpg": jpeg(60),
            "train2017/000000000003.jpg": jpeg(61),
            "train2017/000000000004.jpg": jpeg(63),
        },
    )
    write_zip(manual_dir / "val2017.zip", {"val2017/000000000002.jpg": jpeg(62)})

    one = np.full((H, W), V, np.uint16)
    one[0:16, :] = 49  # banner fills what LVIS left in rows 0..15
    one[6:14, 12:28] = 1202  # cat 1203 ...
    one[2:10, 4:20] = 0  # ... under the earlier polygon of cat 1
    one[20:30, 0:10] = 4  # cat 5 from the uncompressed RLE
    two = np.full((H, W), 49, np.uint16)
    two[2:10, 4:20] = 1202  # the LVIS polygon; banner stuff everywhere else
    three = np.full((H, W), V, np.uint16)
    three[:, 0:24] = 1253
    if blanket_cabinet:
        three[0:16, 24:] = 109
        three[16:, 24:] = 180
    return {
        "train": {"train2017/000000000001.jpg": one},
        "validation": {"val2017/000000000002.jpg": two, "train2017/000000000003.jpg": three},
    }
