"""What a generation request is, and every rule about one, written once (no torch).

The CLI (``magi.infer``), the HTTP service (``magi.serve``) and the library (``MagiPipeline``)
check requests with these functions, so a rule and its message are the same everywhere. Each
failure is a ``RequestError``: a ``ValueError`` whose message is one line and whose ``param``
names the field it is about (the HTTP error's ``param``; None where no single field is to blame).

- values: ``whole_number``, ``check_seed``, ``check_frames``, ``check_text``, ``prompt_list``,
  ``check_mode``, ``check_compat``, ``parse_size``;
- prompts against the video: ``check_prompts_fit`` (more prompts than generated chunks is an
  error everywhere), ``check_from_chunk`` (a steering edit's chunk);
- files of prompts: ``read_prompt_file`` (a JSON list or a ``{"chunk", "prompt"}`` timeline) and
  ``parse_steer_line`` (one line of a ``--steer`` file);
- messages: ``shown_path`` / ``shorten_paths`` (a long path elided in the middle) and ``one_line``
  (every error is one line of at most ``MAX_LINE`` characters).
"""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path

MODES = ("t2v", "i2v", "v2v")
COMPAT_MODES = ("magi", "official")
SEED_MIN, SEED_END = -(2**63), 2**64  # torch.manual_seed takes [-2**63, 2**64)
# The text encoder reads 800 tokens (about 4000 characters of English); longer prompts are cut
# there anyway. The cap keeps a huge prompt from tying up the caption cleaning.
MAX_PROMPT_CHARS = 10_000


MAX_LINE = 200  # an error message is one line of at most this many characters
SHOWN_PATH = 60  # a path in a message: at most this many characters (the file name kept)


class RequestError(ValueError):
    """A request that breaks a rule: a one-line message; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ---- single values ----------------------------------------------------------------------------
def whole_number(name: str, value: object) -> int:
    """``value`` as an int; bools, floats and strings are refused (numpy integers are fine)."""
    # bool is an int to Python but never a frame count or a seed.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise RequestError(f"{name} must be a whole number, got {shown} ({type(value).__name__})", name)
    return int(value)


def check_seed(value: object, name: str = "seed") -> int:
    """A seed: a whole number in torch.manual_seed's 64-bit range."""
    seed = whole_number(name, value)
    if not SEED_MIN <= seed < SEED_END:
        raise RequestError(f"{name} {seed} does not fit in 64 bits, as torch.manual_seed needs", name)
    return seed


def check_frames(value: object, name: str = "num_frames", most: int | None = None) -> int:
    """A frame count: a whole number >= 1 (and <= ``most`` when given, a server's limit)."""
    frames = whole_number(name, value)
    if frames < 1:
        raise RequestError(f"{name} must be >= 1, got {frames}", name)
    if most is not None and frames > most:
        raise RequestError(f"{name}: the video must have 1..{most} frames on this server, got {frames}", name)
    return frames


def check_text(text: object, where: str, param: str | None = None) -> str:
    """A prompt: a non-empty string of valid UTF-8 text, at most ``MAX_PROMPT_CHARS`` characters.

    Lone surrogates are how Python hands over command-line bytes that are not UTF-8 (and how
    JSON decodes an unpaired \\ud800 escape); the tokenizer cannot take them.
    """
    param = where if param is None else param
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{where} must be a non-empty string", param)
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(
            f"{where} has {len(text)} characters; the most is {MAX_PROMPT_CHARS} (the text encoder "
            "reads 800 tokens, about 4000 characters): shorten it",
            param,
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise RequestError(
            f"{where} is not valid UTF-8 text ({what} at character {err.start}); pass UTF-8 text "
            "(check the terminal's or file's encoding)",
            param,
        ) from None
    return text


def prompt_list(prompt: object, name: str = "prompt") -> list[str]:
    """One prompt (a string) or per-chunk prompts (a list or tuple of strings) as a list."""
    if not isinstance(prompt, (str, list, tuple)):
        raise RequestError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}", name)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise RequestError(f"{name} must be a non-empty string or a non-empty list of non-empty strings", name)
    for i, text in enumerate(prompts):
        check_text(text, name if len(prompts) == 1 else f"{name} {i}", name)
    return prompts


def check_mode(
    mode: object,
    image: object = None,
    prefix_video: object = None,
    *,
    image_name: str = "image_path",
    prefix_name: str = "prefix_video_path",
) -> str:
    """The mode and its input: i2v needs an image, v2v a prefix video, and neither is used otherwise."""
    if mode not in MODES:
        raise RequestError(f"mode must be one of {MODES}, got {mode!r}", "mode")
    if mode == "i2v" and image is None:
        raise RequestError(f"mode i2v needs {image_name} (the image the video starts from)", image_name)
    if mode == "v2v" and prefix_video is None:
        raise RequestError(f"mode v2v needs {prefix_name} (the video to continue)", prefix_name)
    if mode != "i2v" and image is not None:
        raise RequestError(f"{image_name} is only used with mode i2v (got mode {mode})", image_name)
    if mode != "v2v" and prefix_video is not None:
        raise RequestError(f"{prefix_name} is only used with mode v2v (got mode {mode})", prefix_name)
    return str(mode)


def check_compat(compat: object) -> str:
    if compat not in COMPAT_MODES:
        raise RequestError(f"compat must be one of {COMPAT_MODES}, got {compat!r}", "compat")
    return str(compat)


def parse_size(value: object, max_pixels: int | None = None) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (the OpenAI video API's size) -> (width, height), multiples of 16."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", value) if isinstance(value, str) else None
    if match is None:
        raise RequestError(f"size must be 'WIDTHxHEIGHT' (e.g. '720x720'), got {_shown(value, 60)}", "size")
    w, h = int(match[1]), int(match[2])
    if w < 16 or h < 16 or w % 16 or h % 16:
        raise RequestError(f"size {w}x{h}: width and height must be positive multiples of 16", "size")
    if max_pixels is not None and w * h > max_pixels:
        raise RequestError(f"size {w}x{h} is {w * h} pixels; this server allows at most {max_pixels}", "size")
    return w, h


# ---- prompts against the video -----------------------------------------------------------------
def check_prompts_fit(count: int, generated_chunks: int, num_frames: int, param: str = "prompts") -> None:
    """Per-chunk prompts: at most one per generated chunk (an extra one would never be used)."""
    if count > generated_chunks:
        raise RequestError(
            f"{count} prompts but the video has only {generated_chunks} chunks (num_frames {num_frames}); "
            "drop some or raise num_frames",
            param,
        )


def check_from_chunk(from_chunk: object, chunks: int | None, *, generated: bool = True) -> int:
    """A steering edit's first chunk: a whole number in 0 .. chunks - 1 (chunks None: not known yet)."""
    if isinstance(from_chunk, bool) or not isinstance(from_chunk, numbers.Integral):
        raise RequestError(f"from_chunk must be a whole number, got {_shown(from_chunk, 60)}", "from_chunk")
    if from_chunk < 0 or (chunks is not None and from_chunk >= chunks):
        top = "" if chunks is None else f" 0 .. {chunks - 1}"
        what = "generated chunks" if generated else "chunks"
        raise RequestError(f"from_chunk {from_chunk} is outside this video's {what}{top}", "from_chunk")
    return int(from_chunk)


# ---- prompt files -------------------------------------------------------------------------------
def _shown(entry: object, most: int = 200) -> str:
    """An entry for a message: at most ``most`` characters (a deeply nested one is not worth showing)."""
    try:
        text = json.dumps(entry)
    except (RecursionError, TypeError, ValueError):
        text = "(nested too deeply to show)" if isinstance(entry, (list, dict)) else repr(entry)
    return text if len(text) <= most else text[: most - 3] + "..."


def timeline_prompts(entries: list, where: str, video: tuple[int, int] | None = None) -> list[str]:
    """Expand [{"chunk": k, "prompt": p}, ...] to one prompt per chunk up to the last entry.

    video: (generated chunks, num_frames); an entry starting beyond the video is refused before
    anything is expanded, so the list never grows past the video.
    """
    starts: list[tuple[int, str]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"chunk", "prompt"}:
            raise RequestError(
                f'{where}: entry {i} must be {{"chunk": <int>, "prompt": "<text>"}}, got {_shown(entry)}'
            )
        chunk, text = entry["chunk"], entry["prompt"]
        bad_chunk = not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0
        if bad_chunk or not isinstance(text, str) or not text.strip():
            raise RequestError(
                f"{where}: entry {i} needs a chunk index >= 0 and a non-empty prompt, got {_shown(entry)}"
            )
        if starts and chunk <= starts[-1][0]:
            raise RequestError(
                f"{where}: chunk indices must increase, but entry {i} has chunk {chunk} after {starts[-1][0]}"
            )
        if video is not None and chunk >= video[0]:
            raise RequestError(
                f"{where}: entry {i} starts at chunk {chunk} but the video has only {video[0]} chunks "
                f"(num_frames {video[1]}); lower it or raise --num_frames"
            )
        check_text(text, f"{where}: entry {i}")
        starts.append((chunk, text))
    if starts[0][0] != 0:
        raise RequestError(
            f"{where}: the first entry must be chunk 0 (got chunk {starts[0][0]}); every chunk needs a prompt"
        )
    prompts: list[str] = []
    for (chunk, text), nxt in zip(starts, starts[1:] + [(starts[-1][0] + 1, "")]):
        prompts += [text] * (nxt[0] - chunk)
    return prompts


def read_prompt_file(path: str | Path, video: tuple[int, int] | None = None, flag: str = "--prompt_file") -> list[str]:
    """Per-chunk prompts from a UTF-8 JSON list of strings or a {"chunk", "prompt"} timeline.

    video: (generated chunks, num_frames) to refuse timeline entries beyond the video.
    """
    where = f"{flag} {shown_path(path)}"
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise RequestError(f"{where}: cannot read it ({err.strerror or type(err).__name__})") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # utf-8-sig: a leading BOM (Windows editors) is dropped
    except UnicodeDecodeError as err:
        raise RequestError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    except json.JSONDecodeError as err:
        raise RequestError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise RequestError(
            f"{where}: JSON nested too deeply; expected a flat list of prompts or timeline entries"
        ) from None
    if not isinstance(data, list) or not data:
        raise RequestError(f"{where}: expected a non-empty JSON list of prompts or timeline entries")
    if all(isinstance(p, str) for p in data):
        if not all(p.strip() for p in data):
            raise RequestError(f"{where}: prompts must not be empty")
        for i, text in enumerate(data):
            check_text(text, f"{where}: prompt {i}")
        return data
    return timeline_prompts(data, where, video)


def parse_steer_line(raw: bytes) -> tuple[int, str]:
    """(from_chunk, prompt) of one ``--steer`` file line, ``{"from_chunk": K, "prompt": "TEXT"}``."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f'not a JSON line ({err}); write {{"from_chunk": K, "prompt": "TEXT"}}') from None
    except RecursionError:
        raise RequestError('JSON nested too deeply; write {"from_chunk": K, "prompt": "TEXT"}') from None
    if not isinstance(entry, dict) or set(entry) != {"from_chunk", "prompt"}:
        shown = raw.decode("utf-8", "replace").strip()
        raise RequestError(f'want {{"from_chunk": K, "prompt": "TEXT"}}, got {shown[:80]!r}')
    from_chunk, text = entry["from_chunk"], entry["prompt"]
    if isinstance(from_chunk, bool) or not isinstance(from_chunk, int) or from_chunk < 0:
        raise RequestError(f"from_chunk must be a chunk index >= 0, got {from_chunk!r}", "from_chunk")
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"prompt must be a non-empty string, got {text!r}"[:200], "prompt")
    check_text(text, "prompt")
    return from_chunk, text


# ---- messages -----------------------------------------------------------------------------------
def shown_path(path: object, most: int = SHOWN_PATH) -> str:
    """A path for a one-line message: as given when at most ``most`` characters, else its start and
    its file name around "..." (``/data/runs/.../out.mp4``); a file name alone too long is cut."""
    text = str(path)
    if len(text) <= most:
        return text
    name = text.rstrip("/").rsplit("/", 1)[-1]
    if len(name) > most - 8:
        return "..." + name[-(most - 3) :]
    return text[: most - len(name) - 4] + ".../" + name


def shorten_paths(text: str, *paths: object) -> str:
    """``text`` with every long one of ``paths`` (its resolved form and its folder too), then any
    other long absolute path in it, written as ``shown_path``."""
    forms: set[str] = set()
    for path in paths:
        if path is None:
            continue
        try:
            forms |= {str(path), str(Path(path).resolve()), str(Path(path).parent)}
        except (OSError, ValueError, RuntimeError):  # not a path at all (a NUL byte, a link loop)
            forms.add(str(path))
    for form in sorted(forms, key=len, reverse=True):  # a whole path before its folder
        if len(form) > SHOWN_PATH and form in text:
            text = text.replace(form, shown_path(form))
    return _LONG_PATH.sub(lambda match: shown_path(match[0]), text)


_LONG_PATH = re.compile(rf"(?<![\w.:/])/[^\s'\"]{{{SHOWN_PATH},}}")  # a long absolute path in a message


def one_line(text: str, most: int = MAX_LINE) -> str:
    """The first line of ``text`` in at most ``most`` characters: a longer one keeps its start and
    its end (where the fix is said) around " ... "."""
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) <= most:
        return line
    head = (most - 5) // 2
    return line[:head] + " ... " + line[len(line) - (most - 5 - head) :]
