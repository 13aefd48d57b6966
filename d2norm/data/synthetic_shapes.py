"""The embedded synthetic dataset: deterministic images of simple shapes with instance masks.

Two generators (``kind``):

* ``"easy"`` (the ``d2norm_shapes_*`` splits without "hard"): each image (default 128×128) has
  1–4 non-overlapping objects of three classes (circle, square, triangle), each a random size,
  rotation and colour on a noisy gradient background. Objects are drawn from the same polygon
  that becomes their mask, so masks and boxes are exact; masks are stored as polygons.
* ``"hard"`` (``d2norm_shapes_hard_*``, :func:`make_hard_image`): 1–5 objects of the same three
  classes whose sizes span a factor of 2.5 (log-uniform), that may overlap (later objects
  occlude earlier ones; every object keeps at least 70% of its area visible), on a noisy
  gradient with up to two unannotated clutter items (outlines, lines, dots). Calibrated for the
  small-batch study: harder variants (more classes, heavier clutter and occlusion) were not
  learned within its budget (docs/small_batch_study.md). Masks are the visible pixels (RLE),
  boxes their extent; Mask R-CNN on these splits needs ``INPUT.MASK_FORMAT "bitmask"``.

A split is generated once (a few seconds) into ``<root>/<split>/`` as PNG images plus a
COCO-format ``annotations.json``, written to a temporary folder and renamed into place, and is
then registered with detectron2 through ``register_coco_instances``.
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
    "HARD_SHAPE_CLASSES",
    "SPLITS",
    "SPLIT_KINDS",
    "classes_of",
    "default_data_root",
    "generate_split",
    "make_image",
    "make_hard_image",
    "draw_clutter",
    "noisy_gradient",
    "register_synthetic_datasets",
]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle")
HARD_SHAPE_CLASSES = SHAPE_CLASSES
FORMAT_VERSION = 1
#: version of the "hard" generator (part of the split's folder name and of the study's settings
#: id). 1: 64 px, 8 classes, 3-8 clutter items, blotchy background, noise over everything, objects
#: >= 50% visible, radii over 6x: not learned by the study's model within its budget (box AP 0.3
#: after 300 iterations). 2: the calibrated split of docs/small_batch_study.md.
HARD_VERSION = 2
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
    # the hard generator (make_hard_image): the small-batch study (d2norm.study, configs/synthetic/study/)
    "d2norm_shapes_hard_train": (1000, 11, 96),
    "d2norm_shapes_hard_val": (200, 12, 96),
    "d2norm_shapes_hard_quick_val": (50, 13, 96),
}
#: split name -> generator kind ("easy" where not listed)
SPLIT_KINDS = {
    "d2norm_shapes_hard_train": "hard",
    "d2norm_shapes_hard_val": "hard",
    "d2norm_shapes_hard_quick_val": "hard",
}
_KINDS = ("easy", "hard")


def classes_of(kind):
    """The class names of the generator ``kind`` ("easy" or "hard")."""
    if kind not in _KINDS:
        raise ValueError(f"Unknown synthetic generator kind {kind!r}. Fix: use one of {_KINDS}.")
    return SHAPE_CLASSES if kind == "easy" else HARD_SHAPE_CLASSES


def default_data_root():
    return os.environ.get("D2NORM_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "d2norm", "datasets"
    )


def _polygon(cls, cx, cy, r, angle):
    """Vertices (P×2, x y) of shape ``cls`` centred at (cx, cy) with circumradius r."""
    radii = None
    if cls == "circle":
        n = 32
        t = np.arange(n) * (2 * math.pi / n)
    elif cls == "square":
        t = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + angle
    elif cls == "triangle":  # equilateral
        t = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * math.pi + angle
    elif cls in ("pentagon", "hexagon"):
        n = 5 if cls == "pentagon" else 6
        t = np.arange(n) * (2 * math.pi / n) + angle
    elif cls == "star":  # five points, inner radius 0.45 r
        t = np.arange(10) * (math.pi / 5) + angle
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    elif cls == "rectangle":  # aspect ratio 2.4 : 1
        a = math.atan2(1.0, 2.4)
        t = np.array([a, math.pi - a, math.pi + a, 2 * math.pi - a]) + angle
    elif cls == "cross":  # a plus sign, arm half-width 0.3 r
        w = 0.3
        pts = np.array(
            [
                (w, 1),
                (w, w),
                (1, w),
                (1, -w),
                (w, -w),
                (w, -1),
                (-w, -1),
                (-w, -w),
                (-1, -w),
                (-1, w),
                (-w, w),
                (-w, 1),
            ]
        ) / math.hypot(1, w)
        t = np.arctan2(pts[:, 1], pts[:, 0]) + angle
        radii = np.hypot(pts[:, 0], pts[:, 1])
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    rr = r if radii is None else r * radii
    return np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], axis=1)


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


def _fill(shape, poly):
    """The pixels cv2.fillPoly paints for ``poly`` (the exact drawing rule of the images)."""
    import cv2

    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(
        m, [np.round(poly * 256).astype(np.int32).reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=8
    )
    return m.astype(bool)


def noisy_gradient(rng, size, base, slope, noise):
    """A size×size×3 uint8 background: per channel a base level uniform in ``base``, plus
    horizontal and vertical ramps with end-to-end change uniform in ±``slope``, plus Gaussian
    pixel noise of std ``noise``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = (
        rng.uniform(base[0], base[1], size=3)
        + xx[..., None] * rng.uniform(-slope, slope, size=3)
        + yy[..., None] * rng.uniform(-slope, slope, size=3)
    )
    return np.clip(img + rng.normal(0, noise, size=img.shape), 0, 255).astype(np.uint8)


def draw_clutter(img, rng, size, num_clutter):
    """Draw ``num_clutter`` (inclusive range) unannotated items into ``img`` in place: outlines
    (circles, rectangles), line segments and dots, each a random colour, position and size."""
    import cv2

    for _ in range(int(rng.integers(num_clutter[0], num_clutter[1] + 1))):  # clutter, never annotated
        color = tuple(int(c) for c in rng.uniform(40, 255, size=3))
        kind = int(rng.integers(4))
        cx, cy = (int(v) for v in rng.uniform(0, size, size=2))
        r = int(rng.uniform(0.03, 0.2) * size) + 1
        if kind == 0:
            cv2.circle(img, (cx, cy), r, color, thickness=int(rng.integers(1, 3)))
        elif kind == 1:
            cv2.rectangle(
                img, (cx - r, cy - r // 2), (cx + r, cy + r // 2), color, thickness=int(rng.integers(1, 3))
            )
        elif kind == 2:
            x2, y2 = (int(v) for v in rng.uniform(0, size, size=2))
            cv2.line(img, (cx, cy), (x2, y2), color, thickness=int(rng.integers(1, 4)))
        else:
            cv2.circle(img, (cx, cy), max(1, r // 4), color, thickness=-1)


def make_hard_image(rng, size, min_visible=0.7, radius=(0.1, 0.25), num_objects=(1, 5), num_clutter=(0, 2)):
    """One "hard" image (H×W×3 uint8, BGR) and its objects: list of (class index, visible mask).

    Background: a colour gradient with pixel noise (sigma 6); clutter: ``num_clutter``
    (inclusive range) unannotated outlines (circles, rectangles), line segments and dots. Then
    ``num_objects`` objects of :data:`HARD_SHAPE_CLASSES`, circumradius log-uniform in ``radius``
    × size, each drawn over the previous ones; a placement is redrawn (up to 30 times, else the
    object is dropped) if it would leave an earlier object, or itself, less than ``min_visible``
    of its area visible or smaller than 12 pixels. A mask is exactly the object's pixels that
    stay visible.
    """

    img = noisy_gradient(rng, size, base=(30, 120), slope=50, noise=6)
    draw_clutter(img, rng, size, num_clutter)

    objects = []  # (class, full mask, visible mask)
    lo, hi = math.log(radius[0]), math.log(radius[1])
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        for _attempt in range(30):
            r = math.exp(rng.uniform(lo, hi)) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            cls = int(rng.integers(len(HARD_SHAPE_CLASSES)))
            poly = _polygon(HARD_SHAPE_CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * math.pi))
            full = _fill(img.shape[:2], poly)
            if full.sum() < 12:
                continue
            visible = [vis & ~full for _, f, vis in objects]
            if all(
                v.sum() >= min_visible * f.sum() and v.sum() >= 12 for v, (_, f, _) in zip(visible, objects)
            ):
                break
        else:
            continue
        objects = [(c, f, v) for v, (c, f, _) in zip(visible, objects)]
        color = tuple(int(c) for c in rng.uniform(150, 255, size=3))
        img[full] = color
        objects.append((cls, full, full.copy()))
    return img, [(cls, vis) for cls, _, vis in objects]


def _mask_annotation(mask):
    """COCO fields (bbox of the pixels, area, compressed RLE) of a boolean mask."""
    from pycocotools import mask as mask_utils

    ys, xs = np.nonzero(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return {
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(mask.sum()),
        "segmentation": rle,
    }


def generate_split(root, name, num_images, seed, size, kind="easy"):
    """Write split ``name`` under ``root`` (if not already complete); return (json, image dir).

    ``kind``: the generator, "easy" (:func:`make_image`) or "hard" (:func:`make_hard_image`)."""
    import cv2

    classes = classes_of(kind)
    tag = "" if kind == "easy" else f"-{kind}{HARD_VERSION}"
    out_dir = os.path.join(root, f"{name}-v{FORMAT_VERSION}{tag}-n{num_images}-s{seed}-{size}px")
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
            img, objects = (make_image if kind == "easy" else make_hard_image)(rng, size)
            file_name = f"{i:05d}.png"
            cv2.imwrite(os.path.join(tmp, "images", file_name), img)
            images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
            for cls, shape in objects:
                ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1}
                if kind == "easy":  # shape: the polygon
                    x0, y0 = shape.min(axis=0)
                    x1, y1 = shape.max(axis=0)
                    ann.update(
                        bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        area=float(_polygon_area(shape)),
                        segmentation=[[float(v) for v in shape.reshape(-1)]],
                    )
                else:  # shape: the visible mask
                    ann.update(_mask_annotation(shape))
                ann["iscrowd"] = 0
                annotations.append(ann)
        coco = {
            "info": {"description": f"d2norm synthetic shapes, split {name}, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(classes)],
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
        kind = SPLIT_KINDS.get(name, "easy")
        json_file, image_dir = generate_split(root, name, num_images, seed, size, kind)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file", None) == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_dir)
        MetadataCatalog.get(name).set(thing_classes=list(classes_of(kind)))


def register_datasets(cfg):
    """Register the synthetic splits that ``cfg.DATASETS.TRAIN`` / ``TEST`` name (generating them
    if needed) under ``cfg.D2NORM.DATA.ROOT``; other names are left to detectron2's catalog."""
    names = [n for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if n.startswith("d2norm_shapes")]
    if names:
        register_synthetic_datasets(cfg.D2NORM.DATA.ROOT or None, names)
