"""Heterogeneity-aware planner: cluster description, cost model, layout search, simulator.

Modules (one job each):
- ``devices``     built-in GPU specs (peak fp16/bf16 rate, memory size and bandwidth), overridable.
- ``cluster``     the cluster description (TOML in ``config/``): nodes, GPUs, links.
- ``costmodel``   time of one layer's prefill/decode, TP all-reduce, stage transfer, and memory, for any
                  Llama config; uses a calibration file from ``bin/hexgen profile`` when given one.
- ``calibration`` the calibration file format and ``bin/hexgen profile``'s measurements.
- ``search``      partition GPUs into replicas and stages, choose TP degrees and layer splits.
- ``simulator``   discrete-event simulation of a request stream through a planned deployment.
- ``report``      the plan as a table and as a deployment TOML that ``bin/head``/``bin/worker`` run.
- ``placement``   ``bin/head --auto-plan``: plan from registered workers and assign them stages.
"""
