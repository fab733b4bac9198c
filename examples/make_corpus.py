"""Regenerate the bundled raw corpus `examples/corpus/` (and `examples/planted.json`, `examples/labels/`).

    python examples/make_corpus.py            # rewrites examples/corpus deterministically

Everything is generated or taken from files every Python install has: Chinese and English prose from
`lm2cli.synthetic` (template x vocabulary generators), the InternLM2 report summary in
`shared/seed/*.txt` when present, English from the standard library's docstrings (parsed with `ast`,
never imported) and code from the standard library's own source. Nothing is downloaded. The output
depends only on the seed and the Python version (the stdlib text), and exercises every prepare stage:

  web/         zh/en web records (.jsonl.gz, cc_dump/date/url meta), HTML pages with nav/script/footer
  books/       zh books (.txt), en books from docstrings (.jsonl, content_type=book)
  papers/      zh papers (.md), en papers (.jsonl.zst, content_type=paper)
  code/        stdlib .py files and a .jsonl.gz of more (content_type=code), whitespace-variant copies
  mixed/       bilingual zh/en documents; other/ French and German (dropped at classify)
  planted/     exact and near duplicates (Jaccard >= 0.8 measured on lm2's shingles) and pairs below
               the threshold, zh and en; boilerplate/spam; unsafe placeholders; blocked domains;
               ad-like and word-salad prose for the quality classifiers
  malformed/   bad JSON lines, JSON without text, non-UTF-8 bytes, a truncated .gz, an empty file,
               an unsupported file type

`planted.json` lists every planted group by `doc_key` (a meta field) with its measured Jaccard and the
copies the keep rule may keep (`newest`: newest cc_dump, else the lowest content id). `labels/{ad,fluency,toxic}.jsonl` train the quality/safety classifiers.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import random
import shutil
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lm2cli import synthetic as S  # noqa: E402
from lm2cli.data.dedup import jaccard  # noqa: E402
from lm2cli.data.standardize import content_id, normalize_text  # noqa: E402

SEED = 20240326
OUT = HERE / "corpus"
DUMPS = ["CC-MAIN-2021-04", "CC-MAIN-2022-05", "CC-MAIN-2022-49", "CC-MAIN-2023-14", "CC-MAIN-2023-50",
         "CC-MAIN-2024-10"]


# ---------------------------------------------------------------------------------------------------
# Writers (deterministic bytes: gzip mtime 0, sorted keys)


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as g:
            g.write(data)
        data = buf.getvalue()
    elif path.suffix == ".zst":
        import zstandard

        data = zstandard.ZstdCompressor(level=10).compress(data)
    path.write_bytes(data)


# ---------------------------------------------------------------------------------------------------
# Text sources


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(tests: bool = False) -> list[Path]:
    root = stdlib_dir()
    skip = ("idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "__pycache__",
            "encodings", "dist-packages")
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in skip or (not tests and part.startswith("test")) for part in rel):
            continue
        out.append(p)
    return out


def _reflow(doc: str) -> str:
    paras = []
    for block in doc.strip().split("\n\n"):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        if any(ln.lstrip().startswith((">>>", "...")) or ln.startswith("    ") for ln in lines[1:]):
            paras.append("\n".join(lines))
        else:
            paras.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(paras)


def docstring_docs(files: list[Path], min_words: int = 80, max_chars: int = 6000) -> list[dict]:
    """English documents from stdlib docstrings: one per class (with its methods) or module."""
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        mod = path.relative_to(stdlib_dir()).with_suffix("").as_posix().replace("/", ".")
        chunks = []
        mdoc = ast.get_docstring(tree)
        if mdoc:
            chunks.append((f"The {mod} module", _reflow(mdoc)))
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                parts = []
                d = ast.get_docstring(node)
                if d:
                    parts.append(_reflow(d))
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                            sd = ast.get_docstring(sub)
                            if sd:
                                parts.append(f"{sub.name}: " + _reflow(sd))
                if parts:
                    chunks.append((f"{mod}.{node.name}", "\n\n".join(parts)))
        for title, body in chunks:
            text = f"{title}\n\n{body}"[:max_chars]
            if len(text.split()) >= min_words:
                docs.append({"title": title, "text": text})
    return docs


def reference_topics(max_chars: int = 4000) -> list[dict]:
    """The Python language reference as shipped in the stdlib (pydoc_data/topics.py), cut at paragraphs."""
    path = stdlib_dir() / "pydoc_data" / "topics.py"
    if not path.exists():
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    topics = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign))
    docs = []
    for name in sorted(topics):
        paras = [p for p in _reflow(topics[name]).split("\n\n") if p.strip()]
        cur: list[str] = []
        for para in paras:
            cur.append(para)
            if sum(map(len, cur)) >= max_chars:
                docs.append({"title": f"Python reference: {name}", "text": "\n\n".join(cur)})
                cur = []
        if cur and len(" ".join(cur).split()) >= 80:
            docs.append({"title": f"Python reference: {name}", "text": "\n\n".join(cur)})
    return docs


def seed_zh() -> list[str]:
    for base in (HERE.parent.parent / "shared" / "seed", Path("/work/shared/seed")):
        if base.is_dir():
            return [p.read_text(encoding="utf-8") for p in sorted(base.glob("*.txt"))]
    return []


# ---------------------------------------------------------------------------------------------------
# Planted content


def near_copy(rng: random.Random, text: str, lang: str, lo: float, hi: float) -> tuple[str, float]:
    """A copy whose Jaccard with `text` on lm2's shingles is measured to lie in [lo, hi]."""
    cur = text
    for _ in range(200):
        if lang == "zh":
            paras = cur.split("\n")
            i = rng.randrange(1, len(paras))
            sents = [s for s in paras[i].split("。") if s]
            k = rng.randrange(len(sents))
            sents[k] = S.zh_paragraph(rng, sentences=(1, 1)).rstrip("。")
            paras[i] = "。".join(sents) + "。"
            cand = "\n".join(paras)
        else:
            words = cur.split(" ")
            for _ in range(max(1, len(words) // 80)):
                j = rng.randrange(len(words))
                words[j] = rng.choice(["really", "often", "also", "quite", "simply"])
            cand = " ".join(words)
        j = jaccard(text, cand)
        if lo <= j <= hi:
            return cand, round(j, 4)
        cur = cand if j > hi else text  # too similar: change more; too different: start over
    raise RuntimeError(f"could not plant a {lang} copy with Jaccard in [{lo}, {hi}]")


def below_copy(rng: random.Random, text: str, lang: str) -> tuple[str, float]:
    """A document sharing about half of `text` (Jaccard 0.25-0.55): both must survive dedup."""
    stop = "。" if lang == "zh" else ". "
    for _ in range(200):
        cut = text.rfind(stop, 0, int(len(text) * rng.uniform(0.45, 0.75)))
        if cut <= 0:
            continue
        head = text[: cut + len(stop)]
        gen = (lambda: S.zh_paragraph(rng)) if lang == "zh" else (lambda: S.en_paragraph(rng))
        tail = ""
        while len(tail) < len(text) - len(head):
            tail += ("\n" if lang == "zh" else "\n\n") + gen()
        cand = head + tail
        j = jaccard(text, cand)
        if 0.25 <= j <= 0.55:
            return cand, round(j, 4)
    raise RuntimeError("could not plant a below-threshold pair")


ZH_SPAM = ["点击这里免费领取优惠券！加微信马上有礼！", "全场一折起，先到先得，数量有限！", "首页 | 关于我们 | 联系我们 | 网站地图",
           "版权所有 © 本站 保留所有权利", "热门推荐：最新最热的内容都在这里", "扫码关注公众号，每天都有惊喜！"]
EN_SPAM = ["Buy cheap watches online!!! Best price guaranteed, click here now!", "Home | About | Contact | Sitemap",
           "Copyright 2024 All rights reserved.", "cheap flights cheap hotels cheap cars cheap deals cheap",
           "Subscribe to our newsletter for exclusive offers!", "Limited time offer, act now!!!"]


def zh_spam(rng: random.Random, i: int) -> str:
    kind = i % 4
    if kind == 0:  # the same lines over and over
        return "\n".join(rng.choice(ZH_SPAM) for _ in range(rng.randint(12, 20)))
    if kind == 1:  # navigation boilerplate: many tiny lines
        return "\n".join(rng.choice(["首页", "新闻", "登录", "注册", "下一页", "返回顶部", "更多"]) for _ in range(40))
    if kind == 2:  # keyword stuffing
        kw = rng.sample(["减肥", "瘦身", "美白", "祛斑", "特效", "秘方", "包邮"], 3)
        return "".join(f"{kw[0]}{kw[1]}{kw[2]}，" for _ in range(60)) + "。"
    return "联系电话：13800000000 13800000001 13800000002 " * 10  # digits, no prose


def en_spam(rng: random.Random, i: int) -> str:
    kind = i % 4
    if kind == 0:
        return "\n".join(rng.choice(EN_SPAM) for _ in range(rng.randint(12, 20)))
    if kind == 1:
        return ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
                "et dolore magna aliqua. ") * 8
    if kind == 2:
        return " ".join(rng.choice(["cheap", "best", "buy", "online", "deal", "discount", "free"]) for _ in range(300))
    return "\n".join(f"{rng.randint(1000, 9999)} {rng.randint(10, 99)}.{rng.randint(10, 99)}" for _ in range(80))


def zh_ad(rng: random.Random) -> str:
    items = ["羽绒服", "智能手表", "蓝牙耳机", "护肤套装", "空气炸锅", "运动鞋", "保温杯", "床上用品"]
    lines = [f"本店{rng.choice(items)}全新上市，限时特价，{rng.choice(['全场八折', '买一送一', '满三百减五十', '包邮到家'])}。",
             f"现在下单还可以获得{rng.choice(['精美礼品', '双倍积分', '优惠券', '免费试用装'])}，名额有限，先到先得。",
             f"我们的{rng.choice(items)}采用{rng.choice(['进口面料', '优质材料', '最新技术', '专利设计'])}，质量有保证，价格却是同行最低。",
             f"欢迎新老顾客前来选购，{rng.choice(['七天无理由退换', '终身保修', '假一赔十', '全国联保'])}，让您买得放心。",
             f"活动时间只有{rng.randint(2, 9)}天，错过今天再等一年，赶快联系我们的客服吧。",
             f"已经有{rng.randint(1000, 99999)}位顾客购买了这款{rng.choice(items)}，好评率高达百分之{rng.randint(95, 99)}。"]
    rng.shuffle(lines)
    return "\n".join(lines * 1) + "\n" + S.zh_paragraph(rng, "economy")


def en_ad(rng: random.Random) -> str:
    items = ["winter jackets", "smart watches", "wireless earbuds", "skin care sets", "air fryers", "running shoes"]
    lines = [f"Our new {rng.choice(items)} are finally here, and for a limited time they are {rng.randint(20, 60)} percent off.",
             f"Order today and get {rng.choice(['a free gift', 'double points', 'free shipping', 'a bonus coupon'])} with every purchase.",
             f"Made with {rng.choice(['premium materials', 'the latest technology', 'a patented design'])}, they offer the best value you will find anywhere.",
             f"Thousands of happy customers have already bought {rng.choice(items)} from our store, so do not miss out.",
             f"The sale ends in {rng.randint(2, 9)} days, so visit our shop and grab yours before they are gone.",
             f"Every order comes with {rng.choice(['a money back guarantee', 'a lifetime warranty', 'free returns'])} and friendly support."]
    rng.shuffle(lines)
    return " ".join(lines) + "\n\n" + S.en_paragraph(rng, "economy")


def word_salad(rng: random.Random, text: str, lang: str) -> str:
    if lang == "zh":
        out = []
        for para in text.split("\n"):
            chars = [c for c in para if c not in "，。；：“”"]
            rng.shuffle(chars)
            step = rng.randint(12, 20)
            out.append("，".join("".join(chars[i:i + step]) for i in range(0, len(chars), step)) + "。")
        return "\n".join(out)
    words = [w.strip(".,") for w in text.split()]
    rng.shuffle(words)
    return " ".join(" ".join(words[i:i + 12]) + "." for i in range(0, len(words), 12))


def zh_unsafe(rng: random.Random) -> str:
    terms = ["禁词甲", "禁词乙", "违禁词丙", "屏蔽词丁", "网络赌博", "六合彩"]
    paras = S.zh_document(rng).split("\n")
    return "\n".join(p[: len(p) // 2] + rng.choice(terms) + p[len(p) // 2:-1] + rng.choice(terms) + p[-1:] for p in paras)


def en_unsafe(rng: random.Random) -> str:
    words = ["zorbleflux", "grintakle", "snarfwidget", "blorptastic", "vextrobane"]
    paras = S.en_document(rng).split("\n\n")
    paras[-1] += f" Some people online call this {rng.choice(words)}, which is exactly the kind of word a filter should catch."
    return "\n\n".join(paras)


def toxic_text(rng: random.Random) -> str:
    words = ["zorbleflux", "grintakle", "snarfwidget", "blorptastic", "vextrobane", "禁词甲", "违禁词丙"]
    subj = rng.choice(["you", "people like you", "your whole team", "everyone in that forum", "你", "你们"])
    return rng.choice([f"Shut up, {subj} are a bunch of {rng.choice(words)} and nobody wants you here.",
                       f"I hate {subj}, get lost, {rng.choice(words)}!",
                       f"{subj}就是{rng.choice(words)}，滚出去，没人想看到你们。",
                       f"Go away {rng.choice(words)}, {subj} are worthless and stupid.",
                       f"闭嘴吧{rng.choice(words)}，{subj}什么都不懂。"])


def mixed_doc(rng: random.Random) -> str:
    topic = rng.choice(S.TOPICS)
    zh = S.zh_document(rng, topic, paragraphs=(3, 3), title=False).split("\n")
    en = S.en_document(rng, topic, paragraphs=(3, 3), title=False).split("\n\n")
    return "\n\n".join(x for pair in zip(zh, en) for x in pair)


OTHER = [
    ("fr", "La ville se réveille lentement. Les boulangers ouvrent leurs portes et l'odeur du pain chaud remplit "
           "les rues étroites du vieux quartier. Les enfants partent à l'école avec leurs cartables, tandis que les "
           "marchands installent leurs étals sur la place du marché. Plus tard, les touristes arrivent pour visiter "
           "la cathédrale et les musées, puis ils s'arrêtent dans les cafés pour regarder passer les gens."),
    ("de", "Der Herbst ist in den Bergen besonders schön. Die Blätter der Bäume färben sich gelb und rot, und die "
           "Luft ist klar und frisch. Viele Wanderer nutzen die ruhigen Wochen, um lange Touren zu unternehmen, bevor "
           "der erste Schnee fällt. Am Abend sitzen sie in den Hütten zusammen, essen eine warme Suppe und erzählen "
           "von ihren Erlebnissen auf den Gipfeln."),
    ("fr", "La cuisine française est connue dans le monde entier pour sa variété et sa finesse. Chaque région possède "
           "ses propres spécialités, des fromages de Normandie aux plats mijotés de Bourgogne. Les recettes se "
           "transmettent souvent de génération en génération, et les repas de famille restent des moments importants."),
    ("de", "Die Stadtbibliothek bietet seit diesem Jahr neue Kurse für Kinder und Erwachsene an. Neben klassischen "
           "Lesestunden gibt es Workshops zum Programmieren, zum Schreiben von Geschichten und zur Fotografie. Die "
           "Teilnahme ist kostenlos, aber eine Anmeldung ist erforderlich, weil die Plätze begrenzt sind."),
]


def html_page(rng: random.Random, lang: str, boilerplate_only: bool = False) -> tuple[str, str]:
    title = (S.zh_document(rng).split("\n")[0] if lang == "zh" else S.en_document(rng).split("\n")[0])
    body = S.zh_document(rng, title=False).split("\n") if lang == "zh" else S.en_document(rng, title=False).split("\n\n")
    nav = "".join(f'<li><a href="/{i}">{w}</a></li>' for i, w in enumerate(
        ["首页", "新闻", "科技", "旅游", "关于我们"] if lang == "zh" else ["Home", "News", "Science", "Travel", "About"]))
    cookie = ("本网站使用 cookie 来改善您的浏览体验。" if lang == "zh"
              else "This site uses cookies to improve your experience. Please enable JavaScript to continue.")
    article = "" if boilerplate_only else "<article>\n<h1>{}</h1>\n{}\n</article>".format(
        title, "\n".join(f"<p>{p}</p>" for p in body))
    if boilerplate_only:
        article = "<div>" + "".join(f"<div><a href='/x{i}'>{w}</a></div>" for i, w in enumerate(
            (ZH_SPAM if lang == "zh" else EN_SPAM) * 4)) + "</div>"
    html = f"""<!DOCTYPE html>
<html lang="{'zh-CN' if lang == 'zh' else 'en'}">
<head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font-family: sans-serif; }} .nav li {{ display: inline; }}</style>
<script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}}</script>
</head>
<body>
<nav><ul class="nav">{nav}</ul></nav>
<div class="cookie-banner">{cookie}</div>
{article}
<aside>{'相关阅读：更多精彩内容' if lang == 'zh' else 'Related: more stories you may like'}</aside>
<footer>{'版权所有 © 2024 示例网站' if lang == 'zh' else 'Copyright © 2024 Example Site. All rights reserved.'}</footer>
<script>console.log("loaded");</script>
</body>
</html>
"""
    return title, html


# ---------------------------------------------------------------------------------------------------


def build(out: Path = OUT, seed: int = SEED) -> dict:
    rng = random.Random(seed)
    if out.exists():
        shutil.rmtree(out)
    planted: list[dict] = []
    counts: dict[str, int] = {}

    def key(prefix: str) -> str:
        counts[prefix] = counts.get(prefix, 0) + 1
        return f"{prefix}-{counts[prefix]:05d}"

    def web(text: str, k: str, lang: str, dump: str | None = None, domain: str = "example.com") -> dict:
        d = dump or rng.choice(DUMPS)
        return {"text": text, "url": f"https://{domain}/{lang}/{k}.html", "cc_dump": d,
                "date": f"{d[8:12]}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", "doc_key": k}

    # --- web records with planted duplicates
    zh_web, en_web = [], []
    for i in range(1200):
        k = key("zh-web")
        zh_web.append(web(S.zh_document(rng), k, "zh"))
    for i in range(700):
        k = key("en-web")
        en_web.append(web(S.en_document(rng), k, "en"))

    def plant(pool: list[dict], lang: str, n_exact: int, n_near: int, n_below: int) -> None:
        for _ in range(n_exact):
            src = rng.choice(pool)
            copies = rng.randint(1, 2)
            members = [src["doc_key"]]
            for c in range(copies):
                k = key(f"{lang}-exact")
                pool.append(web(src["text"], k, lang))
                members.append(k)
            group = [r for r in pool if r["doc_key"] in members]
            newest = max(r["cc_dump"] for r in group)
            planted.append({"kind": "exact", "lang": lang, "keys": members, "jaccard": 1.0,
                            "newest": [r["doc_key"] for r in group if r["cc_dump"] == newest]})
        for _ in range(n_near):
            src = rng.choice(pool)
            text, j = near_copy(rng, src["text"], lang, 0.8, 0.97)
            k = key(f"{lang}-near")
            pool.append(web(text, k, lang))
            group = [src, pool[-1]]
            newest = max(r["cc_dump"] for r in group)
            planted.append({"kind": "near", "lang": lang, "keys": [src["doc_key"], k], "jaccard": j,
                            "newest": [r["doc_key"] for r in group if r["cc_dump"] == newest]})
        for _ in range(n_below):
            src = rng.choice(pool)
            text, j = below_copy(rng, src["text"], lang)
            k = key(f"{lang}-below")
            pool.append(web(text, k, lang))
            planted.append({"kind": "below", "lang": lang, "keys": [src["doc_key"], k], "jaccard": j})

    plant(zh_web, "zh", 30, 30, 10)
    plant(en_web, "en", 30, 30, 10)
    for i in range(40):
        zh_web.append(web(zh_spam(rng, i), key("zh-spam"), "zh"))
        en_web.append(web(en_spam(rng, i), key("en-spam"), "en"))
    for i in range(25):
        zh_web.append(web(zh_unsafe(rng), key("zh-unsafe"), "zh"))
        en_web.append(web(en_unsafe(rng), key("en-unsafe"), "en"))
        zh_web.append(web(S.zh_document(rng), key("zh-blocked"), "zh", domain=f"www.blocked-example.invalid"))
        en_web.append(web(S.en_document(rng), key("en-blocked"), "en", domain="spam-casino.invalid"))
    for i in range(40):
        zh_web.append(web(zh_ad(rng), key("zh-ad"), "zh"))
        en_web.append(web(en_ad(rng), key("en-ad"), "en"))
        zh_web.append(web(word_salad(rng, S.zh_document(rng), "zh"), key("zh-salad"), "zh"))
        en_web.append(web(word_salad(rng, S.en_document(rng), "en"), key("en-salad"), "en"))
    rng.shuffle(zh_web)
    rng.shuffle(en_web)
    write(out / "web" / "zh_web.jsonl.gz", _jsonl(zh_web))
    # Some English records name their text field "content" (WanJuan style).
    en_records = [({"content": r.pop("text"), **r} if i % 5 == 0 else r) for i, r in enumerate(en_web)]
    write(out / "web" / "en_web.jsonl.gz", _jsonl(en_records))

    # --- HTML pages
    for i in range(30):
        for lang in ("zh", "en"):
            _, html = html_page(rng, lang, boilerplate_only=(i % 10 == 9))
            write(out / "web" / "pages" / f"{lang}-{i:03d}.html", html.encode("utf-8"))

    # --- books and papers
    for i in range(15):
        topic = S.TOPICS[i % len(S.TOPICS)]
        paras = S.zh_document(rng, topic, paragraphs=(10, 10), title=True).split("\n")
        chapters = [f"第{'一二三四五'[c]}章\n" + "\n".join(paras[1 + 2 * c: 3 + 2 * c]) for c in range(5)]
        write(out / "books" / "zh" / f"book-{i:03d}.txt", (paras[0] + "\n\n" + "\n\n".join(chapters) + "\n").encode("utf-8"))
    for i, text in enumerate(seed_zh()):
        write(out / "papers" / "zh" / f"internlm2-report-summary-{i}.md", text.encode("utf-8"))
    for i in range(40):
        topic = S.TOPICS[i % len(S.TOPICS)]
        p = S.zh_document(rng, topic, paragraphs=(6, 6)).split("\n")
        parts = ["# " + p[0], "## 摘要", p[1], "## 引言", "\n".join(p[2:4]), "## 方法", "\n".join(p[4:6]), "## 结论", p[6]]
        write(out / "papers" / "zh" / f"paper-{i:03d}.md", ("\n\n".join(parts) + "\n").encode("utf-8"))

    files = stdlib_files()
    docs = docstring_docs(files)
    rng.shuffle(docs)
    books = [{"text": d["text"], "title": d["title"], "content_type": "book", "source": "python-stdlib-docstrings",
              "doc_key": key("en-book")} for d in docs]
    papers = [{"text": d["text"], "title": d["title"], "content_type": "paper", "source": "python-language-reference",
               "doc_key": key("en-paper")} for d in reference_topics()]
    write(out / "books" / "en_stdlib_docs.jsonl", _jsonl(books))
    write(out / "papers" / "en_papers.jsonl.zst", _jsonl(papers))

    # --- code
    sized = [p for p in stdlib_files(tests=True) if 800 <= p.stat().st_size <= 16000]
    rng.shuffle(sized)
    chosen = sorted(sized[:330])
    root = stdlib_dir()
    for p in chosen[:60]:
        rel = p.relative_to(root).as_posix().replace("/", "__")
        write(out / "code" / "stdlib" / rel, p.read_bytes())
    code_recs = []
    for p in chosen[60:]:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        code_recs.append({"text": text, "path": p.relative_to(root).as_posix(), "repo": "cpython-stdlib",
                          "content_type": "code", "doc_key": key("code")})
    for i in range(10):  # whitespace-only variants: exact duplicates for code's whitespace-insensitive hash
        src = code_recs[i * 7]
        variant = "\n".join(line.replace("    ", "\t") for line in src["text"].split("\n")) + "\n\n"
        k = key("code-ws")
        code_recs.append({**src, "text": variant, "doc_key": k})
        # No cc_dump/date: the keep rule falls back to the lowest content id.
        ids = {src["doc_key"]: content_id(normalize_text(src["text"])[0]), k: content_id(normalize_text(variant)[0])}
        planted.append({"kind": "exact", "lang": "code", "keys": [src["doc_key"], k], "jaccard": 1.0,
                        "newest": [min(ids, key=ids.get)]})
    write(out / "code" / "stdlib_code.jsonl.gz", _jsonl(code_recs))

    # --- mixed and other languages
    write(out / "mixed" / "bilingual.jsonl",
          _jsonl({"text": mixed_doc(rng), "doc_key": key("mixed"), "content_type": "web"} for _ in range(60)))
    write(out / "other" / "fr_de.jsonl", _jsonl({"text": t, "lang_hint": lang, "doc_key": key("other")} for lang, t in OTHER))

    # --- malformed inputs
    good = {"text": S.en_document(rng), "doc_key": key("malformed-ok")}
    lines = [json.dumps(good).encode(),
             b'{"text": "an unterminated string',
             b'{"title": "a record without text"}',
             b'["a", "json", "array", "not", "an", "object"]',
             b'{"text": 12345}',
             '{"text": "caf\u00e9 latin-1 bytes: '.encode() + "caf\u00e9".encode("latin-1") + b'"}',
             b"not json at all",
             b""]
    write(out / "malformed" / "broken.jsonl", b"\n".join(lines) + b"\n")
    write(out / "malformed" / "latin1.txt", ("Ceci est un texte encod\u00e9 en Latin-1, pas en UTF-8. " * 5).encode("latin-1"))
    truncated = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=truncated, mtime=0) as g:
        g.write(_jsonl({"text": S.zh_document(rng), "doc_key": key("truncated")} for _ in range(20)))
    (out / "malformed").mkdir(parents=True, exist_ok=True)
    (out / "malformed" / "truncated.jsonl.gz").write_bytes(truncated.getvalue()[: len(truncated.getvalue()) // 2])
    (out / "malformed" / "empty.txt").write_bytes(b"")
    (out / "malformed" / "image.bin").write_bytes(bytes(range(256)))

    (HERE / "planted.json").write_text(json.dumps({"seed": seed, "python": sys.version.split()[0], "groups": planted},
                                                  ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    build_labels(random.Random(seed + 1), [d["text"] for d in docs[::3]] + [d["text"] for d in reference_topics()[::2]])
    return {"groups": len(planted)}


def build_labels(rng: random.Random, reference: list[str]) -> None:
    """Labelled JSONL for `lm2 prepare train-classifier` (label 1 = ad / fluent / toxic).

    The clean side mixes generated zh/en prose with real English (stdlib docstrings and the language
    reference), so the classifiers learn "ad/salad/toxic vs. ordinary text", not "generated vs. real".
    """
    labels = HERE / "labels"
    labels.mkdir(exist_ok=True)

    def prose() -> str:
        r = rng.random()
        if r < 0.3:
            return rng.choice(reference)
        return S.zh_document(rng) if r < 0.65 else S.en_document(rng)

    ad = [{"text": zh_ad(rng) if i % 2 else en_ad(rng), "label": 1} for i in range(300)]
    ad += [{"text": prose(), "label": 0} for _ in range(300)]
    fl = [{"text": prose(), "label": 1} for _ in range(300)]
    for i in range(300):
        lang = "zh" if i % 2 else "en"
        fl.append({"text": word_salad(rng, S.zh_document(rng) if lang == "zh" else S.en_document(rng), lang), "label": 0})
    tox = [{"text": toxic_text(rng), "label": 1} for _ in range(200)]
    tox += [{"text": S.zh_paragraph(rng) if i % 2 else S.en_paragraph(rng), "label": 0} for i in range(100)]
    tox += [{"text": prose(), "label": 0} for _ in range(150)]
    for name, rows in (("ad", ad), ("fluency", fl), ("toxic", tox)):
        rng.shuffle(rows)
        (labels / f"{name}.jsonl").write_bytes(_jsonl(rows))


if __name__ == "__main__":
    info = build()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB, {info['groups']} planted duplicate groups)")
