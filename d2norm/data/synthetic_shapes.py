"""The embedded synthetic dataset: deterministic images of simple shapes with instance masks.

Each image (default 128×128) has 1–4 non-overlapping objects of three classes (circle, square,
triangle), each a random size, rotation and colour on a noisy gradient background. Objects are
drawn from the same polygon that becomes their mask, so masks and boxes are exact. A split is
generated once (a few seconds) into ``<root>/<split>/`` as PNG images plus a COCO-format
``annotations.json``, written to a temporary folder and renamed into place, and is then
registered with detectron2 through ``register_coco_instances``.
"""
import json
import logging
import math
import os
import shutil
import tempfile

import numpy as np

__all__ = [
    "SHAPE_CLASSES",
    "SPLITS",
    "default_data_root",
    "generate_split",
    "make_image",
    "register_synthetic_datasets",
]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle")
FORMAT_VERSION = 1
#: split name -> (number of images, seed, image size)
SPLITS = {
    "d2norm_shapes_train": (600, 1, 128),
    "d2norm_shapes_val": (100, 2, 128),
    "d2norm_shapes_tiny_train": (16, 3, 96),
    "d2norm_shapes_tiny_val": (8, 4, 96),
    # the small-batch study (tools/small_batch_study.py, configs/synthetic/study/)
    "d2norm_shapes_study_train": (200, 5, 96),
    "d2norm_shapes_study_val": (100, 6, 96),
    "d2norm_shapes_study_quick_val": (50, 7, 96),
}


def default_data_root():
    return os.environ.get("D2NORM_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "d2norm", "datasets"
    )


def _polygon(cls, cx, cy, r, angle):
    if cls == "circle":
        n = 32
        t = np.arange(n) * (2 * math.pi / n)
    elif cls == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + angle
    else:  # equilateral triangle
        t = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * math.pi + angle
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def make_image(rng, size):
    """One image (H×W×3 uint8, BGR) and its objects: list of (class index, polygon Px2)."""
    import cv2

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 120, size=3)
    slope = rng.uniform(-40, 40, size=(2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img = img + rng.normal(0, 6, size=img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)

    objects, discs = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            r = rng.uniform(0.08, 0.2) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 2) ** 2 for x, y, rr in discs):
                break
        else:
            continue
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        poly = _polygon(SHAPE_CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * math.pi))
        color = tuple(int(c) for c in rng.uniform(150, 255, size=3))
        # draw exactly the polygon that becomes the mask (sub-pixel vertices, 8 bits of fraction)
        pts = np.round(poly * 256).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(img, [pts], color, lineType=cv2.LINE_8, shift=8)
        discs.append((cx, cy, r))
        objects.append((cls, poly))
    return img, objects


def generate_split(root, name, num_images, seed, size):
    """Write split ``name`` under ``root`` (if not already complete); return (json, image dir)."""
    import cv2

    out_dir = os.path.join(root, f"{name}-v{FORMAT_VERSION}-n{num_images}-s{seed}-{size}px")
    json_file = os.path.join(out_dir, "annotations.json")
    image_dir = os.path.join(out_dir, "images")
    if os.path.isfile(json_file):
        return json_file, image_dir
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    except OSError as e:
        raise OSError(
            e.errno,
            f"Cannot write the synthetic dataset {name!r} under D2NORM.DATA.ROOT={root!r} "
            f"({e.strerror}: {e.filename!r}). Fix: set D2NORM.DATA.ROOT (or the environment "
            "variable D2NORM_DATA) to a writable directory, or to one that already holds the "
            "generated splits.",
        ) from None
    try:
        os.makedirs(os.path.join(tmp, "images"))
        rng = np.random.default_rng(seed)
        images, annotations = [], []
        for i in range(num_images):
            img, objects = make_image(rng, size)
            file_name = f"{i:05d}.png"
            cv2.imwrite(os.path.join(tmp, "images", file_name), img)
            images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
            for cls, poly in objects:
                x0, y0 = poly.min(axis=0)
                x1, y1 = poly.max(axis=0)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cls + 1,
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "area": float(_polygon_area(poly)),
                        "segmentation": [[float(v) for v in poly.reshape(-1)]],
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": f"d2norm synthetic shapes, split {name}, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)
            ],
        }
        with open(os.path.join(tmp, "annotations.json"), "w") as f:
            json.dump(coco, f)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished the same split first
            if not os.path.isfile(json_file):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Generated synthetic split %s (%d images) in %s", name, num_images, out_dir)
    return json_file, image_dir


def _polygon_area(poly):
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def register_synthetic_datasets(root=None, names=None):
    """Generate (if needed) and register the synthetic splits with detectron2. Idempotent.

    ``root``: where the splits live ("" or None: ``$D2NORM_DATA`` or ``~/.cache/d2norm/datasets``).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    root = root or default_data_root()
    for name in names or SPLITS:
        num_images, seed, size = SPLITS[name]
        json_file, image_dir = generate_split(root, name, num_images, seed, size)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file", None) == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_dir)
        MetadataCatalog.get(name).set(thing_classes=list(SHAPE_CLASSES))


def register_datasets(cfg):
    """Register the synthetic splits that ``cfg.DATASETS.TRAIN`` / ``TEST`` name (generating them
    if needed) under ``cfg.D2NORM.DATA.ROOT``; other names are left to detectron2's catalog."""
    names = [n for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if n.startswith("d2norm_shapes")]
    if names:
        register_synthetic_datasets(cfg.D2NORM.DATA.ROOT or None, names)
