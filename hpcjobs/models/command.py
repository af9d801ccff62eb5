"""``hpcjobs weights fetch NAME ...``: pretrained backbone weights into the Keras cache (``weights``)."""
from __future__ import annotations

from .weights import fetch


def add_arguments(parser):
    sub = parser.add_subparsers(dest="weights_command", required=True)
    f = sub.add_parser("fetch", help="download keras.applications imagenet weights into the Keras cache")
    f.add_argument("names", nargs="+", metavar="NAME", help="architectures, e.g. ResNet50 MobileNetV2")
    f.add_argument("--cache", help="cache folder (default $KERAS_HOME/models or ~/.keras/models)")
    f.add_argument("--base-url", help="a mirror serving BASE_URL/FILE instead of Keras' own origin")
    f.add_argument("--include-top", action="store_true", help="the weights with the ImageNet classifier")
    f.add_argument("--image-size", type=int, default=224, help="input size whose weights to fetch (MobileNet*)")


def cmd_weights(args) -> int:
    for name in args.names:
        fetch(name, args.cache, args.base_url, args.include_top, args.image_size)
    return 0
