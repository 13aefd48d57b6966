"""Whether two models give the same detections: the check behind "folding changes nothing".

Used by ``tools/deploy.py`` (folded vs unfolded weights) and the tests; the tolerances live here
only.
"""

import torch

__all__ = ["SAME_DETECTIONS_TOLERANCE", "compare_detections"]

#: Same detections, in float32: largest allowed |Δ box coordinate| in pixels, |Δ score|, and
#: fraction of mask pixels that differ (over all matched instances of an image).
SAME_DETECTIONS_TOLERANCE = {"box_px": 1e-2, "score": 1e-4, "mask_pixel_fraction": 1e-3}


def _box_linf(a, b):
    return (a[:, None, :] - b[None, :, :]).abs().amax(-1)


def compare_detections(ref, new, tol=SAME_DETECTIONS_TOLERANCE):
    """Compare two models' detections on the same images (``ref``, ``new``: one ``Instances`` per
    image). Each reference detection is matched to the new detection of the same class with the
    closest box. Detections left unmatched are allowed only at the score cut (within
    ``tol["score"]`` of the lowest kept score: a near-tie at top-k).

    Returns ``{"ok", "max_diff", "counts", "tolerance"}``: ``ok`` when nothing is unmatched away
    from the cut and every largest difference is within ``tol``."""
    worst = {"box_px": 0.0, "score": 0.0, "mask_pixel_fraction": 0.0}
    counts = {"reference": 0, "folded": 0, "matched": 0, "unmatched_at_cut": 0, "unmatched": 0}
    for a, b in zip(ref, new):
        counts["reference"] += len(a)
        counts["folded"] += len(b)
        used = torch.zeros(len(b), dtype=torch.bool)
        pairs = []
        if len(a) and len(b):
            dist = _box_linf(a.pred_boxes.tensor.double(), b.pred_boxes.tensor.double())
            dist[a.pred_classes[:, None] != b.pred_classes[None, :]] = float("inf")
            for i in range(len(a)):
                d = dist[i].clone()
                d[used] = float("inf")
                j = int(d.argmin())
                if torch.isfinite(d[j]) and d[j] <= tol["box_px"] * 100:
                    used[j] = True
                    pairs.append((i, j))
        matched_a = {i for i, _ in pairs}
        unmatched = [(a.scores, i) for i in range(len(a)) if i not in matched_a]
        unmatched += [(b.scores, j) for j in range(len(b)) if not used[j]]
        for scores, k in unmatched:
            at_cut = float(scores[k]) <= float(scores.min()) + tol["score"]
            counts["unmatched_at_cut" if at_cut else "unmatched"] += 1
        counts["matched"] += len(pairs)
        if not pairs:
            continue
        ia = torch.tensor([i for i, _ in pairs])
        ib = torch.tensor([j for _, j in pairs])
        worst["box_px"] = max(
            worst["box_px"],
            float((a.pred_boxes.tensor[ia].double() - b.pred_boxes.tensor[ib].double()).abs().max()),
        )
        worst["score"] = max(worst["score"], float((a.scores[ia] - b.scores[ib]).abs().max()))
        if a.has("pred_masks"):
            differ = (a.pred_masks[ia] != b.pred_masks[ib]).double().mean()
            worst["mask_pixel_fraction"] = max(worst["mask_pixel_fraction"], float(differ))
    ok = counts["unmatched"] == 0 and all(worst[k] <= tol[k] for k in tol)
    return {"ok": ok, "max_diff": worst, "counts": counts, "tolerance": dict(tol)}
