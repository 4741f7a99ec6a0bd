"""The device kernels and their launch settings: Triton paged attention, fused elementwise ops, GEMV, PDL, the
fp8 KV-cache quantization, the CPU weight layout, host-to-device staging and replay timing.

Nothing here knows the model, the engine or the process groups: ``hexgen.model`` and ``hexgen.parallel`` call
into this package, never the other way round. ``choice.resolve`` decides once per stage which kernels run on
its device.
"""
