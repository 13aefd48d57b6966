#!/usr/bin/env python
"""Download a recipe's pretrained file to the path it expects, verifying the published checksum.

    python tools/download_weights.py resnet50-19c8e357.pth
    python tools/download_weights.py COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml
    python tools/download_weights.py --all           # every file with a public download
    python tools/download_weights.py --list

NAME is a file of docs/weights.md (``R-50.pkl``, ``pretrained/R-50.pkl``) or a recipe, whose
``MODEL.WEIGHTS`` is fetched. The file goes to ``<root>/pretrained/<file>`` (``--root``, default
the working directory, from which the recipes are run). A file already there is not downloaded
again: it is verified, or refused if it does not match. Where a checksum is published (torchvision
and OpenMMLab put the first 8 hex digits of the SHA-256 in the file name) the download must match
it; where none is (Detectron's .pkl files) the SHA-256 is printed and said to be unverified.
"""

import argparse
import sys

from d2norm.download import PRETRAINED, ChecksumError, NotDownloadableError, download


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("names", nargs="*", help="files or recipes (see above)")
    p.add_argument("--root", default=".", help="the directory the recipes are run from")
    p.add_argument("--url", default=None, help="a mirror to download from (one NAME only)")
    p.add_argument("--all", action="store_true", help="every file that has a public download")
    p.add_argument("--list", action="store_true", help="list the files, their sources and checksums")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for f in PRETRAINED.values():
            check = f"checksum {f.sha256_prefix} ({f.checksum_source})" if f.sha256_prefix else "no checksum"
            print(f"{f.path}: {f.url or f.how}; {check}")
        return []
    names = [f.name for f in PRETRAINED.values() if f.url] if args.all else args.names
    if not names:
        sys.exit("download_weights: name a file or a recipe, or pass --all / --list")
    if args.url and len(names) != 1:
        sys.exit("download_weights: --url needs exactly one NAME")
    return [download(name, root=args.root, url=args.url) for name in names]


if __name__ == "__main__":
    try:
        main()
    except (ChecksumError, NotDownloadableError, ValueError, OSError) as e:
        sys.exit(f"download_weights: {e}")
