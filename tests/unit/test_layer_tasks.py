"""Pure parts of the svd / select stages: map_layers in-process, the per-layer SVD, the
batched KL head scores against a one-head-at-a-time direct computation, the heat map."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recoup.cluster.config import ClusterConfig
from recoup.cluster.tasks import map_layers, task_threads
from recoup.stages.document.heatmap import plot_head_scores
from recoup.stages.lcc.directions import svd_directions
from recoup.stages.model import lm_metrics, modelio
from recoup.stages.select import dense_log_probs, kl_head_scores
from recoup.stages.svd import layer_svd

INPROCESS = ClusterConfig(mode="inprocess")


def _square_and_threads(x: int) -> tuple[int, int]:
    return x * x, torch.get_num_threads()


def _fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("layer 2 is broken")
    return x


def test_map_layers_in_process_keeps_order_and_sets_threads() -> None:
    before = torch.get_num_threads()
    out = map_layers(_square_and_threads, [(i,) for i in range(5)], INPROCESS,
                     num_cpus_per_task=1.0, progress=False)
    assert [sq for sq, _ in out] == [0, 1, 4, 9, 16]
    assert {threads for _, threads in out} == {1}
    assert torch.get_num_threads() == before
    assert task_threads(0.5) == 1 and task_threads(2.0) == 2 and task_threads(1.5) == 2
    assert map_layers(_square_and_threads, [], INPROCESS, progress=False) == []


def test_map_layers_raises_the_task_error() -> None:
    with pytest.raises(ValueError, match="layer 2 is broken"):
        map_layers(_fail_on_two, [(i,) for i in range(4)], INPROCESS, progress=False)
    with pytest.raises(ValueError, match="max_parallel"):
        map_layers(_fail_on_two, [(1,)], INPROCESS, max_parallel=0, progress=False)


def test_layer_svd_is_svd_directions_per_head() -> None:
    g = torch.Generator().manual_seed(0)
    n, heads, d = 20, 3, 5
    dense = torch.randn(n, heads * d, generator=g)
    degraded = torch.randn(n, heads * d, generator=g)
    V, S = layer_svd(dense, degraded, heads)
    assert V.shape == (heads, d, d) and S.shape == (heads, d) and V.dtype == torch.float64
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)  # head h owns these columns of o_proj's input
        v, s = svd_directions(dense[:, cols].double() - degraded[:, cols].double())
        torch.testing.assert_close(V[h], v, rtol=0, atol=0)
        torch.testing.assert_close(S[h], s, rtol=0, atol=0)


def _direct_kl_drop(dense: torch.nn.Module, degraded: torch.nn.Module, layer: int, head: int,
                    c: torch.Tensor, ids: torch.Tensor) -> float:
    """Baseline KL minus KL with ``c`` added to one head's o_proj input: one model, one head,
    no batching, written out directly."""
    d_head = c.numel()

    def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0].clone()  # (B, T, H * d)
        x[..., head * d_head:(head + 1) * d_head] += c.float()
        return (x,)

    with torch.inference_mode():
        ref = dense(ids).logits
        base = lm_metrics.token_kl(ref, degraded(ids).logits).double().mean()
        handle = degraded.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)
        try:
            moved = lm_metrics.token_kl(ref, degraded(ids).logits).double().mean()
        finally:
            handle.remove()
    return float(base - moved)


def test_kl_head_scores_match_one_head_at_a_time() -> None:
    tiny = modelio.TinyLlamaConfig(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    dense, _ = modelio.build_tiny_llama(tiny, torch.float32)
    degraded, _ = modelio.build_tiny_llama(tiny.model_copy(update={"seed": 1}), torch.float32)
    d_head = tiny.hidden // tiny.heads
    g = torch.Generator().manual_seed(3)
    comps = torch.randn(tiny.layers, tiny.heads, d_head, generator=g, dtype=torch.float64)
    comps[0, 1] = 0.0  # no lost component: scores exactly 0, no forward
    ids = torch.randint(3, 200, (3, 12), generator=g)  # (W, T)
    ref = dense_log_probs(dense, ids, batch_size=2)  # (W, T, V): dense, then released
    scores, base, sequences = kl_head_scores(ref, degraded, comps, ids, batch_size=5)
    assert sequences == (tiny.layers * tiny.heads - 1) * 3
    assert scores[0, 1] == 0.0
    with torch.inference_mode():
        want_base = lm_metrics.token_kl(dense(ids).logits, degraded(ids).logits).double().mean()
    assert base == pytest.approx(float(want_base), rel=1e-5)
    for layer, h in [(0, 0), (1, 3)]:  # one head per layer, both ends of a batch
        want = _direct_kl_drop(dense, degraded, layer, h, comps[layer, h], ids)
        assert float(scores[layer, h]) == pytest.approx(want, rel=1e-3, abs=1e-6)
    again, _, _ = kl_head_scores(ref, degraded, comps, ids, batch_size=2)
    torch.testing.assert_close(again, scores, rtol=1e-4, atol=1e-7)


def test_heatmap_writes_a_png_and_checks_heads(tmp_path: Path) -> None:
    scores = torch.arange(30 * 9, dtype=torch.float64).reshape(30, 9)
    out = tmp_path / "scores.png"
    plot_head_scores(scores, [(29, 8), (0, 0)], out, title="test")
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in tmp_path.iterdir()] == ["scores.png"]  # no temporaries left
    with pytest.raises(ValueError, match="outside"):
        plot_head_scores(scores, [(9, 29)], tmp_path / "bad.png", title="swapped")
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        plot_head_scores(scores.flatten(), [], tmp_path / "flat.png", title="flat")
