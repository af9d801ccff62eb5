"""Writes the hostile-input corpus beside this file (issue 17); tests/test_hostile.py runs it.

    python tests/data/hostile/make_corpus.py     # rewrite the committed files

Each config here must be refused by `hpcjobs prepare` with exit 2 and one line; the
images must be skipped and listed by `prepare` (and fail it with --strict).  The test
checks that the committed files are exactly what this script writes.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def _bomb(levels: int = 9, width: int = 9) -> str:
    """A billion-laughs mapping: 9^9 values once the aliases are expanded."""
    lines = ["a0: &a0 {k: x}"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(width)) + "}")
    return "\n".join(lines) + "\n"


CONFIGS = {
    # duplicate keys: YAML would silently keep the last one
    "dup_section.yaml": "training:\n  batch_size: 16\nmodel:\n  dropout: 0.1\ntraining:\n  epochs: 2\n",
    "dup_key.yaml": "training:\n  epochs: 2\n  seed: 1\n  epochs: 3\n",
    "dup_flow.yaml": "data: {seed: 1, seed: 2}\n",
    # nesting and aliases
    "deep_list.yaml": "training:\n  batch_size: " + "[" * 20000 + "]" * 20000 + "\n",
    "deep_map.yaml": "data: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    "alias_bomb.yaml": _bomb(),
    "alias_bomb_via_base.yaml": "base: alias_bomb.yaml\n" + _bomb(),
    "alias_bomb_in_base.yaml": "base: alias_bomb.yaml\ntraining: {epochs: 1}\n",
    "alias_cycle.yaml": "slurm:\n  modules: &m [a, *m]\n",
    # numbers
    "nan_learning_rate.yaml": "optimizer:\n  learning_rate: .nan\n",
    "inf_every_minutes.yaml": "checkpoint:\n  every_minutes: .inf\n",
    "minus_inf_dropout.yaml": "model:\n  dropout: -.inf\n",
    "float_overflow.yaml": "data:\n  validation_split: 1e999\n",
    "int_as_huge_float.yaml": "optimizer:\n  learning_rate: 1" + "0" * 400 + "\n",
    "int_overflow.yaml": "training:\n  epochs: 100000000000000000000000\n",
    "seed_negative.yaml": "data:\n  seed: -5\n",
    "seed_too_big.yaml": "training:\n  seed: 4294967296\n",
    "image_size_huge.yaml": "data:\n  image_size: [100000, 100000]\n",
    "zoom_one.yaml": "data:\n  augment: {zoom: 1.0}\n",
    # model names
    "arch_dunder.yaml": "model:\n  arch: __class__\n",
    "arch_dotted.yaml": "model:\n  arch: os.system\n",
    "arch_submodule.yaml": "model:\n  arch: resnet50\n",
    "arch_typo.yaml": "model:\n  arch: ResNet5O\n",
    # settings other settings make impossible
    "val_monitor_without_split.yaml": "data:\n  validation_split: 0\n"
                                      "training:\n  early_stopping: {patience: 3, monitor: val_accuracy}\n",
    "weights_for_builtin.yaml": "model:\n  arch: simple_cnn\n  weights: imagenet.h5\n",
    "freeze_random_backbone.yaml": "model:\n  arch: MobileNetV2\n  freeze_backbone: true\n",
    "momentum_for_adam.yaml": "optimizer:\n  name: adam\n  momentum: 0.9\n",
    "store_is_source.yaml": "data:\n  source: faces.npz\n  store: ./faces.npz\n",
    # shapes and syntax
    "python_tag.yaml": "name: !!python/object/apply:os.system ['echo pwned']\n",
    "top_level_list.yaml": "- training\n- epochs\n",
    "tab_indent.yaml": "training:\n\tepochs: 2\n",
    "unknown_section.yaml": "trainig:\n  epochs: 2\n",
    "section_as_list.yaml": "training: [1, 2]\n",
    "name_with_slash.yaml": "name: ../../etc/passwd\n",
    "base_missing.yaml": "base: nowhere.yaml\n",
    "base_circular.yaml": "base: base_circular.yaml\n",
    "base_not_a_name.yaml": "base: [a, b]\n",
}
BINARY = {
    "not_utf8.yaml": b"training:\n  epochs: \xff\xfe\n",
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, rows: bytes | None, depth: int = 8) -> bytes:
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0))
    idat = _png_chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + _png_chunk(b"IEND", b"")


def _gif(width: int, height: int) -> bytes:
    screen = struct.pack("<HH", width, height) + b"\0\0\0"
    return b"GIF89a" + screen + b",\0\0\0\0" + struct.pack("<HH", width, height) + b"\0\2\2D\1\0;"


IMAGES = {
    "images/bomb.png": _png(100_000, 100_000, b"\0" * 64),  # claims 10^10 pixels
    "images/bomb.gif": _gif(65535, 65535),  # 4 x 10^9 pixels
    "images/zero_size.png": _png(0, 0, b""),
    "images/bit_depth_7.png": _png(4, 4, b"\0" * 20, depth=7),
    "images/no_pixel_data.png": _png(4, 4, None),
    "images/short_rows.png": _png(64, 64, b"\0" * 10),  # fewer pixels than the header says
    "images/zero.png": b"",
    "images/text.png": b"this is not an image\n",
    "images/header_only.png": b"\x89PNG\r\n\x1a\n",
}


def corpus() -> dict[str, bytes]:
    files = {name: text.encode() for name, text in CONFIGS.items()}
    files.update(BINARY)
    files.update(IMAGES)
    return files


def write(folder: str = HERE):
    for name, data in corpus().items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else HERE)
