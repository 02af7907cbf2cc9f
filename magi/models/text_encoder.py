"""T5-v1.1-XXL text encoder: the official caption cleaning, tokenizer settings and encoder call.

A wrapper over the plain-PyTorch encoder and SentencePiece tokenizer of ``magi.models.t5``
(features bit-identical to transformers' eager ``T5EncoderModel``; transformers is not imported,
which saves seconds of start-up). Behaviour follows shared/spec/text.md §1-2: every prompt is cleaned twice by
:func:`clean_caption`, tokenised to exactly 800 tokens (EOS appended, padding id 0, truncation on)
and encoded in float32 with the attention mask passed to the encoder.

Weights are read by this module, never by pickle: ``.safetensors`` when present, otherwise the
official ``.bin`` shards through ``torch.load(weights_only=True)``.

Shapes: n prompts, Lcap caption slots (800), Ccap caption width (4096 for T5-XXL).
"""

from __future__ import annotations

import html
import json
import pickle
import re
import urllib.parse
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PureWindowsPath
from types import TracebackType

import torch

from magi.models.t5 import SentencePieceTokenizer, T5EncoderModel, T5Settings

T5_SUBFOLDER = "t5-v1_1-xxl"  # fixed sub-folder name under runtime_config.t5_pretrained
CAPTION_MAX_LENGTH = 800  # official caption_max_length; the special-token padding hard-codes it too

# ----------------------------------------------------------------------------------------------
# Caption cleaning (the DeepFloyd-IF / PixArt procedure the official wrapper uses, text.md §2).
# Each entry is (step number in text.md, pattern, replacement); applied with re.sub in order.
# ----------------------------------------------------------------------------------------------

_TLD = r"(?:com|co|ru|net|org|edu|gov|it)"
# Step 3: official ``\b(?:SCHEME|[a-zA-Z0-9.\-]+\.TLD[\w/-]*\b/?(?!@))`` with SCHEME a scheme prefix
# (only the prefix goes), ``https?:`` for (a) and the literal ``www:`` for (b) as in the original;
# the second alternative is a domain-like token not followed by "@". Run by :func:`_strip_urls`
# in linear time with the same output.
_SCHEME_HTTP = re.compile(r"\bhttps?:(?:/{1,3}|[a-zA-Z0-9%])")
_SCHEME_WWW = re.compile(r"\bwww:(?:/{1,3}|[a-zA-Z0-9%])")
_DOMAIN_RUN = re.compile(r"[a-zA-Z0-9.\-]+")  # what the domain's ``[a-zA-Z0-9.\-]+`` can span
_DOMAIN_TAIL = re.compile(r"\." + _TLD + r"[\w/-]*\b/?(?!@)")  # the rest, from the "." before the TLD
_BOUNDARY = re.compile(r"\b")


class _Domains:
    r"""The domain alternative's leftmost match at or after a position, over one text.

    The official pattern backtracks ``[a-zA-Z0-9.\-]+`` from the end of its run of such characters
    to the last "." whose TLD tail matches, from every word boundary in the run: quadratic in the
    run's length. That "." and the tail's end depend on the run only, not on where the match
    starts, so they are found once per run (the tail never crosses a ".", so each character is
    read a bounded number of times), and a match starts at the run's first word boundary before it.
    """

    def __init__(self, text: str) -> None:
        self.text, self.runs = text, _DOMAIN_RUN.finditer(text)
        self.run: tuple[int, int, int, int] | None = None  # start, end, the "." (-1: none), the match's end
        self.found: tuple[int, int] | None = None

    def _last_dot(self, start: int, end: int) -> tuple[int, int]:
        dot = self.text.rfind(".", start + 1, end)  # the token needs a character before its "."
        while dot != -1:
            tail = _DOMAIN_TAIL.match(self.text, dot)
            if tail is not None:
                return dot, tail.end()
            dot = self.text.rfind(".", start + 1, dot)
        return -1, -1

    def next(self, pos: int) -> tuple[int, int] | None:
        """(start, end) of the leftmost match starting at or after ``pos``; None: there is none."""
        if self.found is not None and self.found[0] >= pos:
            return self.found
        while True:
            if self.run is None or self.run[1] <= pos:
                run = next(self.runs, None)
                if run is None:
                    self.found = None
                    return None
                self.run = (*run.span(), *self._last_dot(*run.span()))
                continue
            start, _, dot, end = self.run
            first = max(start, pos)
            if first < dot:
                boundary = _BOUNDARY.search(self.text, first, dot)
                if boundary is not None and boundary.start() < dot:
                    self.found = (boundary.start(), end)
                    return self.found
            self.run = None  # no match in this run at or after pos: on to the next run


def _strip_urls(text: str, scheme: re.Pattern[str]) -> str:
    """Step 3 (one of its two patterns): delete each leftmost match of ``scheme`` or a domain."""
    domains, pieces, pos = _Domains(text), [], 0
    prefix = scheme.search(text)  # searched again only once passed (None: there is no more)
    while True:
        if prefix is not None and prefix.start() < pos:
            prefix = scheme.search(text, pos)
        domain = domains.next(pos)
        if prefix is not None and (domain is None or prefix.start() <= domain[0]):  # the scheme is tried first
            start, end = prefix.span()
        elif domain is not None:
            start, end = domain
        else:
            pieces.append(text[pos:])
            return "".join(pieces)
        pieces.append(text[pos:start])
        pos = end


_CJK = "\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff"
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
)
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+"
_FILE_EXT = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"

_DOT_FILE_EXT = re.compile(r"\." + _FILE_EXT)


def _drop_file_name(word: str) -> str:
    """Step 14 on one run of non-spaces, in linear time: the official ``\\S+\\.(ext)`` removes
    the run's start up to its last ``.ext`` that has a character before it (backtracking made that
    quadratic in the run's length: a 1 MB prompt without spaces took ~45 minutes)."""
    end = 0
    for found in _DOT_FILE_EXT.finditer(word, 1):
        end = found.end()
    return word[end:]


# Steps 5-17: between the HTML strip and the hyphen rule (a replacement is a string or, step 14,
# a function of the match).
_EARLY_STEPS: tuple[tuple[int, re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = tuple(
    (step, re.compile(pattern), repl)
    for step, pattern, repl in (
        (5, r"@[\w\d]+\b", ""),
        (6, "[" + _CJK + "]+", ""),
        (7, "[" + _DASHES + "]+", "-"),
        (8, "[`´«»“”¨]", '"'),
        (8, "[‘’]", "'"),
        (9, r"&quot;?", ""),
        (9, r"&amp", ""),
        (10, r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),
        (11, r"\d:\d\d\s+$", ""),
        (12, r"\\n", " "),
        (13, r"#\d{1,3}\b", ""),
        (13, r"#\d{5,}\b", ""),
        (13, r"\b\d{6,}\b", ""),
        (14, r"\S+", lambda word: _drop_file_name(word.group())),
        (15, r"[\"']{2,}", '"'),
        (15, r"\.{2,}", " "),
        (16, _BAD_PUNCT, " "),
        (17, r"\s+\.\s+", " "),
    )
)
_HYPHENS = re.compile(r"[-_]")  # step 18
# Steps 20-30: after the basic clean.
_LATE_STEPS: tuple[tuple[int, re.Pattern[str], str], ...] = tuple(
    (step, re.compile(pattern), repl)
    for step, pattern, repl in (
        (20, r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),
        (20, r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),
        (20, r"\b\d+[a-zA-Z]+\d+\b", ""),
        (21, r"(?:worldwide\s+)?(?:free\s+)?shipping", ""),
        (21, r"(?:free\s)?download(?:\sfree)?", ""),
        (21, r"\bclick\b\s(?:for|on)\s\w+", ""),
        (21, r"\b" + _FILE_EXT + r"(?:\simages?)?", ""),
        (21, r"\bpage\s+\d+\b", ""),
        (22, r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
        # official r"\b\d+\.?\d*[xх×]\d+\.?\d*\b" (backtracks quadratically over a long digit run),
        # with each digit run taken whole at once ("(?=(\d+))\1" cannot give digits back) and the
        # ends the backtracking could reach spelt out: same matches, linear time
        (23, r"\b(?=(\d+))\1(?:\.(?=(\d*))\2)?[xх×](?=(\d+))\3(?:\.(?=(\d*))\4\b|\.\b|\b)", ""),
        (24, r"\b\s+:\s+", ": "),
        (25, r"(\D[,./])\b", r"\1 "),
        (26, r"\s+", " "),
        (27, r"^[\"']([\w\W]+)[\"']$", r"\1"),
        (28, r"^['_,\-:;]", ""),
        (29, r"['_,\-:+]$", ""),
        (30, r"^\.\S+$", ""),
    )
)


def _basic_clean(text: str) -> str:
    """Step 19: ftfy's fix_text, HTML-unescape twice, strip."""
    import ftfy

    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _strip_html(text: str) -> str:
    """Step 4: keep only the text of an HTML parse (BeautifulSoup, "html.parser")."""
    from bs4 import BeautifulSoup

    return BeautifulSoup(text, features="html.parser").text


def clean_caption(text: str) -> str:
    """One pass of the official caption cleaning (text.md §2, steps 1-31).

    The official wrapper applies it twice; :func:`preprocess_prompt` does that.

    Args:
        text: raw prompt.

    Returns:
        The cleaned prompt.
    """
    text = urllib.parse.unquote_plus(str(text)).strip().lower()  # step 1
    text = text.replace("<person>", "person")  # step 2
    text = _strip_urls(_strip_urls(text, _SCHEME_HTTP), _SCHEME_WWW)  # step 3 (a) then (b)
    text = _strip_html(text)  # step 4
    for _, pattern, repl in _EARLY_STEPS:  # steps 5-17
        text = pattern.sub(repl, text)
    if len(_HYPHENS.findall(text)) > 3:  # step 18: this-is-a-slug / snake_case
        text = _HYPHENS.sub(" ", text)
    text = _basic_clean(text)  # step 19
    for _, pattern, repl in _LATE_STEPS:  # steps 20-30
        text = pattern.sub(repl, text)
    return text.strip()  # step 31


def preprocess_prompt(text: str) -> str:
    """The official text preprocessing: :func:`clean_caption` applied twice."""
    return clean_caption(clean_caption(text))


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    """Weight files of a HF checkpoint folder; safetensors preferred over .bin."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(_index_weight_map(index).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"T5 weight shards missing in {folder}: {missing}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"no T5 weights in {folder} (expected model.safetensors[.index.json] or "
        "pytorch_model.bin[.index.json]); download them with `python -m magi.download <model>`"
    )


def _read_tokenizer_and_config(folder: Path) -> tuple[SentencePieceTokenizer, T5Settings]:
    """T5 tokenizer and encoder settings of a HF folder; a damaged file is one error naming it."""
    path = folder / "config.json"
    try:
        settings = T5Settings.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable T5 config ({_first_line(err)}); download it again") from None
    try:
        side = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        extra_ids = int(side.get("extra_ids", 100))
    except FileNotFoundError:
        extra_ids = 100  # optional file: T5's 100 sentinel tokens
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
        extra_ids = -1
    try:
        if extra_ids < 0:
            raise ValueError("tokenizer_config.json")
        tokenizer = SentencePieceTokenizer(folder / "spiece.model", extra_ids)
    except (OSError, ValueError, RuntimeError, TypeError):
        raise ValueError(
            f"cannot load the T5 tokenizer from {folder}: spiece.model or "
            "tokenizer_config.json is damaged; download them again"
        ) from None
    return tokenizer, settings


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _index_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index} is not a valid weight index ({type(err).__name__}: {err}); download it again"
        ) from None
    for key, shard in weight_map.items():
        windows = PureWindowsPath(shard) if isinstance(shard, str) else None
        if windows is None or not shard.strip():
            raise ValueError(
                f"{index}: weight_map[{key!r}] = {shard!r} is not a shard file name; download the index again"
            )
        if Path(shard).is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
            raise ValueError(
                f"{index}: weight_map[{key!r}] = {shard!r} points outside the T5 folder "
                "(absolute path or '..'); shards must be file names there: "
                "download the index again"
            )
    return weight_map


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one shard on CPU, without executing pickled code."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:  # truncated download, or not a safetensors file
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: download it again"
            ) from None
    # mmap needs the zip serialisation; legacy files are read whole (still weights-only).
    mmap = zipfile.is_zipfile(path)
    if not mmap and _bin_kind(path) == "other":  # an HTML error page, zeros, an empty file
        raise ValueError(_bad_bin_message(path, ValueError("neither a zip nor a pickle")))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise ValueError(
                f"{path} is not a plain weights file (it pickles code or custom classes); "
                "magi never unpickles code: convert it to safetensors (model.safetensors) "
                "where you trust it, or download the official T5 files again"
            ) from None
        raise ValueError(_bad_bin_message(path, err)) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as err:  # truncated zip, random bytes, a torn legacy pickle
        raise ValueError(_bad_bin_message(path, err)) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path} holds no plain state dict (name -> tensor) but a "
            f"{type(state).__name__}; save the T5 encoder's state_dict() (safetensors) instead"
        )
    return state


def _bin_kind(path: Path) -> str:
    """Format by magic bytes: "zip" (torch >= 1.6, maybe truncated), "pickle" (legacy), "other"."""
    with open(path, "rb") as f:
        head = f.read(2)
    return "zip" if head == b"PK" else "pickle" if head[:1] == b"\x80" else "other"


def _bad_bin_message(path: Path, err: BaseException) -> str:
    return (
        f"{path} is not a readable PyTorch weights file ({type(err).__name__}: {_first_line(err)[:120]}); "
        "it is truncated or corrupt: download it again (`python -m magi.download <model>`)"
    )


def check_t5_folder(t5_pretrained_root: str | Path) -> Path:
    """Start-up check of the T5 folder without loading the encoder (seconds, not minutes).

    Does not import transformers (a second or more): the JSON files are parsed and
    ``spiece.model`` is opened with sentencepiece, the library T5Tokenizer reads it with.
    Checks the folder, config.json, the tokenizer, the weight index and every weight file's
    header (safetensors) or pickle index (``.bin``, read weights-only and memory-mapped; a legacy
    non-zip ``.bin`` is only checked to exist).

    Args:
        t5_pretrained_root: runtime_config.t5_pretrained, as for :meth:`T5Encoder.from_pretrained`.

    Returns:
        The checked ``t5-v1_1-xxl`` folder.
    """
    folder = _resolve_folder(Path(t5_pretrained_root))
    _check_side_files(folder)
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            _check_safetensors_header(path)
        elif _bin_kind(path) != "pickle":  # legacy pickles are read whole: left to the load
            _read_shard(path)  # memory-mapped: reads the pickle, not the tensor bytes
    return folder


def _check_side_files(folder: Path) -> None:
    """config.json / tokenizer JSONs parse to objects and spiece.model loads; one error naming
    the damaged file (the same messages as a failed ``from_pretrained``)."""
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if name != "config.json" and not path.is_file():
            continue  # optional: the tokenizer falls back to T5's defaults
        try:
            ok = isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok and name == "config.json":
            raise ValueError(f"{path} is not a readable T5 config (not a JSON object); download it again")
        if not ok:
            raise ValueError(f"cannot load the T5 tokenizer from {folder}: {name} is damaged; download it again")
    try:
        import sentencepiece
    except ImportError:
        raise ModuleNotFoundError(
            "the T5 tokenizer needs the sentencepiece package: pip install sentencepiece"
        ) from None
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    except (OSError, RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"cannot load the T5 tokenizer from {folder}: spiece.model or "
            "tokenizer_config.json is damaged; download them again"
        ) from None


def _check_safetensors_header(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: download it again"
        ) from None


def _load_encoder_weights(
    model: torch.nn.Module, files: Sequence[Path], device: torch.device, dtype: torch.dtype
) -> None:
    """Stream encoder tensors into a meta-built model; fail listing missing/mis-shaped keys."""
    wanted = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for key, tensor in _read_shard(path).items():
            if key in wanted:  # decoder / lm_head keys of a full T5 checkpoint are skipped
                if not tensor.is_floating_point():  # a cast would make garbage weights silently
                    raise ValueError(
                        f"{path}: {key} is {tensor.dtype}, expected floating weights; "
                        "the file is not a T5 checkpoint: download it again"
                    )
                state[key] = tensor.to(device=device, dtype=dtype)
    # The input embedding is shared; either copy of it in the file is enough.
    for a, b in (("encoder.embed_tokens.weight", "shared.weight"), ("shared.weight", "encoder.embed_tokens.weight")):
        if a not in state and b in state:
            state[a] = state[b]
    missing = sorted(set(wanted) - set(state))
    bad_shape = sorted(k for k in state if state[k].shape != wanted[k].shape)
    if missing or bad_shape:
        raise ValueError(f"T5 checkpoint does not fit config.json: missing {missing}, wrong shape {bad_shape}")
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # keep the tie (one copy in memory)


# ----------------------------------------------------------------------------------------------
# Encoder wrapper
# ----------------------------------------------------------------------------------------------


class T5Encoder:
    """T5 encoder + tokenizer with the official prompt handling.

    Use :meth:`from_pretrained`; release the weights with :meth:`free` or a ``with`` block::

        with T5Encoder.from_pretrained(root) as t5:
            emb, mask = t5.encode(["a cat"])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: SentencePieceTokenizer,
        device: torch.device,
        max_length: int = CAPTION_MAX_LENGTH,
    ) -> None:
        self.model: torch.nn.Module | None = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        t5_pretrained_root: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = CAPTION_MAX_LENGTH,
    ) -> T5Encoder:
        """Load ``<t5_pretrained_root>/t5-v1_1-xxl/`` (official layout, Hugging Face files).

        Args:
            t5_pretrained_root: runtime_config.t5_pretrained, the folder holding ``t5-v1_1-xxl/``
                (a path to the ``t5-v1_1-xxl`` folder itself is accepted too).
            device: where the encoder runs ("cpu" as the 4.5B configs, "cuda" as the 24B ones).
            dtype: parameter dtype; float32 is the official numerics. Outputs are float32 always.
            max_length: caption slots (official caption_max_length, 800).
        """
        folder = _resolve_folder(Path(t5_pretrained_root))
        tokenizer, settings = _read_tokenizer_and_config(folder)
        with torch.device("meta"):  # no init work: the weights are assigned from the files
            model = T5EncoderModel(settings)
        device = torch.device(device)
        _load_encoder_weights(model, _weight_files(folder), device, dtype)
        return cls(model.eval(), tokenizer, device, max_length)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean (twice) and tokenise -> (input_ids [n, Lcap] int64, mask [n, Lcap] int64)."""
        texts = [preprocess_prompt(p) for p in _check_prompts(prompts)]
        return self.tokenizer(texts, self.max_length)  # </s> appended, padded with id 0

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts as the official wrapper does (one prompt per encoder call).

        Args:
            prompts: raw prompts (cleaned here).

        Returns:
            emb [n, Lcap, Ccap] float32 on CPU (padding rows included, as T5 outputs them) and
            mask [n, Lcap] int64 on CPU (1 for real tokens incl. EOS).
        """
        if self.model is None:
            raise RuntimeError("T5Encoder was freed; load it again with T5Encoder.from_pretrained")
        ids, mask = self.tokenize(prompts)  # [n, Lcap] each
        rows = []
        for i in range(ids.shape[0]):
            out = self.model(input_ids=ids[i : i + 1].to(self.device), attention_mask=mask[i : i + 1].to(self.device))
            rows.append(out.float().cpu())  # [1, Lcap, Ccap]
        return torch.cat(rows), mask

    def free(self) -> None:
        """Drop the encoder weights now (they are ~19 GB for T5-XXL in float32).

        Moving the model to the meta device releases every weight at once, even while something
        else still holds the module (a reference cycle would otherwise keep it until a full
        garbage collection); the small module skeleton left is collected later."""
        on_cuda = self.device.type == "cuda"
        if self.model is not None:
            self.model.to("meta")
        self.model = None
        if on_cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> T5Encoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.free()


def _resolve_folder(root: Path) -> Path:
    """The ``t5-v1_1-xxl`` folder under root (or root itself if it is that folder)."""
    folder = root if root.name == T5_SUBFOLDER else root / T5_SUBFOLDER
    if not folder.is_dir():
        raise FileNotFoundError(
            f"T5 folder not found: {folder} (t5_pretrained must contain '{T5_SUBFOLDER}/'; "
            "download it with `python -m magi.download <model>`)"
        )
    for name in ("config.json", "spiece.model"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{name} missing in {folder}; the T5 folder needs the Hugging Face files "
                "(config.json, spiece.model, weights): `python -m magi.download <model>`"
            )
    return folder


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("encode() takes a list of prompts, got a single str; wrap it: [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode() needs at least one prompt")
    return prompts
