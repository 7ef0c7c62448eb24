"""The TensorRT engine of the export, one idea per module:

- `machine`     what this machine offers a plan (GPU, TensorRT version, builder probe) and whether a plan fits
- `fp16_graph`  the FP16 copy of the ONNX graph with the nodes that stay FP32 (CPU only, no TensorRT)
- `build`       building `model.plan`, its timing cache and `layers.json`
- `runner`      `PlanRunner`, running a plan by tensor name
- `parity`      the plan against the fp32 model: the rule a plan must pass to be served

Nothing here imports `tensorrt` eagerly: it is optional, and without it (or a GPU) the export logs one line
and moves on.
"""
