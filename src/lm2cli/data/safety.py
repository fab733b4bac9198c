"""Safety filter (SPEC §4.6): domain blocklist, zh/en word blocklists, optional toxicity classifier.

The lists are plain text files shipped in `lm2cli/data/lists/` (editable; the recipe can point at
others). English terms match whole mixed-token words or phrases; Chinese terms match as substrings
after masking allow-listed phrases, and a document is dropped at more than `zh_max_hits_per_line` hits
per line (ChineseWebText). Reasons: `domain_blocklist`, `en_blocklist:<category>`,
`zh_blocklist:<category>`, `toxic_classifier`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from ..config import SafetyConfig
from ..errors import InputError
from . import mixed

LISTS = Path(__file__).resolve().parent / "lists"


def _list_path(value: str, default: str) -> Optional[Path]:
    if value == "none":
        return None
    p = Path(value) if value else LISTS / default
    if not p.exists():
        raise InputError(f"safety list {p} does not exist")
    return p


def read_terms(path: Optional[Path]) -> dict[str, str]:
    """term -> category from a 'term<TAB>category' file (# comments, blank lines ignored)."""
    if path is None:
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        term, _, cat = line.partition("\t")
        out[term.strip()] = cat.strip() or "blocked"
    return out


@dataclass
class Safety:
    cfg: SafetyConfig
    domains: set = field(default_factory=set)
    en_words: dict = field(default_factory=dict)
    en_phrases: dict = field(default_factory=dict)
    zh_words: dict = field(default_factory=dict)
    zh_regex: Optional[re.Pattern] = None
    allow_regex: Optional[re.Pattern] = None
    toxic: object = None

    @classmethod
    def load(cls, cfg: SafetyConfig, toxic_model: Optional[Path] = None) -> "Safety":
        s = cls(cfg)
        s.domains = set(read_terms(_list_path(cfg.domains, "domains.txt")))
        for term, cat in read_terms(_list_path(cfg.en_words, "en_words.txt")).items():
            toks = [t.lower() for t in mixed.tokens(term)]
            if len(toks) == 1:
                s.en_words[toks[0]] = cat
            elif toks:
                s.en_phrases[" ".join(toks)] = cat
        s.zh_words = read_terms(_list_path(cfg.zh_words, "zh_words.txt"))
        if s.zh_words:
            s.zh_regex = re.compile("|".join(map(re.escape, sorted(s.zh_words, key=len, reverse=True))))
        allow = list(read_terms(_list_path(cfg.zh_allow, "zh_allow.txt")))
        if allow:
            s.allow_regex = re.compile("|".join(map(re.escape, sorted(allow, key=len, reverse=True))))
        if toxic_model is not None:
            from .quality import load_classifier

            s.toxic = load_classifier(toxic_model)
        return s

    def domain_of(self, meta: dict) -> Optional[str]:
        url = meta.get("url") or meta.get("domain")
        if not isinstance(url, str) or not url:
            return None
        host = urlsplit(url if "//" in url else "//" + url).hostname
        return host.lower().rstrip(".") if host else None

    def check(self, record: dict) -> Optional[str]:
        host = self.domain_of(record["meta"])
        if host and self.domains:
            parts = host.split(".")
            if any(".".join(parts[i:]) in self.domains for i in range(len(parts))):
                return "domain_blocklist"
        text = record["text"]
        if self.en_words or self.en_phrases:
            toks = [t.lower() for t in mixed.tokens(text)]
            for t in toks:
                if t in self.en_words:
                    if self.cfg.en_min_hits <= 1:
                        return f"en_blocklist:{self.en_words[t]}"
            hits = [self.en_words[t] for t in toks if t in self.en_words]
            if self.en_phrases:
                joined = " " + " ".join(toks) + " "
                hits += [c for p, c in self.en_phrases.items() if f" {p} " in joined]
            if hits and len(hits) >= self.cfg.en_min_hits:
                return f"en_blocklist:{hits[0]}"
        if self.zh_regex is not None:
            masked = self.allow_regex.sub(" ", text) if self.allow_regex else text
            found = self.zh_regex.findall(masked)
            lines = max(1, sum(1 for ln in text.split("\n") if ln.strip()))
            if found and len(found) / lines > self.cfg.zh_max_hits_per_line:
                return f"zh_blocklist:{self.zh_words[found[0]]}"
        if self.toxic is not None and record["lang"] in self.cfg.classifier_langs:
            score = self.toxic.score(text)
            record["meta"]["lm2"]["toxic_score"] = round(score, 4)
            if score >= self.cfg.toxic_threshold:
                return "toxic_classifier"
        return None
