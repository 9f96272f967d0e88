"""Data-parallel AdapterTrainer: ``torchrun --nproc_per_node=2`` on CPU (gloo) against one process with the
same global batch. Both ranks must end with identical adapter weights, only rank 0 writes adapter
checkpoints, and the result must match single-process training."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "examples", "ddp_tiny_train.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_tiny_train", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_rank_ddp_matches_single_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
           "--output-dir", str(ddp_dir), "--per-device-batch", "2", "--steps", "4", "--save-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    info = [json.loads((ddp_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in info] == [2, 2]
    assert [i["global_step"] for i in info] == [4, 4]
    assert info[0]["save_calls"] == 2 and info[1]["save_calls"] == 0  # only rank 0 writes adapter checkpoints

    w0 = load_file(str(ddp_dir / "rank0.safetensors"))
    w1 = load_file(str(ddp_dir / "rank1.safetensors"))
    assert set(w0) == set(w1) and w0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # DDP keeps replicas bit-identical

    ckpt = ddp_dir / "ckpt" / "checkpoint-4"
    assert json.loads((ckpt / "adapter_trainer.json").read_text())["adapters"] == {"a": "a"}
    assert not (ckpt / "model.safetensors").exists()
    saved = load_file(str(ckpt / "a" / "adapter.safetensors"))
    for k in w0:
        assert torch.equal(saved[k], w0[k])

    # one process, 4 rows per step: same rows per step, same updates
    single = _load_worker().run(str(single_dir), per_device_batch=4, steps=4, save_steps=2)
    for k in w0:
        torch.testing.assert_close(w0[k], single[k], rtol=1e-4, atol=1e-5)
    zero_b = [k for k in w0 if "lora_B" in k]
    moved = sum(int(w0[k].abs().sum() > 0) for k in zero_b)  # B starts at zero: training moved every one
    assert zero_b and moved == len(zero_b)
