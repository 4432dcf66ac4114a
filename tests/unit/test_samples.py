"""The rules every data source shares: the seeded subset and plain-text chunking."""

from __future__ import annotations

from recoup.stages.text.samples import chunk_text, seeded_subset


def test_seeded_subset_rule() -> None:
    assert seeded_subset(5, None, 0) == [0, 1, 2, 3, 4]
    assert seeded_subset(5, 9, 0) == [0, 1, 2, 3, 4]
    picked = seeded_subset(100, 10, 7)
    assert picked == seeded_subset(100, 10, 7) and picked == sorted(picked)
    assert len(set(picked)) == 10


def test_chunk_text_packs_paragraphs() -> None:
    text = " = Title = \n \n first para . \n \n second para . \n \n" + "word " * 30 + "\n"
    chunks = chunk_text(text, chunk_chars=30)
    assert chunks[:2] == ["= Title =\n\nfirst para .", "second para ."]
    assert chunks[2] == "word word word word word word"  # a long paragraph cut at spaces
    assert all(len(c) <= 30 for c in chunks)
    assert chunk_text("= A =\n\nb .\n", chunk_chars=100) == ["= A =\n\nb ."]
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())  # no word lost
