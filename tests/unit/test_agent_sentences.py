"""Sentence cutting of a streamed reply (speech starts at the first complete sentence)."""

from __future__ import annotations

from bridge.agent.sentences import SentenceSplitter


def feed(pieces: list[str]) -> list[str]:
    splitter = SentenceSplitter()
    out: list[str] = []
    for piece in pieces:
        out += splitter.push(piece)
    return out + splitter.flush()


def test_sentences_come_out_as_soon_as_they_are_complete() -> None:
    splitter = SentenceSplitter()
    assert splitter.push("Hello there") == []
    assert splitter.push("! How can I ") == ["Hello there!"]
    assert splitter.push("help? We") == ["How can I help?"]
    assert splitter.push(" close at 5.30 pm.") == []
    assert splitter.flush() == ["We close at 5.30 pm."]
    assert splitter.flush() == []


def test_abbreviations_numbers_and_quotes_do_not_cut() -> None:
    assert feed(["Ask Dr. Smith about it. ", "It costs 3.5 euros. Ok"]) == [
        "Ask Dr. Smith about it.",
        "It costs 3.5 euros.",
        "Ok",
    ]
    assert feed(['He said "yes." ', "Then left."]) == ['He said "yes."', "Then left."]


def test_line_breaks_end_a_sentence_and_blank_text_is_dropped() -> None:
    assert feed(["First line\nSecond", " line", "  \n "]) == ["First line", "Second line"]
    assert feed(["   "]) == []
