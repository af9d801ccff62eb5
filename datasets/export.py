"""Turn the offline real datasets into hpcjobs sources of every kind.

    python datasets/export.py digits folder data/digits        # data/digits/<class>/<i>.png
    python datasets/export.py lfw csv data/lfw                 # PNGs plus data/lfw/list.csv (path,label)
    python datasets/export.py lfw json data/lfw                # PNGs plus data/lfw/list.json
    python datasets/export.py fashion-mnist npz data/fmnist.npz  # images, labels, class_names

The built-in names (digits: scikit-learn's load_digits; lfw: scikit-image's
lfw_subset; fashion-mnist: Debian's dataset-fashion-mnist IDX files) can also be used
directly as `data.source`; these recipes are for trying the folder, listing and npz
readers on real images, or for handing the data to other tools.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=["digits", "lfw", "fashion-mnist"])
    ap.add_argument("kind", choices=["folder", "csv", "json", "npz"])
    ap.add_argument("out")
    ap.add_argument("--limit", type=int, default=None, help="only the first N samples")
    args = ap.parse_args(argv)

    from hpcjobs.data.images import to_uint8
    from hpcjobs.data.sources import open_source

    s = open_source(args.dataset)
    n = len(s) if args.limit is None else min(args.limit, len(s))
    if args.kind == "npz":
        images = np.stack([to_uint8(np.asarray(s.load(i))) for i in range(n)])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.savez_compressed(args.out, images=images, labels=s.labels[:n], class_names=np.array(s.class_names))
        print(f"wrote {n} samples to {args.out}")
        return 0
    from PIL import Image

    rows = []
    for i in range(n):
        name = s.class_names[s.labels[i]].replace("/", "-")
        rel = os.path.join(name, f"{i:05d}.png")
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        img = to_uint8(np.asarray(s.load(i)))
        Image.fromarray(img.squeeze()).save(os.path.join(args.out, rel))
        rows.append((rel, s.class_names[s.labels[i]]))
    if args.kind == "csv":
        with open(os.path.join(args.out, "list.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(rows)
    elif args.kind == "json":
        with open(os.path.join(args.out, "list.json"), "w") as f:
            json.dump([{"path": p, "label": label} for p, label in rows], f)
    print(f"wrote {n} images under {args.out}" + ("" if args.kind == "folder" else f" and list.{args.kind}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
