"""``python -m cmma_cli`` runs the command-line app (also what ``torchrun -m cmma_cli train`` uses)."""

from cmma_cli.cli import app

app()
