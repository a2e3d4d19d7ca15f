"""How ``cmma identify`` shows what it found: a table of the phases, then the ranked candidates of each step."""

from __future__ import annotations

import json

from cmma_cli.console import console, esc


def _fit(row: dict) -> str:
    return f"{row['shift']:+.2f}° / {row['strain'] * 100:+.2f}% / {row['fwhm']:.2f}°"


def render(result, candidates=None) -> None:
    """Print one :class:`~cmma_cli.identify.pipeline.Identification` as rich tables."""
    from rich.table import Table

    low, high = result.two_theta_range
    console.print(f"\n[bold]{esc(result.path)}[/]: 2θ {low:g}–{high:g}°, λ = {result.wavelength:.5g} Å "
                  f"({result.wavelength_from}); {result.candidates} candidates; recall: "
                  f"{' + '.join(result.recalls)}", highlight=False, soft_wrap=True)
    for note in result.notes:
        console.print(f"[yellow]{esc(note)}[/]", highlight=False, soft_wrap=True)
    if not result.phases:
        console.print("No phase fits this pattern.", highlight=False)
        return
    table = Table(title="Phases found", title_justify="left")
    for name, justify in (("#", "right"), ("material_id", "left"), ("formula", "left"), ("space group", "left"),
                          ("score", "right"), ("weight %", "right"), ("intensity %", "right"),
                          ("shift / strain / FWHM", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for p in result.phases:
        weight = "" if p["weight_fraction"] is None else f"{100 * p['weight_fraction']:.0f}"
        table.add_row(str(p["phase"]), esc(p["material_id"]), esc(p["formula"]), esc(p["spacegroup"]),
                      f"{p['score']:.3f}", weight, f"{100 * p['intensity_fraction']:.0f}", _fit(p))
    console.print(table)
    console.print(f"Unexplained: {result.residual:.1%} of the pattern (norm of the residual after the fit). "
                  "Weight % by Hill–Howard, without absorption correction.", highlight=False, soft_wrap=True)
    for step, rows in enumerate(result.steps, start=1):
        what = "the pattern" if step == 1 else ("what phase 1 leaves" if step == 2 else f"what phases 1–{step - 1} leave")
        kept = "" if step <= len(result.phases) else " (none kept: the best does not lower the misfit enough)"
        table = Table(title=f"Step {step}: candidates fitted to {what}{kept}", title_justify="left")
        for name, justify in (("rank", "right"), ("material_id", "left"), ("formula", "left"),
                              ("space group", "left"), ("score", "right"), ("recall rank", "left")):
            table.add_column(name, justify=justify, overflow="fold")
        for r in rows:
            ranks = ", ".join(f"{name} {rank if rank is not None else '-'}" for name, rank in r["recall_ranks"].items())
            table.add_row(str(r["rank"]), esc(r["material_id"]), esc(r["formula"]), esc(r["spacegroup"]),
                          f"{r['score']:.3f}", ranks)
        console.print(table)
    console.print(f"[dim]{result.seconds:.2f} s[/]", highlight=False)


def to_json(results) -> str:
    """All identifications as one JSON document."""
    return json.dumps({"patterns": [r.to_dict() for r in results]}, indent=2)
