"""What the data stages count as a word (lmforge/data/words.py): English as `str.split()` always
did, Chinese and Japanese one word per character (a whole line was one "word" before), Korean by
its spaces; the quality step and the data report's profile count the same way."""

from __future__ import annotations

from lmforge.data.pipeline.steps import DEFAULT_STOP_WORDS, quality_signals
from lmforge.data.profile import CorpusProfile
from lmforge.data.words import word_tokens, words

ENGLISH = "To be, or not to be: that is the question.\n  Whether 'tis nobler in the mind to suffer"
CHINESE = "我们的国家正在发展。人民的生活越来越好，城市也越来越美丽。"  # 26 Han characters, 3 marks


def test_english_words_are_what_split_gives() -> None:
    assert words(ENGLISH) == ENGLISH.split()
    assert word_tokens("The Question, the question!") == ["the", "question", "the", "question"]


def test_chinese_and_japanese_count_one_word_per_character_korean_by_spaces() -> None:
    got = words(CHINESE)
    assert len(got) == 26 and CHINESE.split() == [CHINESE]  # str.split(): one "word" for the whole line
    assert got[8:10] == ["展。", "人"]  # punctuation stays with the character before it, as "word," does
    assert "".join(got) == CHINESE
    assert words("カタカナと漢字 2024年") == ["カ", "タ", "カ", "ナ", "と", "漢", "字", "2024", "年"]
    assert words("한국어 단어입니다.") == ["한국어", "단어입니다."]
    assert word_tokens("“好”的") == ["好", "的"]  # a unigram is the character, without its marks


def test_quality_and_the_report_count_chinese_by_characters() -> None:
    assert quality_signals(CHINESE, 2, frozenset(DEFAULT_STOP_WORDS))["words"] == 26.0
    assert quality_signals(ENGLISH, 2, frozenset(DEFAULT_STOP_WORDS))["words"] == len(ENGLISH.split())
    p = CorpusProfile("c", "corpus")
    p.add_text(CHINESE)
    assert p.words == 26 and p.scores["length.words"].values == [26.0]
    assert p.unigrams["的"] == 2 and p.unigram_tokens == 26
