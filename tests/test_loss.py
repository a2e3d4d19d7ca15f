"""The multi-modal InfoNCE loss against a plain-Python reference, its pair parser, and its DDP gather."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from cmma_cli.errors import CMMAError
from cmma_cli.loss import MultiModalInfoNCE, gather_with_grad, parse_pairs

MODS = ["structure", "text", "xrd"]
ALL_PAIRS = [("structure", "text"), ("structure", "xrd"), ("text", "xrd")]


# ------------------------------------------------------------------------------------------------
# A reference written straight from the formula, with Python loops and floats only
# ------------------------------------------------------------------------------------------------


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v))
    return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


def _nll(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], computed stably."""
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(x - top) for x in logits)))


def reference(features, masks, scale, pairs, in_modality_negatives=False):
    """Sum over pairs of the mean of the 2n directional -log-softmax terms (0 when n < 2)."""
    per_pair = {}
    for a, b in pairs:
        if a not in features or b not in features:
            per_pair[f"{a}-{b}"] = 0.0
            continue
        za, zb = features[a].tolist(), features[b].tolist()
        idx = [i for i in range(len(za)) if bool(masks[a][i]) and bool(masks[b][i])]
        n = len(idx)
        if n < 2:
            per_pair[f"{a}-{b}"] = 0.0
            continue
        total = 0.0
        for anchor, other in ((za, zb), (zb, za)):
            for pos, i in enumerate(idx):
                logits = [scale * _cos(anchor[i], other[j]) for j in idx]
                if in_modality_negatives:
                    logits += [scale * _cos(anchor[i], anchor[k]) for k in idx if k != i]
                total += _nll(logits, pos)
        per_pair[f"{a}-{b}"] = total / (2 * n)
    return sum(per_pair.values()), per_pair


def _batch(n=8, d=6, seed=0, dtype=torch.float64, masks=None):
    gen = torch.Generator().manual_seed(seed)
    feats = {m: torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1) for m in MODS}
    if masks is None:
        masks = {
            "structure": torch.ones(n, dtype=torch.bool),
            "text": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1][:n], dtype=torch.bool),
            "xrd": torch.tensor([1, 1, 0, 1, 1, 0, 1, 0][:n], dtype=torch.bool),
        }
    return feats, masks


def _leaf(feats):
    return {m: t.clone().requires_grad_(True) for m, t in feats.items()}


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_modality_negatives", [False, True])
def test_matches_reference_with_masks(in_modality_negatives):
    feats, masks = _batch()
    loss = MultiModalInfoNCE(ALL_PAIRS, in_modality_negatives=in_modality_negatives)
    total, pairs = loss(feats, masks, torch.tensor(7.3, dtype=torch.float64))
    want_total, want_pairs = reference(feats, masks, 7.3, ALL_PAIRS, in_modality_negatives)
    assert set(pairs) == {"structure-text", "structure-xrd", "text-xrd"}
    for name, value in want_pairs.items():
        assert pairs[name].item() == pytest.approx(value, abs=1e-12, rel=1e-12)
        assert value > 0.1  # every pair here has >= 3 samples, so a real, non-trivial loss
    assert total.item() == pytest.approx(want_total, abs=1e-12, rel=1e-12)


def test_in_modality_negatives_only_add_to_the_loss():
    """Extra negatives enlarge every softmax denominator, so each pair loss strictly grows."""
    feats, masks = _batch(seed=3)
    scale = torch.tensor(5.0, dtype=torch.float64)
    _, plain = MultiModalInfoNCE(ALL_PAIRS)(feats, masks, scale)
    _, extra = MultiModalInfoNCE(ALL_PAIRS, in_modality_negatives=True)(feats, masks, scale)
    for name in plain:
        assert extra[name].item() > plain[name].item()


def test_repeated_calls_with_changing_masks_reuse_cached_labels_correctly():
    loss = MultiModalInfoNCE(ALL_PAIRS)
    for seed in range(4):
        gen = torch.Generator().manual_seed(100 + seed)
        n = 5 + 2 * seed
        masks = {m: torch.rand(n, generator=gen) < 0.7 for m in MODS}
        feats, _ = _batch(n=n, seed=seed, masks=masks)
        total, _ = loss(feats, masks, torch.tensor(3.0, dtype=torch.float64))
        assert total.item() == pytest.approx(reference(feats, masks, 3.0, ALL_PAIRS)[0], rel=1e-12, abs=1e-12)
    assert list(loss._aranges) == [torch.device("cpu")]  # one cached label tensor per device


def test_perfectly_aligned_embeddings_give_near_zero_loss_and_random_ones_about_log_n():
    n = 6
    eye = torch.eye(n, dtype=torch.float64)
    masks = {m: torch.ones(n, dtype=torch.bool) for m in MODS}
    loss = MultiModalInfoNCE([("structure", "text")])
    aligned, _ = loss({"structure": eye, "text": eye.clone()}, masks, torch.tensor(100.0, dtype=torch.float64))
    assert aligned.item() < 1e-30
    # Equal similarities everywhere: each term is exactly log n.
    same = torch.full((n, 4), 0.5, dtype=torch.float64)
    flat, _ = loss({"structure": same, "text": same.clone()}, masks, torch.tensor(10.0, dtype=torch.float64))
    assert flat.item() == pytest.approx(math.log(n), rel=1e-12)


def test_float32_inputs_stay_float32_and_close_to_reference():
    feats, masks = _batch(dtype=torch.float32)
    total, pairs = MultiModalInfoNCE(ALL_PAIRS)(feats, masks, torch.tensor(10.0))
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(reference(feats, masks, 10.0, ALL_PAIRS)[0], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Missing modalities and degenerate pairs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_key", [False, True])
def test_modality_absent_for_the_whole_batch_contributes_zero(drop_key):
    feats, masks = _batch()
    masks["xrd"] = torch.zeros(8, dtype=torch.bool)
    if drop_key:  # the model may skip an encoder whose modality no sample has
        del feats["xrd"], masks["xrd"]
    feats = _leaf(feats)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    total, pairs = MultiModalInfoNCE(ALL_PAIRS)(feats, masks, scale)
    assert pairs["structure-xrd"].item() == 0.0 and pairs["text-xrd"].item() == 0.0
    assert pairs["structure-xrd"].grad_fn is not None
    want = reference({m: feats[m].detach() for m in ("structure", "text")}, masks, 4.0, [("structure", "text")])[0]
    assert total.item() == pytest.approx(want, rel=1e-12)
    total.backward()
    assert torch.isfinite(scale.grad) and scale.grad.item() != 0.0
    if not drop_key:
        assert torch.count_nonzero(feats["xrd"].grad) == 0


def test_pair_with_a_single_sample_is_an_exact_zero_that_backpropagates():
    n = 5
    feats, _ = _batch(n=n)
    masks = {
        "structure": torch.ones(n, dtype=torch.bool),
        "text": torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool),  # one text only
        "xrd": torch.zeros(n, dtype=torch.bool),
    }
    feats = _leaf(feats)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    total, pairs = MultiModalInfoNCE(ALL_PAIRS)(feats, masks, scale)
    assert total.item() == 0.0 and not math.isnan(total.item())
    assert all(p.item() == 0.0 for p in pairs.values())
    total.backward()
    for m in MODS:
        assert torch.count_nonzero(feats[m].grad) == 0
    assert scale.grad.item() == 0.0


def test_masked_rows_never_leak_into_value_or_gradient():
    feats, masks = _batch()
    clean = {m: t.clone() for m, t in feats.items()}
    for m in MODS:
        feats[m][~masks[m]] = float("nan")  # arbitrary garbage where the modality is missing
    feats = _leaf(feats)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    total, _ = MultiModalInfoNCE(ALL_PAIRS, in_modality_negatives=True)(feats, masks, scale)
    assert total.item() == pytest.approx(reference(clean, masks, 6.0, ALL_PAIRS, True)[0], rel=1e-12)
    total.backward()
    for m in MODS:
        grad = feats[m].grad
        assert torch.isfinite(grad).all()
        assert torch.count_nonzero(grad[~masks[m]]) == 0
        assert (grad[masks[m]].abs().sum(dim=1) > 0).all()  # every valid row is trained
    assert torch.isfinite(scale.grad)


@pytest.mark.parametrize("in_modality_negatives", [False, True])
def test_gradients_match_finite_differences(in_modality_negatives):
    feats, masks = _batch(n=6, d=4, seed=7)
    loss = MultiModalInfoNCE(ALL_PAIRS, in_modality_negatives=in_modality_negatives)
    inputs = (feats["structure"], feats["text"], feats["xrd"], torch.tensor(2.5, dtype=torch.float64))
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs)

    def fn(s, t, x, scale):
        return loss({"structure": s, "text": t, "xrd": x}, masks, scale)[0]

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_shape_mistakes_and_empty_pairs_are_reported():
    feats, masks = _batch()
    loss = MultiModalInfoNCE(ALL_PAIRS)
    with pytest.raises(ValueError, match="batch size"):
        loss(feats, {**masks, "text": torch.ones(3, dtype=torch.bool)}, torch.tensor(1.0))
    with pytest.raises(ValueError, match="without masks"):
        loss(feats, {m: v for m, v in masks.items() if m != "text"}, torch.tensor(1.0))
    with pytest.raises(CMMAError, match="at least one modality pair"):
        MultiModalInfoNCE([])
    with pytest.raises(CMMAError, match="with itself"):
        MultiModalInfoNCE([("text", "text")])


# ------------------------------------------------------------------------------------------------
# parse_pairs
# ------------------------------------------------------------------------------------------------


def test_parse_pairs_all_anchor_and_explicit():
    assert parse_pairs("all", MODS) == ALL_PAIRS
    assert parse_pairs(" ALL ", ["text", "structure"]) == [("text", "structure")]
    assert parse_pairs("anchor:structure", MODS) == [("structure", "text"), ("structure", "xrd")]
    assert parse_pairs("anchor: xrd", MODS) == [("xrd", "structure"), ("xrd", "text")]
    assert parse_pairs("structure-text, xrd-text", MODS) == [("structure", "text"), ("xrd", "text")]
    # Hyphenated modality names split at the one hyphen that leaves known names on both sides.
    assert parse_pairs("xrd-synthesis-text", ["xrd", "synthesis-text"]) == [("xrd", "synthesis-text")]


@pytest.mark.parametrize(
    ("spec", "modalities", "message"),
    [
        ("", MODS, "The pair specification is empty"),
        ("anchor:image", MODS, "Anchor modality 'image' is not configured"),
        ("structure-image", MODS, "Unknown modality 'image' in pair 'structure-image'"),
        ("structuretext", MODS, "is not of the form 'a-b'"),
        ("text-text", MODS, "pairs a modality with itself"),
        ("structure-text,text-structure", MODS, "is listed twice"),
        ("structure-text,", MODS, "has an empty entry"),
        ("all", ["structure"], "fewer than two modalities"),
        ("a-b-c", ["a", "b", "c", "a-b", "b-c"], "can be split more than one way"),
    ],
)
def test_parse_pairs_errors_name_the_valid_choices(spec, modalities, message):
    with pytest.raises(CMMAError) as err:
        parse_pairs(spec, modalities)
    text = str(err.value)
    assert message in text
    assert "use 'all', 'anchor:<modality>'" in text and text.endswith(".")
    assert ", ".join(modalities) in text  # lists the configured modalities
    assert text.count(". ") == 0  # one sentence


def test_gather_with_grad_is_identity_without_distributed():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


# ------------------------------------------------------------------------------------------------
# Two gloo processes == one process
# ------------------------------------------------------------------------------------------------

WORLD = 2
GLOBAL_N = 10
CASES = {  # name -> (rank sizes, in_modality_negatives, rank whose batch omits the xrd key)
    "halves": ([5, 5], False, None),
    "halves-extra-negatives": ([5, 5], True, None),
    "uneven-missing-key": ([3, 7], False, 1),
}


def _global_batch():
    """A fixed global batch: masks with gaps, NaN garbage in masked rows, xrd absent from rows 3..9."""
    gen = torch.Generator().manual_seed(42)
    feats = {
        m: torch.nn.functional.normalize(torch.randn(GLOBAL_N, 5, generator=gen, dtype=torch.float64), dim=1)
        for m in MODS
    }
    masks = {
        "structure": torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool),
        "text": torch.tensor([1, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
        "xrd": torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool),
    }
    for m in MODS:
        feats[m][~masks[m]] = float("nan")
    return feats, masks


def _rank_slice(case: str, rank: int) -> slice:
    sizes = CASES[case][0]
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _worker(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        feats, masks = _global_batch()
        results = {}
        for case, (_, extra, no_xrd_rank) in CASES.items():
            part = _rank_slice(case, rank)
            local = {m: feats[m][part].clone().requires_grad_(True) for m in MODS}
            local_masks = {m: masks[m][part] for m in MODS}
            given = dict(local)
            if rank == no_xrd_rank:
                del given["xrd"]
            scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
            total, pairs = MultiModalInfoNCE(ALL_PAIRS, in_modality_negatives=extra)(given, local_masks, scale)
            total.backward()
            results[case] = {
                "total": total.item(),
                "pairs": {k: v.item() for k, v in pairs.items()},
                # A modality whose features this rank did not pass gets no gradient at all.
                "grads": {m: torch.zeros_like(t) if t.grad is None else t.grad.clone() for m, t in local.items()},
                "scale_grad": scale.grad.item(),
            }
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_reproduce_the_single_process_loss_and_gradients(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    feats, masks = _global_batch()
    for case, (_, extra, no_xrd_rank) in CASES.items():
        single = {m: feats[m].clone().requires_grad_(True) for m in MODS}
        case_masks = dict(masks)
        if no_xrd_rank is not None:  # that rank gave no xrd features: its rows count as missing xrd
            keep = torch.ones(GLOBAL_N, dtype=torch.bool)
            keep[_rank_slice(case, no_xrd_rank)] = False
            case_masks["xrd"] = masks["xrd"] & keep
        scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        total, pairs = MultiModalInfoNCE(ALL_PAIRS, in_modality_negatives=extra)(single, case_masks, scale)
        total.backward()
        assert total.item() > 1.0

        for rank, got in enumerate(ranks):
            res = got[case]
            # Every rank reports the global loss.
            assert res["total"] == pytest.approx(total.item(), abs=1e-6)
            for name, value in pairs.items():
                assert res["pairs"][name] == pytest.approx(value.item(), abs=1e-6)
            # A rank's gradient for its own samples is W x the global one; DDP's mean over the W ranks
            # (each parameter gradient is a sum over that rank's samples) divides it by W again.
            part = _rank_slice(case, rank)
            for m in MODS:
                want = single[m].grad[part]
                assert torch.allclose(res["grads"][m] / WORLD, want, atol=1e-10, rtol=1e-8), (case, rank, m)
                assert torch.isfinite(res["grads"][m]).all()
        # logit_scale is replicated: the DDP mean of the ranks' gradients is the global gradient.
        mean_scale_grad = sum(r[case]["scale_grad"] for r in ranks) / WORLD
        assert mean_scale_grad == pytest.approx(scale.grad.item(), rel=1e-9, abs=1e-12)
