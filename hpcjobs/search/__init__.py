"""Hyperparameter search that survives the cluster, and the learning-rate range test.

* :mod:`.space`: the ``search.space`` keys checked against the config, sampled, applied;
* :mod:`.journal`: the Optuna journal on the shared file system with a kernel-held lock;
* :mod:`.study`: samplers, pruners, and how a worker claims a trial (new or orphaned);
* :mod:`.prune`: the hook that reports each epoch to the pruner;
* :mod:`.worker`: a worker's pull loop (``hpcjobs search``, and each Slurm array task);
* :mod:`.results`, :mod:`.plots`: results.csv, best.yaml, plots, TensorBoard HParams;
* :mod:`.lr_find`: ``hpcjobs lr-find``;
* :mod:`.command`: the two commands (the CLI's table imports it).

Importing this package, or its command, imports neither Optuna nor TensorFlow.
"""
