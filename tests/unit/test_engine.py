"""The DeepSpeed engine settings: the LR schedule and the DeepSpeed config built from the
typed :class:`recoup.cluster.engine.EngineConfig`."""

from __future__ import annotations

import pytest

from recoup.cluster.engine import EngineConfig, deepspeed_config, lr_factor, use_bf16


def test_lr_warmup_starts_above_zero_then_holds_or_decays() -> None:
    f = [lr_factor(s, warmup_steps=4, total_steps=10, schedule="constant") for s in range(10)]
    assert f[:5] == [0.25, 0.5, 0.75, 1.0, 1.0] and f[-1] == 1.0
    d = [lr_factor(s, warmup_steps=2, total_steps=6, schedule="linear") for s in range(6)]
    assert d == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor(0, warmup_steps=0, total_steps=3, schedule="constant") == 1.0


def test_deepspeed_config_from_the_typed_config() -> None:
    cfg = EngineConfig(zero_stage=3, offload_optimizer=True, offload_params=True, micro_batch=2,
                       grad_accum=3, grad_clip=0.5)
    ds = deepspeed_config(cfg, world_size=2, bf16=False)
    assert ds["train_batch_size"] == 12
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": False}
    assert use_bf16(EngineConfig(), "cuda") and not use_bf16(EngineConfig(), "cpu")


def test_engine_config_refuses_param_offload_without_zero3() -> None:
    with pytest.raises(ValueError, match="zero_stage 3"):
        EngineConfig(zero_stage=2, offload_params=True)


def test_zero3_limits_are_sized_by_the_block_and_touch_only_stage3() -> None:
    from recoup.cluster.engine import ZERO3_LIVE_BLOCKS, with_zero3_limits, zero3_live_limits

    assert zero3_live_limits(1000) == {"stage3_max_live_parameters": ZERO3_LIVE_BLOCKS * 1000,
                                       "stage3_max_reuse_distance": 1000,
                                       "stage3_prefetch_bucket_size": 1000}
    with pytest.raises(ValueError, match="block_params"):
        zero3_live_limits(0)
    z3 = deepspeed_config(EngineConfig(zero_stage=3), world_size=2, bf16=False)
    limited = with_zero3_limits(z3, 1000)
    assert limited["zero_optimization"] == {**z3["zero_optimization"], **zero3_live_limits(1000)}
    assert "stage3_max_live_parameters" not in z3["zero_optimization"]  # input left alone
    z2 = deepspeed_config(EngineConfig(zero_stage=2), world_size=2, bf16=False)
    assert with_zero3_limits(z2, 1000) == z2
    assert with_zero3_limits(z3, 0) == z3  # no repeated block: DeepSpeed's limits stand


def test_largest_block_is_a_decoder_layer() -> None:
    import torch

    from recoup.cluster.train_task import largest_block_params
    from tests.conftest import tiny_pruned_llama

    model = tiny_pruned_llama()
    layer = model.model.layers[0]
    assert largest_block_params(model) == sum(p.numel() for p in layer.parameters())
    assert largest_block_params(torch.nn.Linear(4, 4)) == 0


def test_a_deepspeed_loaded_for_another_device_is_refused_by_name(monkeypatch) -> None:
    """DeepSpeed picks its accelerator once per process: a GPU run in a process whose
    DeepSpeed took the CPU accelerator (an inherited DS_ACCELERATOR=cpu) stops at once,
    naming the variable, instead of failing later on tensors of the wrong device."""
    import os

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (loaded here for the CPU, as the CPU tests load it)
    from deepspeed.accelerator import get_accelerator

    from recoup.cluster.train import _set_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed was loaded for another device earlier in this process")
    _set_accelerator("cpu")  # the device it was loaded for: fine
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda"):
        _set_accelerator("cuda")
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # left as it was: deepspeed was loaded


@pytest.mark.parametrize(("device", "env", "want"), [
    ("cuda", {"LOCAL_RANK": "3", "WORLD_SIZE": "8"}, "cuda:3"),  # Ray Train / torchrun
    ("cuda:1", {"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "cuda:1"),  # in-process, cuda:N
    ("cuda:1", {"LOCAL_RANK": "2", "WORLD_SIZE": "4"}, "cuda:2"),  # workers: the local rank
    ("cpu", {"LOCAL_RANK": "2", "WORLD_SIZE": "4"}, "cpu"),
])
def test_a_worker_takes_and_sets_its_gpu(monkeypatch, device: str, env: dict[str, str],
                                          want: str) -> None:
    """The device a training worker runs on, made current for DeepSpeed (CUDA's own
    ``set_device`` recorded here: no GPU needed)."""
    import torch

    from recoup.cluster.train import _worker_device

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    current: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    got = _worker_device(device)
    assert str(got) == want
    assert current == ([got] if want != "cpu" else [])
