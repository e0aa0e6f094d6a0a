"""Benchmark datasets (mmsegmentation on-disk layouts), evaluation settings, the mIoU metric, COCO-Object."""

from .coco_object import convert_coco_object
from .datasets import (DATASETS, IGNORE_INDEX, SegDataset, build_dataset, collate, find_dataset_root, load_classnames,
                       parse_classnames, read_image, read_label)
from .metrics import IoUAccumulator, atomic_write_text, format_table, write_csv, write_json
from .settings import DATASET_NAMES, DATASET_SETTINGS, PRESETS, EvalSettings, canonical_dataset_name, get_settings

__all__ = ["DATASETS", "DATASET_NAMES", "DATASET_SETTINGS", "EvalSettings", "IGNORE_INDEX", "IoUAccumulator", "PRESETS",
           "SegDataset", "atomic_write_text", "build_dataset", "canonical_dataset_name", "collate", "convert_coco_object",
           "find_dataset_root", "format_table", "get_settings", "load_classnames", "parse_classnames", "read_image",
           "read_label", "write_csv", "write_json"]
