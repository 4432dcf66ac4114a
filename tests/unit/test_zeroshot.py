"""Zero-shot tasks: the local files read into lm-eval's schemas, lm-eval's prompts on them,
lm-eval's scores against an independent scorer, and the aggregation over shards."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recoup.stages.model import modelio
from recoup.stages.scoring import zeroshot
from recoup.stages.scoring.zeroshot import DEFAULT_TASKS, DocScore, TaskSpec


def _spec(name: str) -> TaskSpec:
    return next(t for t in DEFAULT_TASKS if t.name == name)


def test_readers_turn_the_releases_into_lm_eval_schemas(data_dir: Path) -> None:
    piqa = zeroshot.load_docs(_spec("piqa"), data_dir)
    labels = (data_dir / "piqa/valid-labels.lst").read_text().split()
    assert len(piqa) == len(labels) == 1838
    assert [d["label"] for d in piqa[:5]] == [int(x) for x in labels[:5]]
    assert set(piqa[0]) == {"goal", "sol1", "sol2", "label"}

    arc = zeroshot.load_docs(_spec("arc_challenge"), data_dir)
    assert len(arc) == 1172
    raw = json.loads((data_dir / "arc/ARC-Challenge-Test.jsonl").read_text().splitlines()[0])
    assert arc[0]["question"] == raw["question"]["stem"]
    assert arc[0]["choices"]["label"] == ["A", "B", "C", "D"]
    numeric = next(d for d in arc if d["answerKey"].isdigit())
    assert numeric["answerKey"] in numeric["choices"]["label"]

    boolq = zeroshot.load_docs(_spec("boolq"), data_dir)
    assert len(boolq) == 3270
    # SuperGLUE's passage (what lm-eval's boolq reads) is "title -- passage".
    assert boolq[0]["passage"].startswith("Ethanol fuel -- All biomass goes through")
    assert boolq[0]["label"] == 0

    obqa = zeroshot.load_docs(_spec("openbookqa"), data_dir)
    assert len(obqa) == 500 and obqa[0]["answerKey"] == "B"
    assert obqa[0]["choices"]["text"][1] == "quit eating lunch out"


def test_bad_specs_fail_with_one_sentence(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown task format 'hellaswag'; known formats: arc"):
        TaskSpec(name="x", format="hellaswag", path="x.jsonl")
    with pytest.raises(ValueError, match="needs `labels`"):
        zeroshot.load_docs(TaskSpec(name="p", format="piqa", path="piqa/valid.jsonl"), data_dir)
    with pytest.raises(FileNotFoundError, match="task file not found"):
        zeroshot.load_docs(TaskSpec(name="a", format="arc", path="nope.jsonl"), tmp_path)
    (tmp_path / "short.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="has 2 labels for the 1838 questions"):
        zeroshot.load_docs(TaskSpec(name="p", format="piqa", path="piqa/valid.jsonl",
                                    labels=str(tmp_path / "short.lst")), data_dir)
    with pytest.raises(ValueError, match="registered twice"):
        zeroshot.register_format("arc", lm_eval_yaml="arc/arc_easy.yaml")(zeroshot.read_arc)


#: What lm-eval's own task definitions make of the first document of each task.
EXPECTED_PROMPTS = {
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 2),
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation "
                 "of most food webs?\nAnswer:", 4),
    "boolq": (None, 2),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice "
                   "vacation at the end of the year. After looking over their budget and "
                   "expenses, they decide the best way to save money is to", 4),
}


def test_lm_eval_task_definitions_render_the_local_documents(data_dir: Path) -> None:
    from lm_eval.api.task import ConfigurableTask

    for name, (prompt, n_choices) in EXPECTED_PROMPTS.items():
        spec = _spec(name)
        docs = zeroshot.load_docs(spec, data_dir)
        task = ConfigurableTask(config=zeroshot.task_config(spec, docs, data_dir))
        doc = task.test_docs()[0]
        assert len(task.test_docs()) == len(docs)
        if prompt is not None:
            assert task.doc_to_text(doc) == prompt
        assert len(task.doc_to_choice(doc)) == n_choices
    boolq = _spec("boolq")
    docs = zeroshot.load_docs(boolq, data_dir)
    task = ConfigurableTask(config=zeroshot.task_config(boolq, docs, data_dir))
    doc = task.test_docs()[0]
    assert task.doc_to_choice(doc) == ["no", "yes"] and task.doc_to_target(doc) == 0
    assert task.doc_to_text(doc).endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")


# --------------------------------------------------------------------------- agreement


def reference_scores(model: torch.nn.Module, tokenizer, docs: list[dict],  # noqa: ANN001
                     indices: list[int]) -> list[DocScore]:
    """An independent scorer for ARC, written from the lm-eval documentation, not its
    code: context "Question: {q}\\nAnswer:", continuation " {choice}"; the continuation's
    tokens are those of context+continuation after the context's; ll = their summed
    log-probabilities; acc_norm divides by the choice's length in characters."""
    out = []
    for i in indices:
        doc = docs[i]
        context = f"Question: {doc['question']}\nAnswer:"
        choices = doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        lls = []
        for choice in choices:
            ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx_ids):]
            ids = torch.tensor([whole])
            with torch.inference_mode():
                logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
            # token t is predicted at position t-1
            positions = torch.arange(len(whole) - len(cont) - 1, len(whole) - 1)
            lls.append(float(logp[positions, torch.tensor(cont)].sum()))
        pred = max(range(len(lls)), key=lambda j: lls[j])
        pred_norm = max(range(len(lls)), key=lambda j: lls[j] / len(choices[j]))
        out.append(DocScore(doc=i, gold=gold, acc=float(pred == gold),
                            acc_norm=float(pred_norm == gold), ll=tuple(lls)))
    return out


def test_lm_eval_agrees_with_an_independent_scorer(data_dir: Path) -> None:
    model, tok = modelio.build_tiny_llama(modelio.TinyLlamaConfig(seed=3), torch.float32)
    spec = _spec("arc_challenge")
    docs = zeroshot.load_docs(spec, data_dir)
    # include a question whose labels are digits, and one with 3 or 5 choices
    odd = [i for i, d in enumerate(docs[:400]) if d["answerKey"].isdigit()][:1]
    sizes = [i for i, d in enumerate(docs[:400]) if len(d["choices"]["text"]) != 4][:1]
    indices = sorted({0, 1, 2, 3, *odd, *sizes})
    lm = zeroshot.make_lm(model, tok, batch_size=4)
    got = zeroshot.score_task(lm, spec, docs, indices, data_dir)
    want = reference_scores(model, tok, docs, indices)
    assert [s.doc for s in got] == indices
    for g, w in zip(got, want, strict=True):
        assert g.gold == w.gold
        assert g.ll == pytest.approx(w.ll, abs=1e-3)
        assert (g.acc, g.acc_norm) == (w.acc, w.acc_norm)


@pytest.mark.slow
@pytest.mark.real
def test_lm_eval_agrees_with_the_independent_scorer_on_smollm2(tmp_path: Path,
                                                                data_dir: Path) -> None:
    """The same agreement with a real BPE tokenizer (SmolLM2-135M), 8 ARC-Easy questions."""
    model, tok = modelio.load_source(modelio.SMOLLM2_ALIAS, torch.float32,
                                     trust_remote_code=False, tiny=modelio.TinyLlamaConfig())
    spec = _spec("arc_easy")
    docs = zeroshot.load_docs(spec, data_dir)
    indices = list(range(8))
    got = zeroshot.score_task(zeroshot.make_lm(model, tok, batch_size=8), spec, docs, indices,
                              data_dir)
    want = reference_scores(model, tok, docs, indices)
    for g, w in zip(got, want, strict=True):
        assert g.ll == pytest.approx(w.ll, abs=2e-2)
        assert (g.acc, g.acc_norm) == (w.acc, w.acc_norm)


# --------------------------------------------------------------------------- aggregation


def _scores(accs: list[float], norms: list[float | None]) -> list[DocScore]:
    return [DocScore(doc=i, gold=0, acc=a, acc_norm=n, ll=(0.0,))
            for i, (a, n) in enumerate(zip(accs, norms, strict=True))]


def test_shards_cover_each_document_once_and_aggregate_like_the_whole() -> None:
    chosen = zeroshot.selected_indices(10, limit=7)
    assert chosen == list(range(7))
    assert zeroshot.selected_indices(3, limit=7) == [0, 1, 2]
    shards = [zeroshot.shard_indices(chosen, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == chosen and shards[0] == [0, 3, 6]
    with pytest.raises(ValueError):
        zeroshot.shard_indices(chosen, 3, 3)

    accs = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    norms = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    whole = zeroshot.summarize_task(_scores(accs, norms))
    parts = _scores(accs, norms)
    reordered = zeroshot.summarize_task([parts[i] for s in shards for i in s])
    assert reordered == whole
    assert whole["acc"] == pytest.approx(4 / 7) and whole["acc_norm"] == pytest.approx(5 / 7)
    assert whole["acc_stderr"] == pytest.approx(statistics.stdev(accs) / math.sqrt(7))
    with pytest.raises(ValueError, match="scored twice"):
        zeroshot.summarize_task(parts + parts[:1])


def test_average_uses_acc_where_a_task_has_no_acc_norm() -> None:
    tasks = {"arc": zeroshot.summarize_task(_scores([1.0, 0.0], [1.0, 1.0])),
             "boolq": zeroshot.summarize_task(_scores([1.0, 1.0], [None, None]))}
    assert "acc_norm" not in tasks["boolq"]
    avg = zeroshot.average_accuracy(tasks)
    assert avg["acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert avg["acc_norm"] == pytest.approx((1.0 + 1.0) / 2)
    assert zeroshot.average_accuracy({}) == {}
