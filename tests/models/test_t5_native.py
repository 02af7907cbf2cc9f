"""magi.models.t5 (plain-PyTorch T5 encoder + SentencePiece tokenizer) against transformers'
T5EncoderModel / T5Tokenizer: the same ids and bit-identical features; and a start that never
imports transformers or torch._dynamo (seconds of CPU time on the tiny demo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi.models.t5 import T5Settings, relative_buckets
from magi.models.text_encoder import CAPTION_MAX_LENGTH, T5Encoder, preprocess_prompt
from tests.helpers import REPO_ROOT

PROMPTS = [
    "A dog runs on the beach",
    "a red cat runs across the street " * 40,  # long: many position buckets, little padding
    "Good Boy",
    "ünïcödé 東京 café",
    "a<extra_id_3>b",  # special tokens written in the text are single ids
    "x </s> y",
    "  <unk>  ",
    "<extra_id_99>z",
    "A CAT " * 1000,  # truncated to 800 with the EOS kept
]


@pytest.fixture(scope="module")
def t5_folder(reference_dir) -> Path:
    return reference_dir / "checkpoints" / "t5" / "t5-v1_1-xxl"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_features_equal_transformers_bit_for_bit(t5_folder: Path, dtype: torch.dtype) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config.from_pretrained(str(t5_folder))
    config._attn_implementation = "eager"
    ours = T5Encoder.from_pretrained(t5_folder, dtype=dtype)
    theirs = transformers.T5EncoderModel(config).eval()
    theirs.load_state_dict(ours.model.state_dict(), strict=True)
    theirs.to(dtype)
    for prompt in PROMPTS:
        ids, mask = ours.tokenize([prompt])
        with torch.no_grad():
            expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
            got = ours.model(input_ids=ids, attention_mask=mask)
        assert got.dtype == dtype
        assert torch.equal(got, expected), prompt[:40]


def test_token_ids_equal_transformers(t5_folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.T5Tokenizer.from_pretrained(str(t5_folder))
    ours = T5Encoder.from_pretrained(t5_folder).tokenizer
    assert len(ours) == len(theirs) == 500
    for prompt in PROMPTS:
        for text in (prompt, preprocess_prompt(prompt)):
            out = theirs(
                [text], max_length=CAPTION_MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
            )
            ids, mask = ours([text], CAPTION_MAX_LENGTH)
            assert torch.equal(ids, out["input_ids"]) and torch.equal(mask, out["attention_mask"]), text[:40]
            n = int(mask.sum())
            assert ours.convert_ids_to_tokens(ids[0, :n].tolist()) == theirs.convert_ids_to_tokens(ids[0, :n].tolist())


def test_relative_buckets_by_hand() -> None:
    # 32 buckets, bidirectional: 16 per sign; 0..7 exact, then log-spaced up to 128 (bucket 15).
    relative = torch.tensor([0, 1, 7, 8, 12, 127, 500, -1, -8, -500])
    assert relative_buckets(relative, 32, 128).tolist() == [0, 17, 23, 24, 25, 31, 31, 1, 8, 15]


def test_settings_refuse_an_unknown_activation() -> None:
    base = dict(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2)
    assert T5Settings.from_json({**base, "feed_forward_proj": "gated-gelu"}).act == "gelu_new"
    plain = T5Settings.from_json({**base, "feed_forward_proj": "relu"})
    assert (plain.act, plain.gated) == ("relu", False)
    with pytest.raises(ValueError, match="activation 'swish'"):
        T5Settings.from_json({**base, "feed_forward_proj": "gated-swish"})


def test_tiny_start_imports_neither_transformers_nor_dynamo(tiny: Path, tmp_path: Path) -> None:
    # Importing transformers (which pulls in torch._dynamo) cost more CPU time than the rest of
    # the tiny demo's load + generate; so did meta-device arithmetic in the DiT/T5 builds.
    code = (
        "import sys; from magi.pipeline import MagiPipeline\n"
        f"pipe = MagiPipeline.from_config({str(tiny)!r}, device='cpu')\n"
        f"pipe.generate('t2v', 'a dog', output_path={str(tmp_path / 'out.mp4')!r}, seed=1, num_frames=24)\n"
        "print(sorted(m for m in ('transformers', 'torch._dynamo', 'sympy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tiny.parent,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out.mp4").stat().st_size > 0
