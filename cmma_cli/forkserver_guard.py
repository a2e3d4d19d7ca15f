"""Imported only as a fork server's preload (``set_forkserver_preload``): the server then ends with the command
that started it, and its workers (:func:`~cmma_cli.processes.die_with_starter`) with it. A fork server otherwise
outlives a killed command, holding its workers."""

from cmma_cli.processes import die_with_starter

die_with_starter()
