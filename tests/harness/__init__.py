"""The tests' SLURM harness (not part of the installed package).

- :mod:`tests.harness.slurm_cluster`: :class:`LocalSlurmCluster`, a real one-node SLURM cluster
  (slurmctld, slurmd, slurmdbd on MariaDB) on the loopback interface, started and stopped by the tests;
  the multi-node cluster of ``tests/integration/multinode/netns_cluster.py`` extends it.
- :mod:`tests.harness.slurm_jobs`: small functions submitted through submitit by the cluster tests.

Jobs find these modules through ``PYTHONPATH`` = the repository root (``tests`` is a package).
"""
