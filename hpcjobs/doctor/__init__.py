"""``hpcjobs doctor``: what would make a submission fail an hour into the queue, found before it.

* :mod:`.probe`: what doctor looks at (the stack, the GPUs, the run directory's file system,
  the partition's nodes, the store), gathered into one plain ``Probe``;
* :mod:`.checks`: the checks, plain functions of a probe and a config (a test hands them a
  stand-in probe), each ok, warning or blocker with one line of advice;
* :mod:`.command`: the command, and ``submission_blocker`` that ``hpcjobs submit`` runs
  (the fast checks: no TensorFlow import).
"""
