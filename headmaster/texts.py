"""Text items as files (.txt), and real labelled text that ships on the system: manual pages by section.

``/usr/share/man/manN/*.N.gz`` (troff sources) turned into plain text: a page's label is its
section (1 user commands, 2 system calls, 3 library functions, 5 file formats, 7 overviews,
8 administration). The ``.TH`` line, which names the section, is dropped, so the label is only
in what the page says. Used by the text tests and ``benchmarks/text_heads.py``.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

# A text encoder's items (st:FOLDER) as files: one .txt file per text, its UTF-8 bytes the text, so the
# file's sha256 is the text's (the embedding cache and the store key texts by it).
TEXT_SUFFIXES = frozenset({".txt"})
MAN_ROOT = Path("/usr/share/man")
# Macros whose arguments are text (man(7) and mdoc(7)); every other request line is dropped.
_TEXT_MACROS = {
    "SH",
    "SS",
    "B",
    "I",
    "BR",
    "BI",
    "IB",
    "IR",
    "RB",
    "RI",
    "SM",
    "SB",
    "TP",
    "IP",
    "Nm",
    "Nd",
    "Ar",
    "Fl",
    "Cm",
    "Pa",
    "Va",
    "Fn",
    "Fa",
    "Ft",
    "Xr",
    "Sh",
    "Ss",
    "Dq",
    "Sq",
    "Ql",
    "Em",
    "Sy",
    "Li",
    "Op",
    "It",
    "Ev",
    "Er",
    "Dv",
    "Ic",
    "Tn",
}
_NAMED = {
    "em": "\u2014",
    "en": "\u2013",
    "aq": "'",
    "dq": '"',
    "lq": '"',
    "rq": '"',
    "oq": "'",
    "cq": "'",
    "bu": "*",
    "co": "(c)",
    "mi": "-",
    "hy": "-",
    "ti": "~",
    "ha": "^",
    "rs": "\\",
    "lh": "",
    "rh": "",
}
_ESCAPE = re.compile(
    r"\\(f(\[[^\]]*\]|\(..|.)|s[-+]?\d+|\*(\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|"
    r"[&|^%:c]|e|-|.)"
)


def _unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        whole = m.group(0)
        if whole[1] in "fs*" and len(whole) > 2 or whole in ("\\&", "\\|", "\\^", "\\%", "\\:", "\\c"):
            return ""
        if m.group(4):
            return _NAMED.get(m.group(4), "")
        if m.group(5) is not None:
            return _NAMED.get(m.group(5), "")
        if whole == "\\e":
            return "\\"
        return whole[1:] if whole != "\\-" else "-"

    return _ESCAPE.sub(one, text)


def man_page_text(path: Path, limit: int = 2000) -> str | None:
    """A troff man page as plain text (at most ``limit`` characters), or None for a redirect
    (``.so``) or a page with next to no text."""
    raw = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
    words: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].strip().partition(" ")
            if request == "so":
                return None
            if request not in _TEXT_MACROS:
                continue
            line = rest.replace('"', "")
        words.append(_unescape(line))
    text = " ".join(" ".join(words).split())
    return text[:limit] if len(text) >= 200 else None


def man_pages(
    sections: tuple[str, ...] = ("1", "2", "3", "5", "7", "8"),
    per_section: int = 100,
    seed: int = 0,
    root: Path = MAN_ROOT,
) -> list[tuple[str, str, str]]:
    """(page file name, text, section) of ``per_section`` pages drawn (seeded) from each section's
    plain ``*.N.gz`` pages (not 3pm, 1ssl, ...), fewer where a section has fewer; sorted. A text
    seen already (a page installed under two names) is not taken twice, in any section."""
    import numpy as np

    found, seen = [], set()
    for section in sections:
        files = sorted((root / f"man{section}").glob(f"*.{section}.gz"))
        rng = np.random.default_rng(seed)
        taken = 0
        for i in rng.permutation(len(files)):
            if taken == per_section:
                break
            text = man_page_text(files[i])
            if text and text not in seen:
                seen.add(text)
                found.append((files[i].name, text, section))
                taken += 1
    return sorted(found)
