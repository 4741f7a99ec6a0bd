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

Helpers of the search: ``plans`` (the value types ``Workload``, ``Slo``, ``StagePlan``, ``ReplicaPlan``, ``Plan``
and ``PlannerError``, re-exported by ``search``), ``replica`` (one replica's operating point and layer split),
``partition`` (the annealing over GPU groupings), ``planbuild`` (replicas into a plan, plan scores),
``symmetric`` (the symmetric baselines), ``refine`` (layer splits re-ranked by the simulator) and
``sim_replica`` (one replica of the simulator).

Units: times in seconds, sizes in bytes, bandwidths in bytes/s, compute rates in FLOP/s, unless a name says
otherwise (``memory_gib``, ``peak_tflops``, ``latency_us``, ...). Invalid input raises ``ConfigError`` naming
the field; a cluster on which nothing fits raises ``PlannerError`` (both ``HexGenError``).

What the automatic placement relies on, and so must keep its meaning: ``plan_cluster(cluster, cost,
Workload(prompt_len, output_len), Slo(latency_s), time_budget_s=, seed=)``; ``Plan.replicas`` and ``.rate``;
``ReplicaPlan.stages``, ``.hetero_config``, ``.pp_partition`` and ``.rate``; ``StagePlan.gpus`` (one node),
``.layers`` and ``.layer_start``; ``Gpu.node`` and ``.index`` (the position in its node); ``Cluster``, ``Node``,
``Link``, ``default_intra`` and ``DEFAULT_INTER``; ``device_spec`` (case- and punctuation-insensitive, with
aliases); ``report.plan_table(plan, compare=False)``.
"""
