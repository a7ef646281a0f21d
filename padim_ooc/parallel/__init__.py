"""Everything that runs on a Dask cluster, and only that.

- :mod:`.client`: a ``distributed.Client`` for a run: a local cluster or an existing scheduler;
- :mod:`.tasks`: the plumbing every cluster run shares (errors as values, results in order of
  completion, computing Dask objects, shard ranges);
- :mod:`.fit_shards`: the sharded fit (one partial store per shard, then a tree merge);
- :mod:`.score_shards`: sharded scoring (bounded shards, results placed in input order).

The maths and the store are not here: a shard task calls the same functions a one-process
run calls (:func:`padim_ooc.fit.fold_images`, :func:`padim_ooc.score.score_images`).
"""
