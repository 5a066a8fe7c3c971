"""Benchmark: ``python -m ablate.bench [--scale cpu|full|smoke] [--steps N] [--only aug,step,engine,page2019,startup]``.

Five comparisons, measured side by side on one machine, each with its ratio; one module each:

1. ``aug``      (:mod:`.augmentation`) augmentation throughput: the early steps' per-image DataLoader path
                against the step-8 batched device path, same settings (pad-crop 4, flip, cutout 8), same images.
2. ``step``     (:mod:`.steps`) training-step throughput (forward + backward + SGD) of ResNet9 (the Post 4
                recipe) and the final network (the step-8 recipe), per precision the device runs x memory format.
3. ``engine``   (:mod:`.overhead`) the real engine (``ablate.train.train``) on a one-epoch step-8 recipe
                against a bare ~15-line PyTorch loop (:mod:`.bare`) over the same network, data, precision
                and number of steps.
4. ``page2019`` (:mod:`.loops`) ablate's loop (its data path, step, optimiser, EMA) against a plain
                restatement of Page's 2019 loop (:mod:`.page2019`) on steps 4 and 8, same network and
                formats: images/s, page faults and kernel seconds per step, from fp32 NCHW with glibc's
                allocator defaults to the CPU defaults (channels_last, memory kept; glibc's defaults in a
                child process, as the setting cannot be undone); plus one test-set evaluation in the first
                and last of these.
5. ``startup``  (:mod:`.startup`) wall time from launching ``python -m ablate.run +step=step8 scale=smoke``
                to its first training step, and the subprocess's total wall time.

:mod:`.settings` holds the command line and the recipes composed from it, :mod:`.timing` how a region
is timed, :mod:`.tables` the tables and :mod:`.cli` the entry point. Every timed region is bracketed
by device synchronisation and excludes warm-up (docs/timing.md). Results go to ``bench.json`` and
``bench.md`` in ``--out`` (default ``runs/bench/<time>``) with the environment they were measured in.
Performance targets are printed here, never asserted in tests.
"""
