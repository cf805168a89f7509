"""What CPU can show of the GPU paths: the device is chosen (never a silent fallback) and named, a resume keeps the
optimizer's step counters on the host, one collective backend per group, the test cluster's GPU counts, the torch
floor. The GPU itself is checked by scripts/gpu_check.py (and the `gpu` tests), which skip without CUDA."""

import re
from pathlib import Path

import pytest
import tomllib
import torch

from model_worker.data_parallel import backend_for
from model_worker.device import cuda_unavailable_reason, resolve_device
from model_worker.train import TrainConfig, Trainer

ROOT = Path(__file__).parent.parent
no_cuda = pytest.mark.skipif(cuda_unavailable_reason() is None, reason="CUDA is usable here")


def test_auto_picks_what_torch_can_use_and_unknown_devices_are_refused():
    assert resolve_device("auto").type == ("cpu" if cuda_unavailable_reason() else "cuda")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("mps")
    with pytest.raises(RuntimeError):
        resolve_device("gpu")  # not a torch device type at all


@no_cuda
def test_cuda_asked_for_where_it_cannot_be_used_is_refused_with_the_cause(monkeypatch):
    with pytest.raises(ValueError, match="device cuda was asked for but cannot be used: "):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="cannot be used"):
        resolve_device("cuda:1")
    if torch.version.cuda is not None:  # a CUDA build: Ray's masking is named
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        assert "CUDA_VISIBLE_DEVICES" in cuda_unavailable_reason()
    else:
        assert "has no CUDA support" in cuda_unavailable_reason()


@no_cuda
def test_engram_train_with_device_cuda_fails_fast_instead_of_training_on_the_cpu(tmp_path, capsys):
    from orchestration.cli import main

    code = main(["train", "--preset", "tiny", "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 2
    assert "device cuda was asked for but cannot be used" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_one_collective_backend_per_device_type():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"  # host tensors still go through gloo


@pytest.mark.slow
def test_a_resume_loads_on_the_host_and_the_summary_names_the_device(tmp_path, small_corpus, small_tokenizer,
                                                                     monkeypatch):
    """Checkpoints load with map_location='cpu': load_state_dict then moves the moments to the parameters' device
    and leaves AdamW's step counters on the host (on a GPU they would be read back twice per parameter, every step)."""
    config = TrainConfig(preset="tiny", steps=4, batch_size=2, seq_len=32, warmup_steps=1, eval_every=4, eval_batches=1,
                         ckpt_every=4, out_dir=str(tmp_path / "run"), data=str(small_corpus), tokenizer=str(small_tokenizer))
    summary = Trainer(config, progress=False, log=lambda *a: None).run()
    assert summary["device"] == str(resolve_device("auto"))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("map_location")) or real_load(*a, **kw))
    resumed = Trainer(config, progress=False, log=lambda *a: None)
    resumed.load(tmp_path / "run" / "checkpoint")
    assert loads == ["cpu"]
    states = list(resumed.optimizer.state.values())
    assert states and all(s["step"].device.type == "cpu" for s in states)
    assert all(s["exp_avg"].device == resumed.device for s in states)

    from model_worker.generate import Generator

    generator = Generator.from_checkpoint(tmp_path / "run" / "checkpoint")
    assert loads[-1] == "cpu" and generator.device == resolve_device("auto")
    assert generator.dtype == (torch.bfloat16 if generator.device.type == "cuda" else torch.float32)


def test_the_test_cluster_gives_gpus_to_the_model_worker_node_only(ray_cluster):
    import ray
    from conftest import usable_gpus

    gpus = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}
    assert gpus.pop(ray_cluster["gpu_node"]) == ray_cluster["gpus"] == (usable_gpus() or 2)
    assert set(gpus.values()) == {0}  # head and memory nodes: none, even on a GPU host


def test_the_torch_floor_has_what_the_model_uses():
    requirement = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                       if r.startswith("torch"))
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", requirement).group(1).split(".")[:2])
    assert floor >= (2, 5)  # scaled_dot_product_attention(enable_gqa=...) came in 2.5
    installed = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= floor
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    assert torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).shape == (1, 4, 3, 8)


@no_cuda
def test_the_gpu_check_skips_cleanly_without_cuda():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("gpu_check: skipped: "), out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(cuda_unavailable_reason() is not None, reason="needs CUDA")
def test_the_gpu_check_passes_on_a_gpu():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--skip-bench"], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
