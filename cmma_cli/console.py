"""Terminal output: one rich console (on stderr, so ``--json`` output on stdout stays clean), progress bars, and
:func:`esc` for user-supplied text (ids, file names, formulas), which rich must never read as markup."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def esc(value: object) -> str:
    """``value`` as text that rich prints as it is: a material id ``[bold red]x[/]``, a file name or a formula from
    the user's data is never read as markup. Every user-supplied string that reaches the terminal goes through it."""
    return escape(str(value))


def progress() -> Progress:
    """A progress bar in the house style: description, bar, done/total, elapsed, remaining."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
