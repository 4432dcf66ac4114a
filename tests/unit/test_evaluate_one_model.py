"""evaluate's WikiText scoring with one model resident at a time (stages/scoring/wikitext.py,
stages/scoring/dense_logprobs.py) against the joint formula: every model's perplexity and
KL(dense || model) from lm_metrics.token_nll / token_kl on the logits of both models at
once. Perplexity is the same computation; KL differs only by the float16 rounding of the
stored dense log-probs. Plus the spreading rule of modelio.load_model_spread and the plan's
GPU count for a spread model."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from recoup.orchestrator.estimate import gpus_spread
from recoup.stages.model import lm_metrics
from recoup.stages.model.modelio import (
    TinyLlamaConfig,
    build_tiny_llama,
    load_model_spread,
    save_model,
    spread_budget,
    stored_weight_bytes,
)
from recoup.stages.scoring import wikitext
from recoup.stages.scoring.dense_logprobs import DenseLogProbs

TINY = TinyLlamaConfig(layers=2, hidden=64, heads=4, kv_heads=2)
NAMES = ("dense", "degraded", "recovered")
#: the relative change a model's weights get, by name: degraded far from dense, recovered near
NOISE = {"dense": 0.0, "degraded": 0.5, "recovered": 0.1}
WINDOWS, SEQ, BATCH = 5, 24, 2  # 5 windows in batches of 2: a ragged last batch
#: float16 keeps a log-prob to 2**-11 relative; after renormalising, the mean KL keeps a
#: second-order bias of half the rounding's variance (about 6e-7 at the tiny model's
#: near-uniform log-probs around -5.5, where float16's spacing is 2**-8)
KL_RTOL, KL_ATOL = 1e-3, 1e-6


def _model(name: str, device: str = "cpu") -> torch.nn.Module:
    """The tiny Llama; the others are dense with seeded relative noise on every weight."""
    model, _ = build_tiny_llama(TINY, torch.float32)
    if NOISE[name]:
        g = torch.Generator().manual_seed(NAMES.index(name))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + NOISE[name] * torch.randn(p.shape, generator=g))
    return model.to(device)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 250, (WINDOWS, SEQ), generator=g)  # (W, T)


@pytest.fixture(scope="module")
def joint(windows: torch.Tensor) -> dict[str, dict[str, float]]:
    """The old joint computation: all models' logits side by side, lm_metrics' formulas."""
    with torch.no_grad():
        logits = {n: _model(n)(windows).logits for n in NAMES}  # (W, T, V) each
    out = {}
    for n in NAMES:
        nll = float(lm_metrics.token_nll(logits[n], windows).double().sum())
        kl = lm_metrics.token_kl(logits["dense"], logits[n]).double().mean()
        out[n] = {"ppl": lm_metrics.perplexity(nll, windows.shape[0] * (SEQ - 1)),
                  "kl_to_dense": float(kl)}
    return out


class Loader:
    """Loads models by name and checks that the previous one was released first (the
    scorer drops its reference and collects garbage before the next load)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.order: list[str] = []
        self.alive: list[weakref.ref] = []

    def __call__(self, name: str) -> torch.nn.Module:
        assert all(r() is None for r in self.alive), "a previous model is still resident"
        model = _model(name, self.device)
        self.order.append(name)
        self.alive.append(weakref.ref(model))
        return model


def test_one_at_a_time_equals_the_joint_computation(windows: torch.Tensor, joint: dict,
                                                    tmp_path: Path) -> None:
    load, finished = Loader(), []
    path = tmp_path / "stage" / ".dense-logprobs.npy"
    got = wikitext.score_one_at_a_time(load, NAMES, "dense", windows, BATCH, path,
                                       done=lambda n, r: finished.append(n))
    ref = joint
    assert load.order == finished == list(NAMES)  # dense first, then each alone
    assert got["dense"]["kl_to_dense"] == 0.0
    for n in NAMES:
        assert got[n]["ppl"] == pytest.approx(ref[n]["ppl"], rel=1e-6), n
        assert got[n]["kl_to_dense"] == pytest.approx(ref[n]["kl_to_dense"], rel=KL_RTOL,
                                                      abs=KL_ATOL), n
    assert got["degraded"]["kl_to_dense"] > got["recovered"]["kl_to_dense"] > 0
    assert not path.exists()  # the stored log-probs live only while the scoring runs


def test_cached_dense_still_runs_first_for_the_others_kl(windows: torch.Tensor, joint: dict,
                                                         tmp_path: Path) -> None:
    load = Loader()
    got = wikitext.score_one_at_a_time(load, ["degraded"], "dense", windows, BATCH,
                                       tmp_path / "lp.npy")
    assert load.order == ["dense", "degraded"] and set(got) == {"degraded"}
    ref = joint["degraded"]
    assert got["degraded"]["kl_to_dense"] == pytest.approx(ref["kl_to_dense"], rel=KL_RTOL,
                                                           abs=KL_ATOL)
    alone = wikitext.score_one_at_a_time(Loader(), ["dense"], "dense", windows, BATCH,
                                         tmp_path / "unused.npy")
    assert set(alone) == {"dense"} and not (tmp_path / "unused.npy").exists()


def test_a_model_with_another_vocabulary_is_refused(windows: torch.Tensor,
                                                    tmp_path: Path) -> None:
    def load(name: str) -> torch.nn.Module:
        model = _model(name)
        if name == "degraded":
            model.resize_token_embeddings(300)
        return model

    with pytest.raises(ValueError, match="'degraded' has a vocabulary of 300"):
        wikitext.score_one_at_a_time(load, NAMES[:2], "dense", windows, BATCH,
                                     tmp_path / "lp.npy")
    assert not (tmp_path / "lp.npy").exists()  # removed on error too


def test_stored_log_probs_are_the_float16_log_softmax(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(3 * torch.randn(5, 6, 11, generator=g), dim=-1)  # (W, T, V)
    store = DenseLogProbs(tmp_path / "lp.npy", windows=5, seq_len=6)
    with pytest.raises(RuntimeError, match="read before"):
        store.read(0, 1)
    for start in (0, 2, 4):
        store.write(start, logp[start:start + 2])
    with pytest.raises(ValueError, match="expected 5"):
        store.write(0, logp[:1])
    store.finish()
    assert store.vocab == 11
    on_disk = np.load(tmp_path / "lp.npy")
    assert on_disk.dtype == np.float16 and on_disk.shape == (5, 6, 11)
    assert torch.equal(store.read(1, 4), logp[1:4].half())
    store.remove()
    assert not (tmp_path / "lp.npy").exists()


def test_nll_and_kl_sums_equal_lm_metrics() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 7, 13, generator=g), torch.randn(2, 7, 13, generator=g)
    ids = torch.randint(0, 13, (2, 7), generator=g)
    la, lb = wikitext.log_probs(a), wikitext.log_probs(b)
    assert wikitext.nll_sum(lb, ids) == pytest.approx(
        float(lm_metrics.token_nll(b, ids).double().sum()), rel=1e-6)
    exact = float(lm_metrics.token_kl(a, b).double().sum())
    assert wikitext.kl_sum(la, lb) == pytest.approx(exact, rel=1e-6)
    assert wikitext.kl_sum(la.half(), lb) == pytest.approx(exact, rel=KL_RTOL,
                                                           abs=14 * KL_ATOL)  # 14 positions


def test_spread_budget_only_when_the_model_does_not_fit_one_gpu() -> None:
    gb = 10**9
    free = [80 * gb, 80 * gb, 80 * gb]
    assert spread_budget(26 * gb, free) is None  # fits the first GPU
    assert spread_budget(138 * gb, free[:1]) is None  # one GPU: nothing to spread over
    budget = spread_budget(138 * gb, free, reserve_bytes=2 * gb)
    assert budget == {i: 72 * gb - 2 * gb for i in range(3)}
    with pytest.raises(ValueError, match="do not fit the 2 visible GPUs"):
        spread_budget(200 * gb, free[:2])


def test_plan_gpus_for_a_spread_model() -> None:
    gb, usable = 10**9, 72 * 10**9
    assert gpus_spread(26 * gb, 2 * gb, gb, usable) == 1
    # 70B: 138 GB in 1.7 GB layers beside a 1.6 GB batch: 68.7 GB per GPU -> 3, not 2
    assert gpus_spread(138 * gb, int(1.6 * gb), int(1.7 * gb), usable) == 3
    assert gpus_spread(100 * gb, 71 * gb, 2 * gb, usable) is None


def test_load_model_spread_on_cpu_is_load_model(tmp_path: Path) -> None:
    model, tok = build_tiny_llama(TINY, torch.float32)
    save_model(model, tok, tmp_path / "m")
    assert stored_weight_bytes(tmp_path / "m") >= sum(
        p.numel() * 4 for p in model.parameters())
    loaded = load_model_spread(tmp_path / "m", torch.float32, "cpu")
    assert not hasattr(loaded, "hf_device_map")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_equals_the_joint_computation(windows: torch.Tensor, joint: dict,
                                               tmp_path: Path) -> None:
    got = wikitext.score_one_at_a_time(Loader("cuda"), NAMES, "dense", windows, BATCH,
                                       tmp_path / "lp.npy")
    ref = joint
    for n in NAMES:
        assert got[n]["ppl"] == pytest.approx(ref[n]["ppl"], rel=1e-4), n
        assert got[n]["kl_to_dense"] == pytest.approx(ref[n]["kl_to_dense"], rel=1e-2,
                                                      abs=1e-6), n


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_model_larger_than_one_gpu_is_spread(tmp_path: Path, windows: torch.Tensor) -> None:
    """Reserving all but 60% of the model's size on every GPU forces a spread."""
    model, tok = build_tiny_llama(TINY, torch.float32)
    save_model(model, tok, tmp_path / "m")
    size = stored_weight_bytes(tmp_path / "m")
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    spread = load_model_spread(tmp_path / "m", torch.float32, "cuda",
                               reserve_bytes=int(free * 0.9) - int(0.6 * size))
    assert len({str(d) for d in spread.hf_device_map.values()}) >= 2
    with torch.no_grad():
        got = spread(windows.to("cuda:0")).logits.cpu()
        ref = model(windows).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
