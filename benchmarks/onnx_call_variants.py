"""Direct-call latency of the ONNX backend in two forms, and with Python's garbage collector on or frozen, in
interleaved blocks (this VM's noise drifts within minutes, so the variants alternate). Random-weight lift-sized
DBP MLP, as benchmarks/deploy_latency.py. Prints per variant the median over blocks of the p50 and every block's p99.

    taskset -c 0 sudo chrt -f 50 python benchmarks/onnx_call_variants.py [--blocks 4 --calls 3000]

Variants: `session.run` (a dict of inputs, a new output array per call) against robot_deploy.make_backend's
I/O binding (inputs bound in place, output to a preallocated buffer); gc enabled against gc.freeze() + gc.disable().
"""

import gc
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import robot_deploy as rd  # noqa: E402
from dbp_bc import DriftPolicy  # noqa: E402
from deploy_latency import time_calls  # noqa: E402


@dataclass
class Args:
    blocks: int = 4
    """interleaved blocks per variant"""
    calls: int = 3000
    """timed calls per block (after 500 warm-up calls)"""


if __name__ == "__main__":
    import onnxruntime as ort

    args = tyro.cli(Args)
    torch.set_num_threads(1)
    policy, tmp = DriftPolicy(19, 7, 1, 4, 4).eval(), tempfile.mkdtemp(prefix="onnx_call_")
    io_binding = rd.make_backend(policy, "onnx", tmp)  # also writes tmp/policy.onnx
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(os.path.join(tmp, "policy.onnx"), options, providers=["CPUExecutionProvider"])
    backends = {"session.run": lambda obs, z: session.run(None, {"obs": obs, "z": z})[0], "io_binding": io_binding}
    rng, results = np.random.default_rng(0), {}
    for _ in range(args.blocks):
        for name, infer in backends.items():
            for frozen in (False, True):
                if frozen:
                    gc.collect(), gc.freeze(), gc.disable()
                results.setdefault((name, frozen), []).append(time_calls(policy, infer, args.calls, rng))
                gc.enable(), gc.unfreeze()
    for (name, frozen), r in results.items():
        r = np.array(r)
        print(f"{name:12s} gc {'frozen' if frozen else 'on':6s}: p50 (median over blocks) {np.median(r[:, 0]):.0f} us, "
              f"p99 per block {' '.join(f'{x:.0f}' for x in r[:, 2])} us")
