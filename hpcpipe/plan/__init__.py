"""Layout planner: choose (dp, pp, tp, V, M, schedule, recompute, zero) for a model on a cluster.

- flops.py: parameters and FLOPs per layer, per step (model and hardware FLOPs)
- devices.py: known accelerators (peak TFLOP/s, memory, bandwidths) and device profiles
- profile.py: `hpcpipe plan --profile OUT.json`: time this machine's layers and links
- memory.py: bytes per GPU of a layout (parameters, gradients, optimizer, activations, buffers)
- timemodel.py: predicted step time of a layout (per-stage costs, comm, the pipeline simulator)
- search.py: enumerate layouts, reject those that cannot run (saying why), rank the rest
- presets.py: model keys of well-known models (gpt3-175b, llama3-8b/70b/405b)
"""
