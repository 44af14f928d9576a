"""Step 2 (L0 -> L1): subtract a baseline from an L0 store, giving a float32 L1 store.

The L1 store holds ``images`` as float32 ``L0 - baseline`` (never cast back to the L0
integer type: the original pipeline did, and every negative residual wrapped to ~65535),
the ``baseline`` that was subtracted (with ``baseline_std`` and the hot/dead pixel
masks), and every per-frame array of the L0 store
(``unix_t_ns``, the header arrays, ``time``, ``frame_flags``) value-identical, in
PANOSETI's layout (:mod:`panoseti_pipeline.store.spec`), so their reader opens L1 too.
The L0 may be ours or any store of that layout (``pypff.zarr.convert_run``'s).

Where things are:

* :mod:`.l0_input` -- checking the L0 store, reading frames, which frames feed a baseline;
* :mod:`.methods` -- the baseline methods (mean, median, image_median, ph_pedestal,
  panoseti_analysis): their frame selections, the reduction passes, what is subtracted;
* :mod:`.histogram` -- the exact statistics the methods use: integer moments and the
  two-pass histogram median;
* :mod:`.quality` -- NaN where a quabo is missing, the hot/dead pixel masks, the
  ``summary`` attribute;
* :mod:`.subtract` -- the step itself: create, fill, verify and publish the L1 store,
  its frames in time order (:mod:`panoseti_pipeline.time_order`).

How it runs (DESIGN.md §7): every statistics task owns one chunk-aligned frame range of
``compute_chunk_size`` frames and returns small partial statistics; every writing task
owns whole L1 shards (``shard_factor`` chunks) and streams their files. Each task holds
about one chunk at a time (``ph_pedestal`` included: no task ever holds all times of a
pixel). The baseline is computed once and
broadcast to the tasks that write, so local threads and a Dask cluster give
byte-identical stores.

Notes
-----
Fresh 32 MB output arrays per chunk cost page faults that serialise a process's threads
on these machines (measured: 2 threads no faster than 1); hence each thread reuses its
float32 output buffer (:func:`panoseti_pipeline.runners.thread_array`).

Examples
--------
>>> from panoseti_pipeline.config import load_config
>>> result = subtract_baseline("run_L0.zarr", "run_L1.zarr", load_config(None))  # doctest: +SKIP
>>> print(result.line())                                                         # doctest: +SKIP
"""

from __future__ import annotations

from panoseti_pipeline.step2.subtract import Result, subtract_baseline

__all__ = ["Result", "subtract_baseline"]
