"""ptychostream.plugins: processing plugins, host-agnostic, areaDetector-style.

``inference.InferencePlugin`` and ``stitching.StitchingPlugin`` (one class per file, no knowledge
of their host), ``driver.PluginDriver`` (queue, batching, counters: NDPluginDriver's job), and
``pvapy_adapter.InferenceProcessor`` to run inference under ``pvapy-hpc-consumer``.
"""
