r"""Peak memory of preparing COCO+LVIS from annotation JSONs the size of LVIS v1 train.

Generates in ``--workdir`` an LVIS-format ``lvis_v1_train.json`` with ``--images`` images and
``--annotations`` annotations (LVIS v1 train's counts by default: 100 000 images, 1.27 M
annotations; polygons of ``--vertices`` points, about 1 GB of JSON at the defaults, the order
of the real file's size),
a small ``lvis_v1_val.json``, the stuff JSONs (``--stuff_per_image`` compressed-RLE stuff
annotations per image) in ``stuff_annotations_trainval2017.zip``, and tiny JPEGs (8×8, one
shared image) in ``train2017.zip``/``val2017.zip``. Then it runs, in a child process, either
the whole preparation (``--stage prepare``: ``python -m jaxscaleseg.data.prepare coco_lvis``)
or only the part whose memory would grow with the JSONs (``--stage index``: streaming the
train JSONs into the annotation index, as the builder does before its first example), or the
old way for comparison (``--stage json_load``: ``json.load`` of the LVIS JSON and its
annotations grouped by image), and prints the child's peak RSS (``ru_maxrss``) with the file
sizes. ``--scale`` divides the image and annotation counts.

    python -m benchmarks.lvis_prep_memory --workdir /tmp/lvis_mem --stage index
    python -m benchmarks.lvis_prep_memory --workdir /tmp/lvis_mem10 --scale 10 --stage prepare
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

SIDE = 8  # image height and width


def _jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _polygons(count: int, vertices: int, rng) -> list[str]:
    """``count`` polygon JSON texts (one ring of ``vertices`` points inside the image)."""
    out = []
    for _ in range(count):
        angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radius = rng.uniform(1.0, SIDE / 2 - 0.5, vertices)
        cx, cy = rng.uniform(3, SIDE - 3, 2)
        xs, ys = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
        coords = np.clip(np.stack([xs, ys], 1).ravel(), 0, SIDE - 0.01)
        out.append("[[" + ",".join(f"{v:.2f}" for v in coords) + "]]")
    return out


def _stuff_rles(count: int, rng) -> list[str]:
    from pycocotools import mask as mask_utils

    out = []
    for _ in range(count):
        mask = np.asfortranarray((rng.random((SIDE, SIDE)) < 0.3).astype(np.uint8))
        rle = mask_utils.encode(mask)
        out.append(json.dumps({"size": [SIDE, SIDE], "counts": rle["counts"].decode()}))
    return out


def _image(image_id: int, folder: str) -> str:
    return json.dumps({
        "id": image_id, "height": SIDE, "width": SIDE, "license": 1,
        "coco_url": f"http://images.cocodataset.org/{folder}/{image_id:012d}.jpg",
        "flickr_url": f"http://farm.example/{image_id}.jpg", "date_captured": "2013-11-14",
        "neg_category_ids": [], "not_exhaustive_category_ids": [],
    })  # fmt: skip


def write_lvis_json(path: Path, image_ids, folder: str, annotations: int, vertices: int, rng):
    """Writes an LVIS-format JSON piece by piece (never whole in memory)."""
    polygons = _polygons(1000, vertices, rng)
    image_ids = np.asarray(image_ids)
    owners = rng.choice(image_ids, annotations)
    categories = rng.integers(1, 1204, annotations)
    with open(path, "w") as f:
        f.write('{"info": {"description": "generated"}, "images": [')
        f.write(",".join(_image(int(i), folder) for i in image_ids))
        f.write('], "categories": [')
        f.write(",".join(json.dumps({"id": c, "name": f"class_{c}", "frequency": "cfr"[c % 3]})
                         for c in range(1, 1204)))  # fmt: skip
        f.write('], "annotations": [')
        for start in range(0, annotations, 10_000):
            f.write("," if start else "")
            f.write(",".join(
                f'{{"id": {a + 1}, "image_id": {int(owners[a])}, "category_id": '
                f'{int(categories[a])}, "area": 12.5, "bbox": [1.0, 1.0, 4.0, 4.0], '
                f'"segmentation": {polygons[a % len(polygons)]}}}'
                for a in range(start, min(start + 10_000, annotations))
            ))  # fmt: skip
        f.write("]}")


def write_stuff_json(image_ids, per_image: int, rng) -> str:
    rles = _stuff_rles(200, rng)
    parts = []
    n = 0
    for image_id in image_ids:
        for stuff_id in rng.choice(np.arange(92, 183), per_image, replace=False):
            n += 1
            parts.append(f'{{"id": {n}, "image_id": {int(image_id)}, "category_id": '
                         f'{int(stuff_id)}, "segmentation": {rles[n % len(rles)]}}}')  # fmt: skip
    return '{"images": [], "annotations": [' + ",".join(parts) + "]}"


def generate(workdir: Path, images: int, annotations: int, vertices: int, stuff: int) -> dict:
    """Writes the manual directory; returns the files' sizes in bytes."""
    manual = workdir / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_ids = np.arange(1, images + 1)
    val_ids = np.arange(images + 1, images + 51)
    write_lvis_json(manual / "lvis_v1_train.json", train_ids, "train2017", annotations,
                    vertices, rng)  # fmt: skip
    write_lvis_json(manual / "lvis_v1_val.json", val_ids, "val2017", 500, vertices, rng)
    with zipfile.ZipFile(manual / "stuff_annotations_trainval2017.zip", "w") as zf:
        zf.writestr("annotations/stuff_train2017.json", write_stuff_json(train_ids, stuff, rng))
        zf.writestr("annotations/stuff_val2017.json", write_stuff_json(val_ids, stuff, rng))
    jpeg = _jpeg()
    for folder, ids in (("train2017", train_ids), ("val2017", val_ids)):
        with zipfile.ZipFile(manual / f"{folder}.zip", "w") as zf:
            for i in ids:
                zf.writestr(f"{folder}/{int(i):012d}.jpg", jpeg)
    with zipfile.ZipFile(manual / "stuff_annotations_trainval2017.zip") as zf:
        stuff_sizes = {i.filename: i.file_size for i in zf.infolist()}
    return {
        "lvis_v1_train.json": (manual / "lvis_v1_train.json").stat().st_size,
        "lvis_v1_val.json": (manual / "lvis_v1_val.json").stat().st_size,
        **{Path(k).name: v for k, v in stuff_sizes.items()},
        "train2017.zip": (manual / "train2017.zip").stat().st_size,
    }


_INDEX_CHILD = """
import sys, tempfile
from pathlib import Path
from jaxscaleseg.data.builders import coco_lvis
manual = Path(sys.argv[1])
stuff = {f: (manual / "stuff_annotations_trainval2017.zip", f"annotations/stuff_{f}.json")
         for f in ("train2017", "val2017")}
with tempfile.TemporaryDirectory() as tmp:
    entries, index = coco_lvis.index_annotations(
        (manual / "lvis_v1_train.json", "lvis_v1_train.json"), stuff, Path(tmp) / "i.sqlite")
    n = sum(len(index.get("lvis", e["id"])) for e in entries[:1000])
    index.close()
print(f"indexed {len(entries)} images; first 1000 images hold {n} LVIS annotations")
"""

_JSON_LOAD_CHILD = """
import collections, json, sys
data = json.load(open(sys.argv[1] + "/lvis_v1_train.json"))
grouped = collections.defaultdict(list)
for ann in data["annotations"]:
    grouped[ann["image_id"]].append(ann)
print(f"loaded {len(data['images'])} images, {len(data['annotations'])} annotations")
"""


def run_child(stage: str, workdir: Path) -> tuple[float, float, str]:
    """Runs one stage in a child process; returns (peak RSS in GiB, seconds, its output)."""
    manual = workdir / "manual"
    if stage == "prepare":
        data = workdir / "data"
        cmd = [sys.executable, "-m", "jaxscaleseg.data.prepare", "coco_lvis",
               "--manual_dir", str(manual), "--data_dir", str(data)]  # fmt: skip
    elif stage == "index":
        cmd = [sys.executable, "-c", _INDEX_CHILD, str(manual)]
    else:
        cmd = [sys.executable, "-c", _JSON_LOAD_CHILD, str(manual)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return peak_kib / 2**20, seconds, proc.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--stage", choices=("index", "prepare", "json_load"), default="index")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--annotations", type=int, default=1_270_000)
    parser.add_argument("--vertices", type=int, default=72)
    parser.add_argument("--stuff_per_image", type=int, default=7)
    parser.add_argument("--scale", type=int, default=1, help="divide images and annotations")
    args = parser.parse_args(argv)
    images, annotations = args.images // args.scale, args.annotations // args.scale
    stamp = args.workdir / "manual" / f"generated_{images}_{annotations}_{args.vertices}"
    t0 = time.perf_counter()
    if not stamp.exists():
        sizes = generate(args.workdir, images, annotations, args.vertices, args.stuff_per_image)
        stamp.write_text(json.dumps(sizes))
        print(f"generated in {time.perf_counter() - t0:.0f} s", flush=True)
    sizes = json.loads(stamp.read_text())
    peak, seconds, last = run_child(args.stage, args.workdir)
    print(f"{images} images, {annotations} annotations; files: "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))  # fmt: skip
    print(f"stage {args.stage}: peak RSS {peak:.2f} GiB, {seconds:.0f} s ({last})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
