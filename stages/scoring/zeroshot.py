"""Zero-shot multiple-choice accuracy, scored by lm-evaluation-harness on local files.

The numbers are lm-eval's: its own task definitions (prompt template, answer choices,
gold index, metrics; read from the YAML files that ship inside the ``lm_eval`` package)
and its own scoring (``HFLM`` log-likelihood of each choice given the context; ``acc`` =
argmax of the summed log-likelihood, ``acc_norm`` = argmax of log-likelihood divided by
the choice's length in characters). What lm-eval cannot do here is read the data: its
tasks download Hugging Face datasets, while recoup runs offline on the original releases
in the data directory. So each *format* below converts one original release into the
record schema of the Hugging Face dataset that lm-eval's task was written for, and the
task gets those records through lm-eval's ``custom_dataset`` hook. Nothing is downloaded.

Formats (original release -> the HF schema lm-eval reads; lm-eval task definition):

- ``piqa``: ``goal, sol1, sol2`` + a labels file -> ``goal, sol1, sol2, label``;
  ``piqa/piqa.yaml``.
- ``arc``: ``question.stem``, ``question.choices``, ``answerKey`` ->
  ``question, choices{text, label}, answerKey``; ``arc/arc_easy.yaml`` (Easy and Challenge).
- ``boolq``: ``question, title, passage, answer`` -> ``question, passage, label`` with
  SuperGLUE's passage ``"title -- passage"``; ``super_glue/boolq/default.yaml``.
- ``openbookqa``: ``question.stem``, ``question.choices``, ``answerKey`` ->
  ``question_stem, choices{text, label}, answerKey``; ``openbookqa/openbookqa.yaml``.

Any other task in one of these formats (another ARC-style file, say) is one more
:class:`TaskSpec`. A format is one registered reader; :func:`register_format` refuses
duplicate names.

``limit`` takes the first documents of a task, as lm-eval's ``--limit`` does; the
documents to score are passed to lm-eval as explicit indices, which is also how the
evaluate stage shards a task over Ray workers (:func:`shard_indices`). Per-document
results come back from lm-eval's logged samples, so shards aggregate exactly
(:func:`summarize_task`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.registry import Registry

Doc = dict[str, Any]
Reader = Callable[[Path, "Path | None"], list[Doc]]


@dataclass(frozen=True, kw_only=True)
class TaskFormat:
    name: str
    #: lm-eval task definition (relative to the ``lm_eval/tasks`` folder) whose prompt,
    #: choices, target and metrics are used
    lm_eval_yaml: str
    read: Reader
    #: the answers come in a separate file (PIQA's ``valid-labels.lst``)
    needs_labels: bool = False


_FORMATS: Registry[TaskFormat] = Registry(
    "task format", unknown="unknown task format {name!r}; known formats: {known}")


def register_format(name: str, *, lm_eval_yaml: str,
                    needs_labels: bool = False) -> Callable[[Reader], Reader]:
    """Register a reader ``(path, labels_path) -> HF-schema records`` as format ``name``."""

    def deco(fn: Reader) -> Reader:
        _FORMATS.add(name, TaskFormat(name=name, lm_eval_yaml=lm_eval_yaml, read=fn,
                                      needs_labels=needs_labels))
        return fn

    return deco


def get_format(name: str) -> TaskFormat:
    return _FORMATS.get(name)


def format_names() -> tuple[str, ...]:
    return _FORMATS.names()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
    return rows


def _choices(question: dict[str, Any]) -> dict[str, list[str]]:
    """``[{"text", "label"}, ...]`` -> ``{"text": [...], "label": [...]}`` (HF layout)."""
    items = question["choices"]
    return {"text": [c["text"] for c in items], "label": [c["label"] for c in items]}


@register_format("piqa", lm_eval_yaml="piqa/piqa.yaml", needs_labels=True)
def read_piqa(path: Path, labels: Path | None) -> list[Doc]:
    """PIQA's ``valid.jsonl`` with its answers from ``valid-labels.lst`` (one 0/1 a line)."""
    rows = _read_jsonl(path)
    if labels is None or not labels.is_file():
        raise FileNotFoundError(f"PIQA needs its labels file (one 0/1 per line); not found: "
                                f"{labels}")
    gold = [int(x) for x in labels.read_text().split()]
    if len(gold) != len(rows):
        raise ValueError(f"{labels} has {len(gold)} labels for the {len(rows)} questions of "
                         f"{path}")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": g}
            for r, g in zip(rows, gold, strict=True)]


@register_format("arc", lm_eval_yaml="arc/arc_easy.yaml")
def read_arc(path: Path, labels: Path | None) -> list[Doc]:
    """AI2 ARC (Easy or Challenge) in the release format; labels stay as given (A-E or
    1-5), lm-eval looks the answer key up among them."""
    return [{"id": r["id"], "question": r["question"]["stem"],
             "choices": _choices(r["question"]), "answerKey": r["answerKey"]}
            for r in _read_jsonl(path)]


@register_format("boolq", lm_eval_yaml="super_glue/boolq/default.yaml")
def read_boolq(path: Path, labels: Path | None) -> list[Doc]:
    """BoolQ in the original release format. lm-eval's ``boolq`` reads SuperGLUE's copy,
    whose passage is the original one prefixed with its page title and ``" -- "``."""
    return [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}",
             "label": int(bool(r["answer"]))}
            for r in _read_jsonl(path)]


@register_format("openbookqa", lm_eval_yaml="openbookqa/openbookqa.yaml")
def read_openbookqa(path: Path, labels: Path | None) -> list[Doc]:
    """OpenBookQA (main) in the release format (the question nested like ARC's)."""
    return [{"id": r["id"], "question_stem": r["question"]["stem"],
             "choices": _choices(r["question"]), "answerKey": r["answerKey"]}
            for r in _read_jsonl(path)]


class TaskSpec(StrictModel):
    """One zero-shot task: a name for the tables, a format, and its file(s)."""

    name: str = Field(description="Task name in results and reports, e.g. arc_easy.")
    format: str = Field(description=f"Reader of the file: {', '.join(format_names())}.")
    path: str = Field(description="The task's documents, relative to the data dir (or "
                      "absolute).")
    labels: str | None = Field(
        None, description="Answers in a separate file (piqa format), relative to the data dir."
    )

    @field_validator("format")
    @classmethod
    def _known(cls, v: str) -> str:
        get_format(v)
        return v


DEFAULT_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(name="piqa", format="piqa", path="piqa/valid.jsonl",
             labels="piqa/valid-labels.lst"),
    TaskSpec(name="arc_easy", format="arc", path="arc/ARC-Easy-Test.jsonl"),
    TaskSpec(name="arc_challenge", format="arc", path="arc/ARC-Challenge-Test.jsonl"),
    TaskSpec(name="boolq", format="boolq", path="boolq/dev.jsonl"),
    TaskSpec(name="openbookqa", format="openbookqa", path="openbookqa/test.jsonl"),
)
"""The commonsense tasks of the pruning papers, on the splits they report (PIQA, BoolQ:
validation; ARC, OpenBookQA: test)."""


def load_docs(spec: TaskSpec, data_dir: Path) -> list[Doc]:
    """The task's documents in the HF schema of its lm-eval task, in file order."""
    fmt = get_format(spec.format)
    labels = data_dir / spec.labels if spec.labels else None
    if fmt.needs_labels and labels is None:
        raise ValueError(f"zero-shot task {spec.name!r}: format {spec.format!r} needs "
                         "`labels` (the answers file)")
    docs = fmt.read(data_dir / spec.path, labels)
    if not docs:
        raise ValueError(f"zero-shot task {spec.name!r}: {data_dir / spec.path} has no documents")
    return docs


def selected_indices(n_docs: int, limit: int | None) -> list[int]:
    """The documents scored: the first ``limit`` (lm-eval's ``--limit``), or all."""
    return list(range(n_docs if limit is None else min(limit, n_docs)))


def shard_indices(indices: Sequence[int], shard: int, n_shards: int) -> list[int]:
    """Shard ``shard`` of ``n_shards``: every ``n_shards``-th index, so shards get
    documents of every length (balanced work), and together cover each index once."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    return list(indices[shard::n_shards])


# --------------------------------------------------------------------------- lm-eval


def lm_eval_version() -> str:
    from importlib import metadata

    return metadata.version("lm_eval")


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _read_task_yaml(path: Path) -> dict[str, Any]:
    """An lm-eval task YAML with its ``include`` chain resolved (included first, then the
    file's own keys over it). The built-in tasks used here have no ``!function`` tags."""
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not an lm-eval task definition")
    base = cfg.pop("include", None)
    if base is None:
        return cfg
    return {**_read_task_yaml(path.parent / base), **cfg}


#: Keys of lm-eval's definition that name where its data comes from (replaced here) or
#: group tasks (irrelevant for one task).
_DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split",
              "validation_split", "test_split", "fewshot_split", "tag", "group")


def _dataset_dict(docs: list[Doc], **_: Any) -> Any:
    """lm-eval's ``custom_dataset`` hook: our records as the ``test`` split. lm-eval
    passes the task's metadata as keyword arguments; they are not needed."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def task_config(spec: TaskSpec, docs: list[Doc], data_dir: Path) -> dict[str, Any]:
    """lm-eval's own definition of the format's task, reading ``docs`` instead of the hub."""
    fmt = get_format(spec.format)
    cfg = _read_task_yaml(_lm_eval_tasks_dir() / fmt.lm_eval_yaml)
    for key in _DATA_KEYS:
        cfg.pop(key, None)
    cfg.update(task=spec.name, dataset_path=str(data_dir / spec.path), test_split="test",
               custom_dataset=functools.partial(_dataset_dict, docs), num_fewshot=0)
    return cfg


@dataclass(frozen=True, kw_only=True)
class DocScore:
    """lm-eval's result for one document."""

    doc: int
    gold: int
    acc: float
    #: None for tasks whose lm-eval definition has no acc_norm (boolq)
    acc_norm: float | None
    #: summed log-likelihood of each choice's continuation
    ll: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DocScore:
        return cls(doc=int(obj["doc"]), gold=int(obj["gold"]), acc=float(obj["acc"]),
                   acc_norm=None if obj["acc_norm"] is None else float(obj["acc_norm"]),
                   ll=tuple(float(x) for x in obj["ll"]))


@contextmanager
def _lm_eval_log_level(level: int) -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@functools.cache
def _shared_context_hflm() -> type:
    """``HFLM`` with its request scoring replaced by :func:`loglik.score_requests`: the same
    tokens (lm-eval's ``_encode_pair``) and formula, each document's context run once, the
    batch sorted by length. Requests lm-eval would truncate, and non-causal models, keep
    lm-eval's own path."""
    from lm_eval.models.huggingface import HFLM

    from recoup.stages.scoring import loglik

    class SharedContextHFLM(HFLM):
        #: told the number of documents (distinct contexts) finished after each batch
        on_documents: Callable[[int], None] | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm=False,  # noqa: ANN001, ANN202
                                  override_bs=None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            fits = [i for i, (_, c, k) in enumerate(requests)
                    if len(c) + len(k) <= self.max_length + 1]
            out: list[Any] = [None] * len(requests)
            scored = loglik.score_requests(
                self.model, [(requests[i][1], requests[i][2]) for i in fits],
                requests_per_batch=int(override_bs or self.batch_size),
                pad_id=self.tokenizer.pad_token_id or 0, on_documents=self.on_documents)
            for i, answer in zip(fits, scored, strict=True):
                out[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            long = [i for i in range(len(requests)) if out[i] is None]
            if long:
                for i, answer in zip(long, super()._loglikelihood_tokens(
                        [requests[i] for i in long], disable_tqdm, override_bs), strict=True):
                    out[i] = answer
            return out

    return SharedContextHFLM


def make_lm(model: Any, tokenizer: Any, batch_size: int, *, shared_context: bool = True,
            on_documents: Callable[[int], None] | None = None) -> Any:
    """lm-eval's ``HFLM`` around a model already in memory (it runs on the model's device).

    ``shared_context`` (default): requests scored by :mod:`recoup.stages.scoring.loglik`,
    each document's context once, with lm-eval's tokens and formula; False: lm-eval's own
    loop (the reference the agreement tests and the throughput benchmark compare with).
    ``on_documents(n)`` hears of finished documents (shared-context scoring only).
    """
    from lm_eval.models.huggingface import HFLM

    cls = _shared_context_hflm() if shared_context else HFLM
    # HFLM warns that a model object skips its loading options; that is the point here.
    with _lm_eval_log_level(logging.ERROR):
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if shared_context:
        lm.on_documents = on_documents
    return lm


def score_task(lm: Any, spec: TaskSpec, docs: list[Doc], indices: Sequence[int],
               data_dir: Path) -> list[DocScore]:
    """Score documents ``indices`` of a task with lm-eval; one :class:`DocScore` each."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate

    if not indices:
        return []
    # Building the task, lm-eval warns about defaults it fills in (boolq's aggregation) and
    # advertises --metadata for custom datasets: nothing to act on.
    with _lm_eval_log_level(logging.ERROR):
        task = ConfigurableTask(config=task_config(spec, docs, data_dir))
    with _lm_eval_log_level(logging.WARNING):
        out = evaluate(lm, {spec.name: task}, samples={spec.name: list(indices)},
                       log_samples=True, bootstrap_iters=0)
    scores = []
    for s in out["samples"][spec.name]:
        scores.append(DocScore(
            doc=int(s["doc_id"]), gold=int(s["target"]), acc=float(s["acc"]),
            acc_norm=float(s["acc_norm"]) if "acc_norm" in s else None,
            ll=tuple(float(r[0]) for r in s["filtered_resps"]),
        ))
    got = sorted(s.doc for s in scores)
    if got != sorted(indices):
        raise RuntimeError(f"lm-eval scored documents {got[:5]}... of {spec.name}, "
                           f"not the {len(indices)} asked for")
    return sorted(scores, key=lambda s: s.doc)


# --------------------------------------------------------------------------- aggregation


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean, as lm-eval reports it (sample std, ddof=1)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def summarize_task(scores: Sequence[DocScore]) -> dict[str, Any]:
    """Task-level metrics from per-document scores (any shards, any order): the means
    lm-eval aggregates with, and their standard errors."""
    if not scores:
        raise ValueError("no documents were scored")
    docs = sorted(s.doc for s in scores)
    if len(set(docs)) != len(docs):
        raise ValueError("a document was scored twice")
    acc = [s.acc for s in scores]
    out: dict[str, Any] = {"n": len(scores), "acc": sum(acc) / len(acc),
                           "acc_stderr": mean_stderr(acc)}
    if all(s.acc_norm is not None for s in scores):
        norm = [float(s.acc_norm) for s in scores if s.acc_norm is not None]
        out.update(acc_norm=sum(norm) / len(norm), acc_norm_stderr=mean_stderr(norm))
    return out


def average_accuracy(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean over tasks, as the papers' "average" column: ``acc``, and
    ``acc_norm`` where a task has it, else its ``acc`` (boolq has no acc_norm)."""
    if not tasks:
        return {}
    accs = [t["acc"] for t in tasks.values()]
    norms = [t.get("acc_norm", t["acc"]) for t in tasks.values()]
    return {"acc": sum(accs) / len(accs), "acc_norm": sum(norms) / len(norms)}
