"""``cmma train``: contrastive training of the modality encoders on ``processed/``.

Objectives (``--objective``): ``contrastive`` (the multi-modal InfoNCE of :mod:`cmma_cli.loss`),
``predict`` (no alignment: a property head shared by the modalities regresses standardised numeric
properties from each modality's embedding, masked MSE) and ``contrastive+predict`` (the sum, the property
loss weighted by ``predict_weight``). ``val_loss`` is always the objective's loss, so ``best.pt`` follows
it; ``train_predict`` / ``val_predict`` are the property MSEs, and val R@1 is reported for every objective.

One readable loop (in the spirit of nanoGPT's ``train.py``): AdamW with linear warm-up and cosine
decay, gradient clipping, bf16 autocast on a GPU, a checkpoint every epoch (model, optimizer,
scheduler, epoch, config, model spec), validation loss and cross-modal retrieval R@1 each epoch,
``best.pt`` by ``best_metric``, ``metrics.csv``, TensorBoard events and a rich progress bar.

Processes. ``--gpus N`` runs N ranks on this machine (DDP, NCCL); where there is no GPU it runs N CPU
processes on the gloo backend instead, with a warning, which is also how the multi-process path is
exercised without a GPU; ``--gpus 0`` is one CPU process. Under ``torchrun ... -m cmma_cli train``
the ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and ``--gpus`` is not used.
``batch_size`` is per rank: the loss gathers every rank's features, so the negatives grow with the
number of ranks.

Large contrastive batches on small memory: ``--accumulate N`` makes each step N micro-batches of ``batch_size``
(open_clip's ``accum_freq``): every micro-batch's embeddings are computed without gradient and cached, then each is
recomputed with gradient and the loss taken against the cached embeddings of the others, so the in-batch negatives
span all ``N x batch_size x ranks`` materials of the step and the gradient is the one of that whole batch (a plain
sum of micro-batch losses would only contrast within each micro-batch). It costs one extra forward per micro-batch.

Run folder ``<ws>/runs/<run>/`` (:class:`~cmma_cli.workspace.RunFiles`)::

    config.toml            the [train] config (usable with --config)
    checkpoints/epoch-NNN.pt  the newest --keep-checkpoints (3) epochs (0: all); last.pt, best.pt (copies) always
    metrics.csv            one row per epoch: losses per pair, R@1 per direction, lr, temperature, speed
    tensorboard/           events (per step and per epoch), and at the end the embedding projector (--projector):
                           best.pt's val embeddings of each modality with material_id, formula, crystal system
    wandb/                 with --wandb (pip install wandb): the per-epoch metrics, offline without an API key
    manifest.json          written when training finishes

The modules, one job each:

- :mod:`~cmma_cli.train.launch`: the plan (config checks, the model spec, resume checks), devices, and
  starting the ranks (one process, ``torch.multiprocessing.spawn`` or torchrun);
- :mod:`~cmma_cli.train.data`: the processed train / val rows;
- :mod:`~cmma_cli.train.loop`: one rank's training, one epoch at a time, and the objective;
- :mod:`~cmma_cli.train.validation`: the validation losses and R@1 (R@1 by :mod:`cmma_cli.evaluate.metrics`,
  the code ``cmma evaluate`` scores retrieval with);
- :mod:`~cmma_cli.train.runlog`: what rank 0 records: metrics.csv, config.toml, checkpoints (and their pruning),
  TensorBoard events, W&B, the progress bar, the printed lines and the summary table;
- :mod:`~cmma_cli.train.projector`: the best model's embeddings for TensorBoard's projector.
"""

from __future__ import annotations

from cmma_cli.train.data import read_splits, usable
from cmma_cli.train.launch import STAGE, Plan, devices, make_plan, run_train, torchrun_env
from cmma_cli.train.loop import accumulated_backward, lr_factor, objective_loss, param_groups, train_rank
from cmma_cli.train.runlog import write_config_toml
from cmma_cli.train.validation import validate

__all__ = [
    "STAGE", "Plan", "accumulated_backward", "devices", "lr_factor", "make_plan", "objective_loss", "param_groups", "read_splits",
    "run_train", "torchrun_env", "train_rank", "usable", "validate", "write_config_toml",
]
