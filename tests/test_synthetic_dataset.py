"""The embedded dataset: masks match boxes and pixels; COCO json round-trips through pycocotools."""

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from d2norm.data.synthetic_shapes import SHAPE_CLASSES, generate_split, make_image


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    return generate_split(root, "test_split", 12, seed=7, size=96)


def test_masks_match_boxes_and_pixels(split):
    import cv2

    json_file, image_dir = split
    coco = COCO(json_file)
    assert len(coco.getImgIds()) == 12 and len(coco.getAnnIds()) >= 12
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        m = coco.annToMask(ann).astype(bool)
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        # rasterized mask spans the box (to within the pixel grid; sharp triangle tips may lose a pixel)
        assert abs(xs.min() - x) <= 2.0 and abs(ys.min() - y) <= 1.0
        assert abs(xs.max() + 1 - (x + w)) <= 2.0 and abs(ys.max() + 1 - (y + h)) <= 2.0
        # area field agrees with the rasterized mask
        assert abs(m.sum() - ann["area"]) <= 0.1 * ann["area"] + 10
        # the object was drawn in one colour: pixels well inside the mask are (nearly) uniform
        image = cv2.imread(os.path.join(image_dir, img["file_name"]))
        inner = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if inner.sum() > 10:
            assert image[inner].std(axis=0).max() < 1.0
        assert 1 <= ann["category_id"] <= len(SHAPE_CLASSES)


def test_coco_json_round_trip(split):
    json_file, _ = split
    data = json.load(open(json_file))
    coco = COCO(json_file)
    # every annotation converts to RLE and back to the same box
    for ann in data["annotations"]:
        rle = coco.annToRLE(ann)
        np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"], atol=2.0)
    # a perfect detection set scores AP = 1 with pycocotools' evaluator
    from pycocotools.cocoeval import COCOeval

    dets = [
        dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0)
        for a in data["annotations"]
    ]
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] > 0.99


def test_generation_is_deterministic(tmp_path):
    a = np.random.default_rng(3)
    b = np.random.default_rng(3)
    for _ in range(3):
        ia, oa = make_image(a, 64)
        ib, ob = make_image(b, 64)
        assert np.array_equal(ia, ib) and len(oa) == len(ob)
    j1, _ = generate_split(str(tmp_path / "a"), "s", 4, seed=5, size=64)
    j2, _ = generate_split(str(tmp_path / "b"), "s", 4, seed=5, size=64)
    assert open(j1).read() == open(j2).read()


def test_registered_with_detectron2(data_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dicts = DatasetCatalog.get("d2norm_shapes_tiny_train")
    assert len(dicts) == 16
    meta = MetadataCatalog.get("d2norm_shapes_tiny_train")
    assert meta.thing_classes == list(SHAPE_CLASSES)
    assert meta.evaluator_type == "coco"
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        for a in d["annotations"]:
            assert 0 <= a["category_id"] < len(SHAPE_CLASSES)
