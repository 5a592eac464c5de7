"""The documentation is tested: README.md and docs/*.md cannot rot silently.

* Every ```python block runs, in order, one namespace per page, in a temporary working directory, on the embedded
  SmolLM2 asset: the Hub id ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` is replaced by the prepared local folder, so
  nothing reaches the network. A snippet that cannot run here (an upload, a GPU, several processes) starts with the
  visible comment ``# not run by tests/test_docs.py: <reason>``; it is still compiled, and every such opt-out is
  counted and reported.
* Every command shown (```bash blocks, ``$ `` lines of other blocks, and inline code that starts with a command)
  must exist: ``make`` targets and variables in the Makefile, options of ``scripts/*.py``, ``python -m`` modules and
  ``hf-int8`` (read from their own argparse parsers), ``tests/`` files and ``-k`` names for pytest.
* Every relative link and image resolves, ``#anchors`` included (GitHub's heading slugs).

The checker functions are also fed broken input at the end, to show that each check can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES: list[Path] = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAKEFILE = ROOT / "Makefile"

# The Hub id snippets use for the embedded model, and the comment that opts a snippet out of execution.
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SKIP_RE = re.compile(r"^#\s*not run by tests/test_docs\.py:(?P<reason>.*)$")
# Opt-outs are meant to stay rare: raising this needs a reason as good as the ones already there.
MAX_SKIPPED_SNIPPETS = 3
README_MAX_LINES = 250

FENCE_RE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
INLINE_CODE_RE = re.compile(r"(`+)(?P<code>.+?)\1")
LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?(?P<target>[^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_TAG_RE = re.compile(r"<img\b[^>]*?\bsrc=[\"'](?P<target>[^\"']+)[\"']", re.IGNORECASE)
HTML_ANCHOR_RE = re.compile(r"<a\b[^>]*?\b(?:id|name)=[\"'](?P<name>[^\"']+)[\"']", re.IGNORECASE)
HEADING_RE = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<title>.+?)\s*#*\s*$")
COMMAND_START_RE = re.compile(r"^(?:make|hf-int8|pytest|python3?|\.venv/bin/python)(?:\s|$)")
SHELL_LANGS = {"bash", "sh", "shell", "zsh"}
PYTHON_EXECUTABLES = {"python", "python3", ".venv/bin/python", "$(PY)"}
PREFIX_WORDS = {"env", "time", "/usr/bin/time", "sudo", "exec"}
SEPARATORS = {"&&", "||", ";", "|"}


# ---------------------------------------------------------------------------------------------------------------
# Markdown parsing
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeBlock:
    """A fenced code block: ``line`` is the 1-based line of its first code line in ``path``."""

    path: Path
    line: int
    lang: str
    code: str


def code_blocks(text: str, path: Path) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown text (indented fences inside lists included, indentation removed)."""
    blocks: list[CodeBlock] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        match = FENCE_RE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        lang = match["info"].strip().split(" ")[0].lower() if match["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: code fence {fence!r} is never closed")
        blocks.append(CodeBlock(path, i + 2, lang, "\n".join(body)))
        i = j + 1
    return blocks


def prose_lines(text: str) -> list[str]:
    """The text's lines with fenced code blanked out (line numbers kept), for link and heading scans."""
    lines = text.split("\n")
    out: list[str] = []
    fence: str | None = None
    for line in lines:
        match = FENCE_RE.match(line)
        if fence is None and match:
            fence = match["fence"]
            out.append("")
        elif fence is not None:
            if re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def github_slug(title: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # links keep their text
    title = re.sub(r"<[^>]+>", "", title)  # inline HTML
    title = title.replace("`", "")
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def heading_anchors(text: str) -> set[str]:
    """Every anchor a Markdown text defines: heading slugs (with GitHub's -1, -2 for repeats) and HTML ids."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(text):
        match = HEADING_RE.match(line)
        if match:
            slug = github_slug(match["title"])
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
        anchors.update(m["name"] for m in HTML_ANCHOR_RE.finditer(line))
    return anchors


def inline_code(text: str) -> Iterator[tuple[int, str]]:
    """(line number, content) of every inline code span outside fenced blocks."""
    for number, line in enumerate(prose_lines(text), start=1):
        for match in INLINE_CODE_RE.finditer(line):
            yield number, match["code"].strip()


# ---------------------------------------------------------------------------------------------------------------
# Python snippets
# ---------------------------------------------------------------------------------------------------------------
class SnippetError(AssertionError):
    """A documentation snippet that does not compile or raises."""


def skip_reason(block: CodeBlock) -> str | None:
    """The reason given by a snippet's opt-out comment (its first non-empty line), or None if it runs."""
    first = next((line.strip() for line in block.code.split("\n") if line.strip()), "")
    match = SKIP_RE.match(first)
    if match is None:
        return None
    reason = match["reason"].strip()
    if not reason:
        raise SnippetError(f"{block.path.name}:{block.line}: an opt-out comment must give a reason, got {first!r}")
    return reason


def run_python_blocks(blocks: list[CodeBlock], substitutions: dict[str, str]) -> list[tuple[CodeBlock, str]]:
    """Run the blocks in order in one namespace; return the opted-out ones with their reasons.

    Each block is compiled with its position in the Markdown file, so a traceback names the file and line of the
    documentation. Opted-out blocks are compiled (a syntax error still fails) but not run.
    """
    namespace: dict[str, object] = {"__name__": "__docs__"}
    skipped: list[tuple[CodeBlock, str]] = []
    for block in blocks:
        code = block.code
        for old, new in substitutions.items():
            code = code.replace(old, new)
        where = f"{block.path.name}:{block.line}"
        try:
            compiled = compile("\n" * (block.line - 1) + code, str(block.path), "exec")
        except SyntaxError as err:
            raise SnippetError(f"{where}: snippet does not compile: {err}") from err
        reason = skip_reason(block)
        if reason is not None:
            skipped.append((block, reason))
            continue
        try:
            exec(compiled, namespace)
        except Exception as err:
            details = traceback.format_exc()
            raise SnippetError(f"{where}: snippet raised {type(err).__name__}: {err}\n{details}") from err
    return skipped


def hub_id_substitutions(local_path: Path) -> dict[str, str]:
    """Replace the quoted Hub id of the embedded model by the quoted local folder."""
    return {f'"{HUB_ID}"': repr(str(local_path)), f"'{HUB_ID}'": repr(str(local_path))}


# ---------------------------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------------------------
def check_links(path: Path, text: str) -> list[str]:
    """Dead relative links, images and anchors of a Markdown text (external URLs are not fetched)."""
    problems: list[str] = []
    for number, line in enumerate(prose_lines(text), start=1):
        line = INLINE_CODE_RE.sub(lambda m: " " * len(m.group(0)), line)
        targets = [m["target"] for m in LINK_RE.finditer(line)] + [m["target"] for m in IMG_TAG_RE.finditer(line)]
        for target in targets:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # http(s), mailto: never fetched
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{number}"
            if not resolved.exists():
                problems.append(f"{where}: link target {target!r} does not exist")
                continue
            if anchor:
                if resolved.is_dir() or resolved.suffix.lower() != ".md":
                    problems.append(f"{where}: anchor in {target!r} points into a file that is not Markdown")
                elif anchor not in heading_anchors(resolved.read_text(encoding="utf-8") if file_part else text):
                    problems.append(f"{where}: no heading for anchor {anchor!r} in {resolved.name}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------
def shell_commands(block: CodeBlock) -> list[tuple[int, str]]:
    """(line, command) of a block: every line of a shell block, only ``$ `` lines of any other block.

    Continuation lines (ending in a backslash) are joined; empty and comment-only lines are left out.
    """
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.code.split("\n")):
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:].strip()
        elif block.lang not in SHELL_LANGS or (not pending and (not line or line.startswith("#"))):
            continue
        if not pending:
            start = block.line + offset
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending.strip()))
    return out


@functools.lru_cache(maxsize=1)
def makefile_info() -> tuple[frozenset[str], str, dict[str, list[str]]]:
    """Targets, text and the commands that make variables such as EVAL_ARGS are appended to."""
    text = MAKEFILE.read_text(encoding="utf-8")
    targets: set[str] = set()
    for line in text.split("\n"):
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
        match = re.match(r"^([A-Za-z0-9][\w.\-]*)\s*:(?!=)", line)
        if match:
            targets.add(match.group(1))
    passes: dict[str, list[str]] = {}
    for line in text.split("\n"):
        for var in re.findall(r"\$\((\w+_ARGS)\)", line):
            if line.startswith("\t"):
                before = line.strip().split(f"$({var})")[0]
                passes[var] = ["python" if tok == "$(PY)" else tok for tok in before.split()]
    return frozenset(targets), text, passes


class _ParserCaptured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def capture_parser(main: Callable[[list[str]], object]) -> argparse.ArgumentParser | None:
    """The argparse parser ``main`` builds, caught as it starts parsing (nothing after that runs)."""
    original = argparse.ArgumentParser.parse_known_args

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _ParserCaptured(self)

    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main([])
    except _ParserCaptured as captured:
        return captured.parser
    except SystemExit:
        return None
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]
    return None


@functools.cache
def script_parser(script: str) -> argparse.ArgumentParser | None:
    """The parser of ``scripts/NAME.py`` (imported under a private name; its ``main`` is stopped at parsing)."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"_docs_checked_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    main = getattr(module, "main", None)
    return capture_parser(main) if callable(main) else None


@functools.cache
def module_parser(name: str) -> argparse.ArgumentParser | None:
    """The parser of ``python -m NAME``."""
    if name == "hf_int8.cli":
        from hf_int8 import cli

        return cli.build_parser()
    main = getattr(importlib.import_module(name), "main", None)
    return capture_parser(main) if callable(main) else None


def check_argv(parser: argparse.ArgumentParser, args: list[str], what: str) -> list[str]:
    """Options and subcommands in ``args`` that ``parser`` does not know (option values are not checked)."""
    problems: list[str] = []
    chain = [parser]
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            action = next(
                (p._option_string_actions[name] for p in reversed(chain) if name in p._option_string_actions), None
            )
            if action is None:
                problems.append(f"{what}: unknown option {name!r}")
                continue
            if "=" not in token and action.nargs != 0:
                many = action.nargs in ("+", "*", argparse.REMAINDER)
                while i < len(args) and not args[i].startswith("-"):
                    i += 1
                    if not many:
                        break
            continue
        subs = [a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            if token.startswith("<") or token == "...":
                return problems  # a placeholder such as <command>: the rest cannot be checked
            if token not in subs[0].choices:
                problems.append(f"{what}: unknown command {token!r} (known: {sorted(subs[0].choices)})")
                return problems
            chain.append(subs[0].choices[token])
    return problems


def check_pytest(args: list[str], what: str) -> list[str]:
    """Test files named on a pytest command line exist, and each name in ``-k`` occurs in them."""
    problems: list[str] = []
    files: list[Path] = []
    keyword: str | None = None
    i = 0
    while i < len(args):
        token = args[i]
        if token == "-k" and i + 1 < len(args):
            keyword = args[i + 1]
            i += 2
            continue
        if not token.startswith("-"):
            path = ROOT / token.split("::")[0]
            if not path.exists():
                problems.append(f"{what}: {token!r} does not exist")
            elif path.is_file():
                files.append(path)
        i += 1
    if keyword:
        sources = files or sorted((ROOT / "tests").glob("test_*.py"))
        text = "\n".join(p.read_text(encoding="utf-8") for p in sources)
        for word in re.findall(r"[A-Za-z_][\w\-.\[\]]*", keyword):
            if word not in ("and", "or", "not") and word not in text:
                problems.append(f"{what}: -k name {word!r} matches no test in {[p.name for p in sources]}")
    return problems


def check_command(command: str, where: str) -> list[str]:
    """Problems with one shell command line shown in the docs (an empty list when everything it names exists)."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError as err:
        return [f"{where}: cannot parse {command!r}: {err}"]
    problems: list[str] = []
    simple: list[list[str]] = [[]]
    for token in tokens:
        if token in SEPARATORS:
            simple.append([])
        else:
            simple[-1].append(token)
    for words in simple:
        while words and (words[0] in PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words = words[1:]
        if words:
            problems += check_simple_command(words, f"{where}: `{command}`")
    return problems


def check_simple_command(words: list[str], what: str) -> list[str]:
    prog, args = words[0], words[1:]
    if prog == "make":
        targets, text, passes = makefile_info()
        problems = []
        for arg in args:
            if arg.startswith("-"):
                continue
            if "=" in arg:
                var, _, value = arg.partition("=")
                if not re.search(rf"(\$\({var}\)|^{var}\s*[?:]?=|export {var}\b)", text, re.MULTILINE):
                    problems.append(f"{what}: the Makefile does not use variable {var!r}")
                elif var in passes and value.strip():
                    problems += check_simple_command(passes[var] + shlex.split(value), what)
            elif arg not in targets:
                problems.append(f"{what}: no make target {arg!r}")
        return problems
    if prog == "hf-int8":
        return check_argv(module_parser("hf_int8.cli"), args, what)
    if prog == "pytest":
        return check_pytest(args, what)
    if prog in PYTHON_EXECUTABLES:
        if args[:1] == ["-m"] and len(args) > 1:
            module, rest = args[1], args[2:]
            if module == "pytest":
                return check_pytest(rest, what)
            if importlib.util.find_spec(module) is None:
                return [f"{what}: no module {module!r}"]
            parser = module_parser(module)
            return check_argv(parser, rest, what) if parser is not None else []
        if args and args[0].endswith(".py"):
            if not (ROOT / args[0]).is_file():
                return [f"{what}: no script {args[0]!r}"]
            if args[0].startswith("scripts/") and any(a.startswith("-") for a in args[1:]):
                parser = script_parser(args[0])
                if parser is None:
                    return [f"{what}: {args[0]} has no argparse parser, so it takes no options"]
                return check_argv(parser, args[1:], what)
    return []


def commands_of(path: Path, text: str) -> list[tuple[str, str]]:
    """(where, command) for every command a Markdown text shows."""
    found = [(f"{path.name}:{line}", cmd) for block in code_blocks(text, path) for line, cmd in shell_commands(block)]
    found += [(f"{path.name}:{line}", code) for line, code in inline_code(text) if COMMAND_START_RE.match(code)]
    return found


# ---------------------------------------------------------------------------------------------------------------
# The checks on the real documentation
# ---------------------------------------------------------------------------------------------------------------
def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_docs_pages_exist_and_are_linked_from_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    pages = [p for p in DOC_FILES if p != README]
    assert pages, "docs/*.md is empty"
    for page in pages:
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
        first_paragraph = page.read_text(encoding="utf-8").split("\n\n")[1]
        assert first_paragraph.startswith("What this page is for"), f"{page.name} must start with what it is for"


def test_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").split("\n")
    count = len(lines) - (lines[-1] == "")
    assert count <= README_MAX_LINES, f"README.md has {count} lines, more than {README_MAX_LINES}"
    headings = [line[3:].strip() for line in prose_lines("\n".join(lines)) if line.startswith("## ")]
    for needed in ("Install", "Quick start", "Command line"):
        assert needed in headings[:5], f"{needed!r} is not among README's first five sections: {headings[:5]}"


# Words about how hf_int8 was developed, not about the product: user documentation gives the reason and the figure.
PROCESS_WORDS_RE = re.compile(
    r"\bissues? \d+|\bissue-\d+|\bthis VM\b|(?-i:\bNOTES\b)|\b(?:this|previous|last) stop\b|"
    r"\bsessions?\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_no_process_words(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    found = [
        f"{path.name}:{number}: {m.group(0)!r}"
        for number, line in enumerate(lines, 1)
        for m in PROCESS_WORDS_RE.finditer(line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_links_resolve(path: Path) -> None:
    problems = check_links(path, path.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_commands_exist(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    problems = [p for where, cmd in commands_of(path, text) for p in check_command(cmd, where)]
    assert not problems, "\n".join(problems)


_PAGES_WITH_PYTHON = [p for p in DOC_FILES if any(b.lang == "python" for b in code_blocks(p.read_text("utf-8"), p))]


@pytest.mark.parametrize("path", _PAGES_WITH_PYTHON, ids=_ids(_PAGES_WITH_PYTHON))
def test_python_snippets_run(
    path: Path, smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    blocks = [b for b in code_blocks(path.read_text(encoding="utf-8"), path) if b.lang == "python"]
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    # One thread: on cores shared with other jobs a two-thread decode waits for its slowest thread (~10x slower);
    # hf_int8's kernels give the same results for any thread count.
    torch.set_num_threads(1)
    try:
        skipped = run_python_blocks(blocks, hub_id_substitutions(smollm2_path))
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        for block, reason in skipped:
            print(f"\n[docs] not run: {block.path.name}:{block.line}: {reason}")
    assert len(skipped) < len(blocks), f"{path.name}: every snippet is opted out"


def test_opt_outs_are_few() -> None:
    skipped = []
    for path in DOC_FILES:
        for block in code_blocks(path.read_text(encoding="utf-8"), path):
            if block.lang == "python" and skip_reason(block) is not None:
                skipped.append(f"{path.name}:{block.line}: {skip_reason(block)}")
    print("\n".join(["snippets not run:", *skipped]))
    assert len(skipped) <= MAX_SKIPPED_SNIPPETS, f"{len(skipped)} snippets opted out:\n" + "\n".join(skipped)


# ---------------------------------------------------------------------------------------------------------------
# The checks can fail: broken snippets, dead links, commands that do not exist
# ---------------------------------------------------------------------------------------------------------------
def _doc(tmp_path: Path, text: str, name: str = "page.md") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path, text


def test_a_broken_snippet_fails(tmp_path: Path) -> None:
    text = "# Page\n\n```python\nx = 1\n```\n\ntext\n\n```python\nprint(x + undefined_name)\n```\n"
    path, text = _doc(tmp_path, text)
    with pytest.raises(SnippetError, match=r"page\.md:10: snippet raised NameError"):
        run_python_blocks(code_blocks(text, path), {})


def test_a_snippet_with_a_syntax_error_fails_even_when_opted_out(tmp_path: Path) -> None:
    path, text = _doc(tmp_path, "```python\n# not run by tests/test_docs.py: needs a GPU\nmodel.to('cuda'\n```\n")
    with pytest.raises(SnippetError, match="does not compile"):
        run_python_blocks(code_blocks(text, path), {})


def test_opt_outs_need_a_reason_and_are_reported(tmp_path: Path) -> None:
    path, text = _doc(
        tmp_path,
        "```python\n# not run by tests/test_docs.py: uploads\nraise SystemError\n```\n```python\nvalue = 2\n```\n",
    )
    skipped = run_python_blocks(code_blocks(text, path), {})
    assert [(b.line, reason) for b, reason in skipped] == [(2, "uploads")]
    path, text = _doc(tmp_path, "```python\n# not run by tests/test_docs.py:\nraise SystemError\n```\n")
    with pytest.raises(SnippetError, match="must give a reason"):
        run_python_blocks(code_blocks(text, path), {})


def test_the_hub_id_is_replaced_by_the_local_folder(tmp_path: Path) -> None:
    local = tmp_path / "local model"
    path, text = _doc(tmp_path, f'```python\nassert "{HUB_ID}" == {str(local)!r}\n```\n')
    run_python_blocks(code_blocks(text, path), hub_id_substitutions(local))
    with pytest.raises(SnippetError, match="AssertionError"):
        run_python_blocks(code_blocks(text, path), {})


def test_dead_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A `code` heading, with punctuation!\n\n## Twice\n\n## Twice\n")
    (tmp_path / "chart.png").write_bytes(b"\x89PNG")
    good = (
        "[ok](other.md) [ok](other.md#a-code-heading-with-punctuation) [ok](other.md#twice-1) ![ok](chart.png)\n"
        "[self](#page) [web](https://example.invalid/x) `[not a link](missing.md)`\n\n# Page\n"
    )
    path, text = _doc(tmp_path, good)
    assert check_links(path, text) == []
    bad = (
        "# Page\n[dead](missing.md)\n![dead image](missing.png)\n[dead anchor](other.md#nowhere)\n"
        '<img src="gone.png">\n[bad self](#not-here)\n'
    )
    path, text = _doc(tmp_path, bad)
    problems = check_links(path, text)
    assert len(problems) == 5, problems
    assert any("missing.md" in p for p in problems) and any("'nowhere'" in p for p in problems)
    assert any("gone.png" in p for p in problems) and any("'not-here'" in p for p in problems)


def test_commands_that_do_not_exist_are_found() -> None:
    good = [
        'make test PYTEST_ARGS="-k kernels"',
        "make demo MODEL=/path/to/model",
        "python scripts/bench_linear.py --quick --json out.json",
        "hf-int8 --quiet quantize src out --threshold 6.0 --skip down_proj o_proj --overwrite",
        "python scripts/assets.py prepare --qwen",
        "pytest -s tests/test_training.py -k costs_the_same",
    ]
    for command in good:
        assert check_command(command, "doc") == [], command
    bad = {
        "make no-such-target": "no make target",
        "make test NO_SUCH_VARIABLE=1": "does not use variable",
        'make eval EVAL_ARGS="--no-such-flag"': "unknown option '--no-such-flag'",
        "python scripts/bench_linear.py --no-such-flag": "unknown option",
        "python scripts/no_such_script.py": "no script",
        "hf-int8 frobnicate out/": "unknown command 'frobnicate'",
        "hf-int8 quantize src out --no-such-option": "unknown option",
        "python scripts/assets.py prepare --everything": "unknown option",
        "python -m hf_int8.no_such_module": "no module",
        "pytest tests/test_no_such_file.py": "does not exist",
        "pytest tests/test_training.py -k no_such_test_name": "matches no test",
    }
    for command, expected in bad.items():
        problems = check_command(command, "doc")
        assert problems and expected in problems[0], (command, problems)


def test_commands_are_found_in_blocks_and_inline_code(tmp_path: Path) -> None:
    text = (
        "Run `make test` or `make frob`, not `other thing`.\n\n```bash\n# a comment\nmake build && \\\n"
        "  make lint\n```\n\n```\n$ make demo\noutput line\n```\n"
    )
    path, text = _doc(tmp_path, text)
    commands = [cmd for _, cmd in commands_of(path, text)]
    assert commands == ["make build && make lint", "make demo", "make test", "make frob"]
    problems = [p for where, cmd in commands_of(path, text) for p in check_command(cmd, where)]
    assert problems == ["page.md:1: `make frob`: no make target 'frob'"]


def test_process_words_are_found() -> None:
    for text in ("Against issue 3's targets", "this VM's bandwidth", "see NOTES", "this stop", "a later session"):
        assert PROCESS_WORDS_RE.search(text), text
    for text in ("a known issue with disk offload", "stops itself", "--text notes.txt", "README notes", "Notes:"):
        assert not PROCESS_WORDS_RE.search(text), text
