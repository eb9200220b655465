"""`ncguard data SPEC`: read a data SPEC and describe it, to check a SPEC before training on it."""

from __future__ import annotations

import argparse

from ..data import Dataset, load_dataset


def describe(dataset: Dataset) -> str:
    """A short human-readable summary: name, size, input layout and per-class counts."""
    shape = " x ".join(str(d) for d in dataset.input_shape)
    lines = [
        f"name:         {dataset.name}",
        f"samples:      {len(dataset)}",
        f"input shape:  {shape}",
        f"input scale:  {dataset.input_scale:g}",
        f"classes:      {len(dataset.classes)}",
    ]
    width = max(len(name) for name in dataset.classes)
    for index, (name, count) in enumerate(zip(dataset.classes, dataset.class_counts())):
        lines.append(f"  {index:>3}  {name:<{width}}  {count:>8}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="data SPEC: fashion-mnist[:train|:test], digits[:train|:test], FILE.npz or an image folder")


def run(args: argparse.Namespace) -> int:
    print(describe(load_dataset(args.spec)))
    return 0
