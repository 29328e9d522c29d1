#!/usr/bin/env python
"""Write a synthetic COCO-format detection data set (drawn rectangles and ellipses, one class per
shape/colour) in the COCO 2017 layout, for offline demos and tests:

    python scripts/make_synthetic_coco.py data/coco_synthetic --train 64 --val 16
    kdrun train task=detection dataset=coco dataset.root=data/coco_synthetic dataset.num_classes=4 ...

(``dataset=coco_synthetic`` generates and caches one by itself.) Importable too:
``from make_synthetic_coco import make_synthetic_coco`` (the function lives in
:mod:`kdrun.data.coco`, so the data builder can use it without this script).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kdrun.data.coco import make_synthetic_coco

__all__ = ["make_synthetic_coco", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="output folder (gets train2017/, val2017/, annotations/)")
    ap.add_argument("--train", type=int, default=64, help="training images")
    ap.add_argument("--val", type=int, default=16, help="validation images")
    ap.add_argument("--image-size", type=int, default=128, help="image side (each side varies by +-25%%)")
    ap.add_argument("--classes", type=int, default=3, help="shape classes (category ids 1..N)")
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-equals-train", action="store_true", help="val split = the training images")
    args = ap.parse_args(argv)
    root = make_synthetic_coco(args.root, num_train=args.train, num_val=args.val, image_size=args.image_size,
                               num_classes=args.classes, max_objects=args.max_objects, seed=args.seed,
                               val_equals_train=args.val_equals_train)
    print(f"wrote {root} ({args.train} train / {args.val} val images, {args.classes} classes; "
          f"detector num_classes={args.classes + 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
