"""Batches of materials: every configured modality prepared once, collated per batch in loader workers.

A batch is a plain dict (so ``pin_memory`` and ``.to(device)`` walk it)::

    {"rows":   (B,) int64 row numbers in the table,
     "masks":  {modality: (B,) bool, True where the sample has it (after modality dropout)},
     "inputs": {modality: that modality's collated inputs, for the masked-in rows only},
     "targets": (B, P) float32 standardised properties, NaN where unknown (only for a MaterialSet made with
                ``predict``, the model spec's property list and train-split mean and std)}

A modality that no sample of the batch has is left out of ``inputs``. A modality whose deterministic
view of a material is several items (a material's several synthesis texts) adds ``inputs[m]["items"]``, the
row of each item; the model pools them per row after its projection head (:func:`pool_items`). The order of batches and
everything random inside one (text sampling, modality dropout) is seeded by (seed, epoch, step, rank):
a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context, Prepared


#: The key of a modality's collated inputs that maps each item to its row (several items per row).
ITEMS = "items"


def encoder_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A modality's collated inputs as its encoder takes them (without :data:`ITEMS`)."""
    return {k: v for k, v in inputs.items() if k != ITEMS} if ITEMS in inputs else inputs


def pool_items(x: torch.Tensor, inputs: dict[str, torch.Tensor], normalise: bool = False) -> torch.Tensor:
    """``x`` (one row per item) pooled into one row per material where the inputs have :data:`ITEMS`: the
    normalised sum of unit vectors (``normalise``: the direction of their mean), else the mean."""
    items = inputs.get(ITEMS)
    if items is None:
        return x
    rows = int(items[-1]) + 1  # items are grouped by row, every row has one or more
    total = x.new_zeros(rows, x.shape[1]).index_add_(0, items, x)
    if normalise:
        return torch.nn.functional.normalize(total, dim=-1)
    return total / torch.bincount(items, minlength=rows).clamp_min(1).to(x.dtype)[:, None]


class MaterialSet:
    """The rows of one processed table with every configured modality prepared."""

    def __init__(self, table: pa.Table, specs: dict[str, dict[str, Any]], ctx: Context,
                 predict: dict[str, Any] | None = None):
        self.material_ids: list[str] = [str(m) for m in table.column("material_id").to_pylist()]
        self.modalities = list(specs)
        self.data: dict[str, Prepared] = {m: get_modality(m).prepare(table, specs[m], ctx) for m in specs}
        self.targets: np.ndarray | None = None if predict is None else standardised_targets(table, predict)

    def __len__(self) -> int:
        return len(self.material_ids)

    def present(self, modality: str) -> np.ndarray:
        """(rows,) bool: which rows have ``modality``."""
        return self.data[modality].present

    def modality_counts(self) -> np.ndarray:
        """(rows,) how many configured modalities each row has."""
        return np.sum([self.present(m) for m in self.modalities], axis=0)

    def collate(self, rows: np.ndarray, rng: np.random.Generator | None = None, dropout: float = 0.0) -> dict:
        """The batch of ``rows``; with ``rng``, each present modality is dropped with probability ``dropout``."""
        rows = np.asarray(rows, dtype=np.int64)
        masks, inputs = {}, {}
        for m in self.modalities:
            keep = self.present(m)[rows]
            if rng is not None and dropout > 0:
                keep = keep & (rng.random(len(rows)) >= dropout)
            masks[m] = torch.from_numpy(keep)
            if keep.any():
                inputs[m] = get_modality(m).collate(self.data[m], rows[keep], rng)
        batch = {"rows": torch.from_numpy(rows), "masks": masks, "inputs": inputs}
        if self.targets is not None:
            batch["targets"] = torch.from_numpy(self.targets[rows])
        return batch


def standardised_targets(table: pa.Table, predict: dict[str, Any]) -> np.ndarray:
    """(rows, P) float32: ``(value - mean) / std`` of each of ``predict["properties"]``, NaN where unknown."""
    columns = []
    for name, mean, std in zip(predict["properties"], predict["mean"], predict["std"]):
        if name in table.column_names:
            values = pd.to_numeric(table.column(name).to_pandas(), errors="coerce").to_numpy(np.float64)
            values = np.where(np.isfinite(values), values, np.nan)
        else:
            values = np.full(table.num_rows, np.nan)
        columns.append((values - mean) / std)
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((table.num_rows, 0), np.float32)


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose keys are whole batches, ``(rows, rng_seed or None)``: loader workers collate."""

    def __init__(self, materials: MaterialSet, dropout: float = 0.0):
        self.materials, self.dropout = materials, dropout

    def __getitem__(self, key: tuple[np.ndarray, tuple[int, ...] | None]) -> dict:
        rows, seed = key
        rng = None if seed is None else np.random.default_rng(seed)
        return self.materials.collate(rows, rng, self.dropout if rng is not None else 0.0)


class EpochBatches(torch.utils.data.Sampler):
    """This rank's training batches of one epoch: a seeded shuffle of ``rows`` cut into batches, every row in one.

    Step ``s`` of rank ``r`` takes slice ``(s * world + r) * batch_size`` of the epoch's order, so the
    ranks together see ``world * batch_size`` distinct materials per step and every rank the same
    number of equal-sized batches (what the all-gather of the loss needs). When ``rows`` does not fill the
    last step, that step is completed with rows drawn (seeded, per epoch) from the earlier steps, never
    from its own: every row is seen each epoch, and no material meets itself as a negative. Call
    :meth:`set_epoch`.

    With ``kinds`` (one small integer per row: materials 0, recipe rows 1), every step holds rows of one kind
    only: each kind is shuffled and cut (and its last step completed) on its own, then the steps of all kinds are
    shuffled together. A batch of materials then keeps every negative among materials, however many more
    recipes there are. A kind with fewer rows than one step is mixed in with the others instead (its rows would
    otherwise repeat inside a batch).
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 kinds: np.ndarray | None = None):
        super().__init__()
        self.rows, self.batch_size, self.seed, self.rank, self.world = np.asarray(rows), batch_size, seed, rank, world
        kinds = None if kinds is None else np.asarray(kinds)
        if kinds is not None and (len(np.unique(kinds)) < 2 or np.unique(kinds, return_counts=True)[1].min()
                                  < batch_size * world):  # a kind that cannot fill one step rides with the others
            kinds = None
        self.kinds = kinds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[np.ndarray]:
        if self.kinds is None:
            return [self.rows]
        return [self.rows[self.kinds == k] for k in np.unique(self.kinds)]

    def __len__(self) -> int:
        step = self.batch_size * self.world
        return sum(-(-len(g) // step) for g in self._groups())  # ceil: the last, partial step is padded

    def _cut(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A permutation of ``rows`` padded to whole steps (see the class)."""
        order = rng.permutation(rows)
        step = self.batch_size * self.world
        short = -(-len(order) // step) * step - len(order)
        if short:
            tail = len(order) % step
            pool = len(order) - tail  # the rows of the full steps
            if pool >= short:
                fill = rng.choice(pool, size=short, replace=False)
            else:  # fewer rows than one step (training lowers the batch size first): repeats cannot be avoided
                fill = rng.integers(0, len(order), size=short)
            order = np.concatenate([order, order[fill]])
        return order

    def order(self) -> np.ndarray:
        """The epoch's order over all ranks: a permutation of ``rows``, padded to whole steps (see the class)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = self._groups()
        if len(groups) == 1:
            return self._cut(groups[0], rng)
        step = self.batch_size * self.world
        steps = [part for g in groups if len(g) for part in self._cut(g, rng).reshape(-1, step)]
        return np.concatenate([steps[i] for i in rng.permutation(len(steps))])

    def __iter__(self) -> Iterator[tuple[np.ndarray, tuple[int, ...]]]:
        order = self.order()
        for step in range(len(self)):
            start = (step * self.world + self.rank) * self.batch_size
            yield order[start : start + self.batch_size], (self.seed, self.epoch, step, self.rank)


def ordered_batches(rows: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, None]]:
    """``rows`` in order, in chunks of ``batch_size`` (the last may be short), for deterministic evaluation."""
    rows = np.asarray(rows)
    return [(rows[i : i + batch_size], None) for i in range(0, len(rows), batch_size)]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
