"""prunelab's stages and library.

A file directly in ``stages/`` is a stage (one config class, ``run``, ``restore``, registered with
``pipeline.registry.register_stage``); a folder is a room of the library (``arch``, ``calibration``,
``criteria``, ``selection``, ``surgery``, ``recovery``, ``evaluation``, ``io``, ``core``). Importing this
package imports nothing else: the frame discovers stage modules (``pipeline.registry.load_stages``).
"""
