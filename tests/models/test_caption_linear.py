"""Caption cleaning is linear in the prompt's length: steps 3 (URLs), 14 (a file name
``\\S+\\.png``) and 23 (``12x34`` sizes) used to backtrack quadratically over a run without spaces
(step 14 alone: ~45 minutes for 1 MB); their rewrites give the official patterns' output on every
string tried (the official patterns are kept here as the reference)."""

from __future__ import annotations

import random
import re
import time

from magi.models.text_encoder import clean_caption, preprocess_prompt

_OFFICIAL_STEP_14 = re.compile(r"\S+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)")
_TLD = r"(?:com|co|ru|net|org|edu|gov|it)"
_OFFICIAL_STEP_3A = re.compile(r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+\." + _TLD + r"[\w/-]*\b/?(?!@))")
_OFFICIAL_STEP_3B = re.compile(r"\b(?:www:(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+\." + _TLD + r"[\w/-]*\b/?(?!@))")
_OFFICIAL_STEP_23 = re.compile(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b")
# runs without spaces that made steps 3 and 23 backtrack quadratically, and runs near them
_PATHOLOGICAL = {
    "dots": "a.",
    "digits": "1",
    "underscored": "ab.co_",
    "mails": "x.com/a@",
    "schemes": "http:x.com ",
    "sizes": "1.1x",
    "slashes": "a-/",
}


def test_a_long_prompt_without_spaces_is_cleaned_in_linear_time() -> None:
    start = time.perf_counter()
    assert preprocess_prompt("a" * 400_000) == "a" * 400_000
    assert time.perf_counter() - start < 30  # the quadratic pattern alone took ~7 minutes here


def test_file_names_are_dropped_as_the_official_pattern_drops_them(monkeypatch) -> None:
    import magi.models.text_encoder as te

    rng = random.Random(0)
    alphabet = "ab.pngjxe 1/\t-"
    pieces = ["x.png", "a.jpeg.mp4b", ".png", " .pdf", "a.jpgx.png z", "photo.webp"]
    texts = []
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        texts.append(text + "".join(p for p in pieces if rng.random() < 0.3))
    ours = [clean_caption(t) for t in texts]
    official = tuple((s, _OFFICIAL_STEP_14, "") if s == 14 else (s, p, r) for s, p, r in te._EARLY_STEPS)
    monkeypatch.setattr(te, "_EARLY_STEPS", official)
    assert ours == [clean_caption(t) for t in texts]


def _official_step_3(text: str) -> str:
    return _OFFICIAL_STEP_3B.sub("", _OFFICIAL_STEP_3A.sub("", text))


def _step_3(text: str) -> str:
    import magi.models.text_encoder as te

    return te._strip_urls(te._strip_urls(text, te._SCHEME_HTTP), te._SCHEME_WWW)


def _step_23(text: str) -> str:
    import magi.models.text_encoder as te

    (pattern,) = [p for step, p, _ in te._LATE_STEPS if step == 23]
    return pattern.sub("", text)


def test_urls_and_sizes_are_dropped_as_the_official_patterns_drop_them() -> None:
    rng = random.Random(1)
    alphabet = list("acomhtpswx1234.-/_:@% éх×ruZ") + [
        "http:",
        "https://",
        "www:",
        ".com",
        ".co",
        ".it",
        "12x34.5",
        "1.2×3",
        "..",
        "a.b.com",
        "a@b.org/x",
    ]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(30000)]
    texts += [unit * rng.randint(1, 300) for unit in _PATHOLOGICAL.values() for _ in range(20)]
    changed = 0
    for text in texts:
        assert _step_3(text) == _official_step_3(text), text
        assert _step_23(text) == _OFFICIAL_STEP_23.sub("", text), text
        changed += _step_3(text) != text
    assert changed > 5000  # the strings exercise the patterns, not only their misses
    assert _step_3("visit https://www.example.com/a-b?q=1, a.b.it@x, a.b.it/x") == "visit ?q=1, a.b.it@x, "
    assert _step_23("at 1920x1080 or 2.5×3.5cm, 4x") == "at  or 5cm, 4x"  # the official pattern keeps the "5"


def test_one_megabyte_without_spaces_goes_through_steps_3_and_23_in_linear_time() -> None:
    for name, unit in _PATHOLOGICAL.items():
        small, big = unit * (2000 // len(unit)), unit * (1_000_000 // len(unit))
        assert _step_3(small) == _official_step_3(small) and _step_23(small) == _OFFICIAL_STEP_23.sub("", small)
        start = time.perf_counter()
        _step_23(_step_3(big))
        # ~1 s each here; the official patterns take minutes to hours on these
        assert time.perf_counter() - start < 60, name
