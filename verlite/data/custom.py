"""A user's own dataset class (verl's data.custom_cls.path / name).

The class is built as verl builds it, `cls(parquet_files=..., tokenizer=..., config=...,
max_samples=...)`, with `config` the `data:` section as an OmegaConf DictConfig. Each item is
a dict with `input_ids`, `loss_mask` and optionally `attention_mask` (right-padded tensors,
as verl's datasets return them); padding is dropped and the samples join verlite's batching.
`loss_mask[t] = 1` means token t is predicted with loss, which is how verl's trainer reads it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from verlite.config.schema import DataConfig
from verlite.config.user_code import load_custom_cls
from verlite.data.formatting import Encoded
from verlite.errors import VerliteError


def _as_list(value, name: str, where: str) -> list[int]:
    if value is None:
        raise VerliteError(f"{where}: the item has no '{name}'; a custom dataset returns input_ids and loss_mask")
    return np.asarray(value.tolist() if hasattr(value, "tolist") else value).reshape(-1).astype(np.int64).tolist()


def load_custom_dataset(files: list[str], cfg: DataConfig, tokenizer, max_samples: int):
    from omegaconf import OmegaConf

    from verlite.data.dataset import SFTDataset

    cls = load_custom_cls(cfg.custom_cls.path, cfg.custom_cls.name)
    name = f"{cfg.custom_cls.name} ({cfg.custom_cls.path})"
    try:
        dataset = cls(parquet_files=list(files), tokenizer=tokenizer,
                      config=OmegaConf.create(dataclasses.asdict(cfg)), max_samples=max_samples)
    except TypeError as e:
        raise VerliteError(f"data.custom_cls: {name} cannot be built as cls(parquet_files, tokenizer, config, "
                           f"max_samples): {e}") from None
    ds = SFTDataset()
    for i in range(len(dataset)):
        where = f"{name} item {i}"
        item = dataset[i]
        if not isinstance(item, dict):
            raise VerliteError(f"{where}: expected a dict with input_ids and loss_mask, got {type(item).__name__}")
        ids = _as_list(item.get("input_ids"), "input_ids", where)
        mask = _as_list(item.get("loss_mask"), "loss_mask", where)
        keep = _as_list(item["attention_mask"], "attention_mask", where) if "attention_mask" in item else [1] * len(ids)
        if not len(ids) == len(mask) == len(keep):
            raise VerliteError(f"{where}: input_ids, loss_mask and attention_mask differ in length")
        ds.add(Encoded([t for t, k in zip(ids, keep) if k], [int(m > 0) for m, k in zip(mask, keep) if k]), cfg, where)
    if not len(ds):
        raise VerliteError(f"data.custom_cls: {name} produced no samples")
    return ds
