"""The multi-modal contrastive loss: symmetric InfoNCE summed over modality pairs, with masks and DDP.

For one pair of modalities ``(a, b)`` take the ``n`` samples of the *global* batch (all ranks) that have
both ``a`` and ``b``; with L2-normalised embeddings ``z`` and the learnable scale ``s = exp(t)``::

    logits_ab = s * z_a @ z_b.T                      # (n, n); logits_ba = logits_ab.T
    loss_ab   = (1 / 2n) * sum_i [ -log softmax(logits_ab[i])[i] - log softmax(logits_ba[i])[i] ]

i.e. the mean over the ``2n`` directional cross-entropy terms. The total is the sum of the pair losses.
A pair with fewer than two such samples (one sample has no negatives) contributes an exact zero that
is still part of the autograd graph, so ``backward()`` works and gives zero gradients, never NaN.

Distributed training follows open_clip's ``gather_features`` + ``local_loss`` scheme: every rank
gathers the features and masks of all ranks (features with gradient), then computes only the terms of
*its own* samples (its rows) against the whole global batch (all columns). Cross-entropy labels are the
positions of the rank's valid samples within the pair's global list of valid samples, so they start at
the number of valid samples held by earlier ranks (not at ``batch_size * rank``: masks make the
offsets uneven). See :meth:`MultiModalInfoNCE.forward` for how the reported value and the gradients are
made to match a single process exactly.

:func:`property_loss` is the objective of ``--objective predict``: the masked mean squared error of the
property head's predictions against standardised targets (local to each rank: DDP averages its gradients).
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmma_cli.errors import CMMAError

__all__ = ["MultiModalInfoNCE", "gather_with_grad", "pair_name", "parse_pairs", "property_loss"]


def pair_name(a: str, b: str) -> str:
    """The key of pair ``(a, b)`` in the loss dictionary and in metrics: ``"a-b"``."""
    return f"{a}-{b}"


# --------------------------------------------------------------------------------------------------
# Which pairs
# --------------------------------------------------------------------------------------------------


def _choices(modalities: list[str]) -> str:
    names = ", ".join(modalities) if modalities else "(none configured)"
    return (
        "use 'all', 'anchor:<modality>' or comma-separated pairs such as "
        f"'{_example(modalities)}', with modalities from: {names}"
    )


def _example(modalities: list[str]) -> str:
    if len(modalities) >= 2:
        return pair_name(modalities[0], modalities[1])
    return "structure-text"


def _split_pair(item: str, spec: str, modalities: list[str]) -> tuple[str, str]:
    """Split ``"a-b"`` at the hyphen that leaves a known modality on both sides."""
    known = set(modalities)
    splits = [
        (item[:i].strip(), item[i + 1 :].strip())
        for i, ch in enumerate(item)
        if ch == "-" and item[:i].strip() in known and item[i + 1 :].strip() in known
    ]
    if len(splits) == 1:
        return splits[0]
    if len(splits) > 1:
        raise CMMAError(f"Pair '{item}' in '{spec}' can be split more than one way; {_choices(modalities)}.")
    if "-" not in item:
        raise CMMAError(f"Pair '{item}' in '{spec}' is not of the form 'a-b'; {_choices(modalities)}.")
    unknown = [p.strip() for p in item.split("-") if p.strip() not in known]
    raise CMMAError(
        f"Unknown modality '{unknown[0] if unknown else item}' in pair '{item}'; {_choices(modalities)}."
    )


def parse_pairs(spec: str, modalities: list[str]) -> list[tuple[str, str]]:
    """Turn a pair specification into the list of modality pairs the loss sums over.

    - ``"all"``: every unordered pair of ``modalities``, in their order
      (``[s, t, x]`` -> ``(s, t), (s, x), (t, x)``);
    - ``"anchor:structure"``: ``(structure, m)`` for every other modality ``m`` (ImageBind-style: all
      modalities are aligned to one anchor, never to each other);
    - ``"structure-text,structure-xrd"``: exactly these pairs (order inside a pair is kept; hyphenated
      modality names work as long as the split is unambiguous).

    Raises :class:`CMMAError` with one sentence naming the valid choices for an empty or malformed
    spec, an unknown modality, an anchor that is not configured, a pair of a modality with itself, a
    pair listed twice, or a spec that yields no pair (fewer than two modalities).
    """
    mods = list(dict.fromkeys(m.strip() for m in modalities))
    text = (spec or "").strip()
    if not text:
        raise CMMAError(f"The pair specification is empty; {_choices(mods)}.")
    if text.lower() == "all":
        pairs = list(combinations(mods, 2))
    elif text.lower().startswith("anchor:"):
        anchor = text.split(":", 1)[1].strip()
        if anchor not in mods:
            raise CMMAError(f"Anchor modality '{anchor}' is not configured; {_choices(mods)}.")
        pairs = [(anchor, m) for m in mods if m != anchor]
    else:
        pairs = []
        seen: set[frozenset[str]] = set()
        for item in (part.strip() for part in text.split(",")):
            if not item:
                raise CMMAError(f"Pair specification '{spec}' has an empty entry; {_choices(mods)}.")
            a, b = _split_pair(item, spec, mods)
            if a == b:
                raise CMMAError(f"Pair '{item}' pairs a modality with itself; {_choices(mods)}.")
            key = frozenset((a, b))
            if key in seen:
                raise CMMAError(f"Pair '{item}' is listed twice in '{spec}'; {_choices(mods)}.")
            seen.add(key)
            pairs.append((a, b))
    if not pairs:
        raise CMMAError(
            f"Pair specification '{spec}' gives no pair because fewer than two modalities are configured; "
            f"{_choices(mods)}."
        )
    return pairs


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is unavailable or not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """``cat(all_gather(x))`` whose backward sums each slice's gradient over ranks (a reduce-scatter).

    Written here rather than taken from ``torch.distributed.nn.functional.all_gather``, which torch 2.13
    deprecates in favour of a private, still-changing API; this needs only the stable collectives that
    every backend and every supported torch version has.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.rank, ctx.rows = torch.distributed.get_rank(), x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        grad = grad.contiguous()
        if torch.distributed.get_backend() == "nccl":
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            torch.distributed.reduce_scatter_tensor(mine, grad)
            return mine
        total = grad.clone()  # all_reduce is in place; autograd may share ``grad``
        torch.distributed.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """All-gather ``x`` along dim 0 from every rank, keeping the gradient.

    Returns ``cat([x_rank0, x_rank1, ...])``. The backward pass sums the gradients that all ranks
    computed for each slice and hands every rank the sum for its own slice (reduce-scatter; NCCL does
    it natively, other backends with an all-reduce), so a loss that uses other ranks' features still
    trains them. Identity when torch.distributed is not initialised or the world size is 1.

    All ranks must pass tensors of the same shape, unless ``sizes`` (every rank's dim-0 length, the
    same list on all ranks) is given: then each rank's rows are zero-padded to the longest, gathered,
    and the padding is cut off again.
    """
    _, world = _world()
    if world == 1:
        return x
    if sizes is None:
        return _AllGatherWithGrad.apply(x)
    longest = max(sizes)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - x.shape[0]))
    gathered = _AllGatherWithGrad.apply(padded)
    return torch.cat([gathered[r * longest : r * longest + size] for r, size in enumerate(sizes)], dim=0)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def _graph_zero(*tensors: Tensor) -> Tensor:
    """An exact 0 that depends on ``tensors`` (finite ones only), so it has a grad_fn when they do."""
    return sum(t.sum() * 0.0 for t in tensors)  # type: ignore[return-value]


class MultiModalInfoNCE(torch.nn.Module):
    """Symmetric InfoNCE summed over modality pairs, over the global batch of all ranks.

    ``pairs``: the ``(a, b)`` pairs to align (see :func:`parse_pairs`).

    ``in_modality_negatives``: also use the other samples *of the anchor's own modality* as negatives.
    For direction ``a -> b`` the candidates of anchor ``z_a[i]`` become the ``n`` vectors ``z_b[j]``
    (positive ``j = i``) followed by the ``n - 1`` vectors ``z_a[k], k != i``; in logits::

        logits_ab = [ s * z_a @ z_b.T | s * z_a @ z_a.T with the diagonal set to -inf ]   # (n, 2n)

    and symmetrically ``logits_ba = [ s * z_b @ z_a.T | s * z_b @ z_b.T, diagonal -inf ]``. Only the
    ``n`` samples that have both modalities of the pair take part (as anchors and as negatives), and
    the loss is still the mean over the ``2n`` directional terms. It pushes same-modality embeddings of
    different materials apart, against collapse within one modality.
    """

    def __init__(self, pairs: list[tuple[str, str]], in_modality_negatives: bool = False):
        super().__init__()
        if not pairs:
            raise CMMAError(
                "The contrastive loss needs at least one modality pair; configure two or more modalities."
            )
        for a, b in pairs:
            if a == b:
                raise CMMAError(
                    f"Pair '{pair_name(a, b)}' pairs a modality with itself; pair two different modalities."
                )
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        self.in_modality_negatives = bool(in_modality_negatives)
        self.modalities = list(dict.fromkeys(m for pair in self.pairs for m in pair))
        self._aranges: dict[torch.device, Tensor] = {}

    def extra_repr(self) -> str:
        names = ", ".join(pair_name(a, b) for a, b in self.pairs)
        return f"pairs=[{names}], in_modality_negatives={self.in_modality_negatives}"

    def _labels(self, start: int, stop: int, device: torch.device) -> Tensor:
        """``arange(start, stop)`` on ``device``, sliced from a per-device cache that only grows."""
        cached = self._aranges.get(device)
        if cached is None or cached.numel() < stop:
            cached = torch.arange(max(stop, 2 * (cached.numel() if cached is not None else 0)), device=device)
            self._aranges[device] = cached
        return cached[start:stop]

    def forward(
        self, features: dict[str, Tensor], masks: dict[str, Tensor], logit_scale: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(total, {"a-b": pair loss})`` with ``total = sum`` of the pair losses.

        ``features[m]``: ``(B, d)`` L2-normalised embeddings of this rank's local batch; a modality the
        local batch lacks entirely may be left out (it then counts as absent on this rank whatever its
        mask says). ``masks[m]``: ``(B,)`` bool, True where the sample has modality ``m`` (required for
        every modality in ``features``). Rows whose mask is False may hold anything,
        NaN included: they are never read by the loss and get exactly zero gradient. ``logit_scale``:
        the scalar ``s = exp(t)``. The arithmetic runs in float32, or wider when the inputs are.

        Distributed (torch.distributed initialised, world size ``W``): rank ``r`` computes
        ``l_r``, the sum of the directional terms of its own valid samples divided by the *global*
        ``2n``, so ``sum_r l_r`` is exactly the single-process loss ``L`` on the concatenated batch.
        Each pair loss is returned as ``L + (W * l_r - (W * l_r).detach())``: its value is ``L`` on
        every rank (one all-reduce of the detached ``l_r``), and its gradient is ``W * dl_r``. The
        gather's backward sums the ranks' gradients for each slice, so the gradient a rank gets for
        its own features is ``W * dL/dz``; DDP then averages over the ``W`` ranks, which yields exactly
        the single-process gradient ``dL/dparams`` (``logit_scale`` included).
        Every rank must call this with the same pairs; local batch sizes may differ.
        """
        rank, world = _world()
        device = logit_scale.device
        local_n, dims, dtype = self._local_shapes(features, masks, logit_scale)

        if world > 1:
            sizes, dims = self._exchange_shapes(local_n, dims, device)
        else:
            sizes = [local_n]
        offset = sum(sizes[:rank])
        present = [m for m in self.modalities if dims[m] > 0]

        # Pack every present modality and all masks into one (B, sum d + K) tensor: one gather.
        blocks = []
        for m in present:
            if m in features:
                blocks.append(features[m].to(dtype))
            else:
                blocks.append(torch.zeros(local_n, dims[m], device=device, dtype=dtype))
        mask_cols = torch.stack([self._mask(features, masks, m, local_n, device) for m in self.modalities], 1)
        packed = torch.cat(blocks + [mask_cols.to(dtype)], dim=1)
        if world > 1:
            packed = gather_with_grad(packed, sizes)

        z: dict[str, Tensor] = {}
        col = 0
        for m in present:
            z[m] = packed[:, col : col + dims[m]]
            col += dims[m]
        global_masks = {m: packed[:, col + k].detach() > 0.5 for k, m in enumerate(self.modalities)}
        scale = logit_scale.to(dtype)

        partial: dict[str, Tensor] = {}
        for a, b in self.pairs:
            partial[pair_name(a, b)] = self._pair_partial(a, b, z, global_masks, scale, offset, offset + local_n)

        if world > 1:
            values = torch.stack([p.detach() for p in partial.values()])
            torch.distributed.all_reduce(values)
            losses = {
                name: values[k] + (world * p - (world * p).detach())
                for k, (name, p) in enumerate(partial.items())
            }
        else:
            losses = partial
        total = sum(losses.values())
        return total, losses  # type: ignore[return-value]

    # -- pieces of forward -------------------------------------------------------------------------

    def _local_shapes(
        self, features: dict[str, Tensor], masks: dict[str, Tensor], logit_scale: Tensor
    ) -> tuple[int, dict[str, int], torch.dtype]:
        """Local batch size, embedding width per modality (0 = not given) and the compute dtype."""
        sizes = {t.shape[0] for m, t in features.items() if m in self.modalities}
        sizes |= {t.shape[0] for m, t in masks.items() if m in self.modalities}
        if len(sizes) > 1:
            raise ValueError(f"features and masks disagree on the batch size: {sorted(sizes)}")
        local_n = sizes.pop() if sizes else 0
        dims: dict[str, int] = {}
        dtype = torch.promote_types(torch.float32, logit_scale.dtype)
        for m in self.modalities:
            if m in features:
                if features[m].dim() != 2:
                    raise ValueError(f"features['{m}'] must be (batch, dim), got shape {tuple(features[m].shape)}")
                dims[m] = features[m].shape[1]
                dtype = torch.promote_types(dtype, features[m].dtype)
            else:
                dims[m] = 0
            if m in features and m not in masks:
                raise ValueError(f"features['{m}'] is given without masks['{m}']")
            if m in masks and masks[m].shape != (local_n,):
                raise ValueError(f"masks['{m}'] must be ({local_n},), got shape {tuple(masks[m].shape)}")
        return local_n, dims, dtype

    def _exchange_shapes(
        self, local_n: int, dims: dict[str, int], device: torch.device
    ) -> tuple[list[int], dict[str, int]]:
        """All ranks' batch sizes, and each modality's width as given by any rank (one all-gather)."""
        world = torch.distributed.get_world_size()
        mine = torch.tensor([local_n] + [dims[m] for m in self.modalities], device=device, dtype=torch.long)
        every = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(every, mine)
        table = torch.stack(every).tolist()
        sizes = [row[0] for row in table]
        widths: dict[str, int] = {}
        for k, m in enumerate(self.modalities):
            given = {row[k + 1] for row in table} - {0}
            if len(given) > 1:
                raise ValueError(f"ranks disagree on the width of features['{m}']: {sorted(given)}")
            widths[m] = given.pop() if given else 0
        return sizes, widths

    @staticmethod
    def _mask(
        features: dict[str, Tensor], masks: dict[str, Tensor], m: str, n: int, device: torch.device
    ) -> Tensor:
        """The local mask of ``m``; all False when ``m`` has no features here (whatever the mask says)."""
        if m not in features or m not in masks:
            return torch.zeros(n, dtype=torch.bool, device=device)
        return masks[m].to(device=device, dtype=torch.bool)

    def _pair_partial(
        self,
        a: str,
        b: str,
        z: dict[str, Tensor],
        masks: dict[str, Tensor],
        scale: Tensor,
        row_start: int,
        row_stop: int,
    ) -> Tensor:
        """This rank's share of pair ``(a, b)``: its rows' directional terms summed, over the global 2n.

        ``z``/``masks`` hold the global batch; this rank's samples are rows ``[row_start, row_stop)``.
        """
        if a not in z or b not in z:  # absent from the whole global batch: tie the 0 to valid rows only
            kept = [z[m].index_select(0, torch.nonzero(masks[m]).flatten()) for m in (a, b) if m in z]
            return _graph_zero(scale, *kept)
        valid = torch.nonzero(masks[a] & masks[b]).flatten()  # sorted global indices
        n = valid.numel()
        za, zb = z[a].index_select(0, valid), z[b].index_select(0, valid)
        if n < 2:
            return _graph_zero(scale, za, zb)
        # Positions (in the pair's list of valid samples) of this rank's rows: a contiguous range,
        # starting at the number of valid samples that earlier ranks hold.
        if row_start == 0 and row_stop == masks[a].numel():
            lo, hi = 0, n
        else:
            lo, hi = int((valid < row_start).sum()), int((valid < row_stop).sum())
        labels = self._labels(lo, hi, za.device)
        terms = self._direction(za, zb, lo, hi, labels, scale) + self._direction(zb, za, lo, hi, labels, scale)
        return terms / (2 * n)

    def _direction(
        self, anchors: Tensor, candidates: Tensor, lo: int, hi: int, labels: Tensor, scale: Tensor
    ) -> Tensor:
        """Sum over rows ``lo:hi`` of ``-log softmax(s * anchors[i] @ candidates.T)[i]`` (plus extras)."""
        rows = anchors[lo:hi]
        logits = scale * rows @ candidates.T
        if self.in_modality_negatives:
            same = scale * rows @ anchors.T
            own = torch.zeros_like(same, dtype=torch.bool)
            own[self._labels(0, hi - lo, own.device), labels] = True
            logits = torch.cat([logits, same.masked_fill(own, float("-inf"))], dim=1)
        return F.cross_entropy(logits, labels, reduction="sum")


# --------------------------------------------------------------------------------------------------
# The property loss
# --------------------------------------------------------------------------------------------------


def property_loss(predictions: dict[str, Tensor], masks: dict[str, Tensor], targets: Tensor) -> Tensor:
    """Mean over modalities of the MSE of ``predictions[m]`` against ``targets`` on the known entries.

    ``predictions[m]``: ``(B, P)`` for each modality of the batch; ``masks[m]``: ``(B,)`` bool, which rows
    have ``m``; ``targets``: ``(B, P)`` standardised properties, NaN where unknown. A modality counts when
    some row that has it has some known property; with none, the result is an exact 0 that is still part
    of the autograd graph (zero gradients, never NaN). Computed in float32.
    """
    known_targets = ~torch.isnan(targets)
    clean = torch.nan_to_num(targets.float())
    losses = []
    for m, pred in predictions.items():
        known = known_targets & masks[m].to(torch.bool).unsqueeze(1)
        n = int(known.sum())
        if n:
            err = torch.where(known, pred.float() - clean, torch.zeros_like(clean))
            losses.append(err.pow(2).sum() / n)
    if not losses:
        return _graph_zero(*predictions.values()) if predictions else clean.sum() * 0.0
    return torch.stack(losses).mean()
