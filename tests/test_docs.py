"""The documentation stands alone: every link, cited file, function and command flag in README.md and docs/*.md
exists in this repository, nothing in the repository points to a document that is not in it, and the README
stays a one-page product page."""

import ast
import functools
import glob
import os
import re

import pytest

from tests.conftest import ROOT

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# Files of other repositories that the pages cite by name, each next to the repository it belongs to.
EXTERNAL_FILES = {"drift_loss.py", "dbp_loss.py", "policies.py", "ppo_adapter.py"}
CHECKED_EXTENSIONS = (".py", ".sh", ".md", ".csv", ".png", ".toml", ".ini", ".txt")
SKIPPED_DIRS = {".git", "runs", "__pycache__", ".pytest_cache", "node_modules"}


@functools.lru_cache(maxsize=None)
def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def split_fences(text):
    """(prose, [fenced code blocks]): the prose with every ``` block removed."""
    prose, blocks, block, inside = [], [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if inside:
                blocks.append("\n".join(block))
                block = []
            inside = not inside
            continue
        (block if inside else prose).append(line)
    return "\n".join(prose), blocks


def code_spans(prose):
    return re.findall(r"`([^`\n]+)`", prose)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(rel):
    seen, out = {}, set()
    for line in split_fences(read(rel))[0].splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def links(rel):
    """Relative link targets of a page: markdown links and images, and HTML src / href, outside code."""
    prose = re.sub(r"`[^`\n]+`", "", split_fences(read(rel))[0])
    targets = re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r"(?:src|href)=\"([^\"]+)\"", prose)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]  # http(s):, mailto: are not repository files


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_and_anchor_exists(doc):
    missing = []
    for target in links(doc):
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(ROOT, file)):
            missing.append(f"{target} (no file {file})")
        elif anchor and file.endswith(".md") and anchor not in anchors(file):
            missing.append(f"{target} (no heading with anchor #{anchor} in {file})")
    assert not missing, f"{doc}: broken links: {missing}"


def repository_names():
    names = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".venv")]
        names.update(filenames)
    return names


def cited_paths(doc):
    """Backticked tokens that name a file or folder of this repository (`benchmarks/x.py`, `docs/`, `common.py`)."""
    top = {n for n in os.listdir(ROOT) if n not in SKIPPED_DIRS and not n.startswith(".venv")}
    for span in code_spans(split_fences(read(doc))[0]):
        for token in span.split():
            token = token.strip("()[],;:'\"")
            if any(c in token for c in "<>{}$~=") or token.startswith(("-", "/", "http")):
                continue
            if "/" in token:
                if token.split("/")[0] in top:
                    yield token
            elif token.endswith(CHECKED_EXTENSIONS) and re.fullmatch(r"[\w.-]+", token):
                yield token


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_repository_file_exists(doc):
    names, missing = repository_names(), []
    for token in cited_paths(doc):
        if "/" in token:
            if not glob.glob(os.path.join(ROOT, token)):
                missing.append(token)
        elif token not in names and token not in EXTERNAL_FILES:
            missing.append(token)
    assert not missing, f"{doc} cites files that are not in the repository: {sorted(set(missing))}"


@functools.lru_cache(maxsize=None)
def defined_names(rel):
    """Top-level functions and classes of a Python file, and Class.method for their methods."""
    names = set()
    for node in ast.parse(read(rel)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef))
    return names


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_function_exists_in_its_file(doc):
    """`dbp_bc.py: drift_loss` names a function (or class) that that file defines."""
    missing = []
    for span in code_spans(split_fences(read(doc))[0]):
        m = re.fullmatch(r"((?:[\w-]+/)*[\w-]+\.py): ([\w.]+)", span.strip())
        if m:
            file, name = m.groups()
            if not os.path.exists(os.path.join(ROOT, file)) or name not in defined_names(file):
                missing.append(span)
    assert not missing, f"{doc} cites functions that do not exist: {missing}"


@functools.lru_cache(maxsize=None)
def cli_flags(rel):
    """Every flag the script accepts: dataclass fields (tyro: --field-name and --no-field-name), argparse options,
    and the parameters of functions handed to tyro as subcommands."""
    tree, flags = ast.parse(read(rel)), {"--help", "-h"}

    def add(name):
        flags.update({"--" + name.replace("_", "-"), "--no-" + name.replace("_", "-")})

    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    add(stmt.target.id)
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("add_argument"):
            flags.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-"))
        elif isinstance(node, ast.Dict):
            for value in node.values:
                if isinstance(value, ast.Name) and value.id in functions:
                    fn = functions[value.id]
                    for arg in fn.args.args + fn.args.kwonlyargs:
                        add(arg.arg)
    return flags


def commands(doc):
    """(script, [flags]) for every `python <script>.py ...` command of a page, in code spans and code blocks."""
    prose, blocks = split_fences(read(doc))
    lines = code_spans(prose)
    for block in blocks:
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    for line in lines:
        line = line.split(" #")[0]
        for m in re.finditer(r"\bpython\s+((?:[\w-]+/)*[\w-]+\.py)((?:\s+(?!&&|\||;)[^\s|;&]+)*)", line):
            script, rest = m.group(1), m.group(2)
            flags = [t.strip("[]").split("=")[0] for t in rest.split() if t.strip("[]").startswith("--")]
            yield script, flags


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_names_a_script_and_flags_that_exist(doc):
    problems = []
    for script, flags in commands(doc):
        if not os.path.exists(os.path.join(ROOT, script)):
            problems.append(f"python {script}: no such script")
            continue
        unknown = [f for f in flags if f not in cli_flags(script)]
        if unknown:
            problems.append(f"python {script}: unknown flags {unknown}")
    assert not problems, f"{doc}: {sorted(set(problems))}"


@functools.lru_cache(maxsize=None)
def module_names(rel):
    """Every top-level name of a Python file: functions, classes, assignments and imports."""
    names = set()
    for node in ast.parse(read(rel)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def snippet_problems(snippet):
    """What a `python -c` snippet uses of the repository's modules without importing it, or that does not exist."""
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    imported = {name.strip().split(" as ")[0] for m in re.finditer(r"\bimport ([\w, ]+)", snippet)
                for name in m.group(1).split(",")}
    problems = []
    for module, attr in re.findall(r"(?<![\w.])(\w+)\.(\w+)", snippet):
        if module in modules and module not in imported:
            problems.append(f"{module}.{attr}: {module} is not imported")
        elif module in modules and attr not in module_names(module + ".py"):
            problems.append(f"{module}.{attr}: {module}.py has no {attr}")
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_c_snippet_imports_and_names_what_exists(doc):
    """`python -c "import common; common.load_policy(...)"`: each repository module it uses is imported, and has
    the name used (a helper that moved to another module breaks these snippets silently otherwise)."""
    problems = [p for m in re.finditer(r'python -c "(.*?)"', read(doc), re.S) for p in snippet_problems(m.group(1))]
    assert not problems, f"{doc}: {problems}"


def repository_text_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".venv")]
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
            if name.endswith((".py", ".sh", ".md", ".toml", ".ini", ".txt", ".cfg", ".yaml", ".yml")) or \
                    rel.startswith(".ci" + os.sep):
                yield rel


# The planning documents of the project's authors are not in the repository; nothing may point to them.
OUTSIDE_DOCUMENTS = [name + ".md" for name in ("METHOD", "BENCHMARKS", "STYLE")]
ISSUE_REFERENCE = re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE)


def test_no_file_cites_documents_or_issues_outside_the_repository():
    found = []
    for rel in repository_text_files():
        for i, line in enumerate(read(rel).splitlines(), 1):
            if any(doc in line for doc in OUTSIDE_DOCUMENTS) or ISSUE_REFERENCE.search(line):
                found.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert not found, "references to documents that are not in the repository:\n" + "\n".join(found)


def test_readme_is_a_one_page_product_page():
    lines = read("README.md").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the details belong in docs/"
    text = "\n".join(lines)
    for command in ("pip install -r requirements.txt", "python -m pytest tests -q"):
        assert command in text, f"the README's set-up lost `{command}`"
    for script in ("dbp_bc.py", "dbpo_online.py", "dfp_offline_to_online.py", "baselines/diffusion_bc.py",
                   "baselines/qc_fql.py"):
        assert f"python {script} --env-id lift --preset cpu" in text, f"no CPU command for {script} in the README"


def test_the_checks_catch_what_they_are_meant_to_catch(tmp_path):
    """The helpers above find a broken link, a missing file, an unknown flag and an outside reference."""
    assert slug("Lift: the CPU preset (15k offline + 10k online steps)") == "lift-the-cpu-preset-15k-offline--10k-online-steps"
    assert slug("2. The batched estimator: `dbp_bc.py: drift_loss`") == "2-the-batched-estimator-dbp_bcpy-drift_loss"
    assert "--total-steps" in cli_flags("dbp_bc.py") and "--no-cuda" in cli_flags("dbp_bc.py")
    assert "--no-such-flag" not in cli_flags("dbp_bc.py")
    assert "--num-demos" in cli_flags("make_datasets.py") and "--blend" in cli_flags("scripted_experts.py")
    assert ISSUE_REFERENCE.search("as in iss" + "ue 12") and not ISSUE_REFERENCE.search("the issue tracker")
    assert snippet_problems("import common; common.evaluate(environments.evaluate)") == [
        "common.evaluate: common.py has no evaluate", "environments.evaluate: environments is not imported"]
    assert not snippet_problems("import sys, common, environments; common.load_policy(sys.argv[1]).act")
    assert "drift_loss" in defined_names("dbp_bc.py") and "ReplayBuffer.sample" in defined_names("dfp_offline_to_online.py")
    prose, blocks = split_fences("a `x.py` b\n```bash\n# not a heading\npython dbp_bc.py --seed 1\n```\n")
    assert "not a heading" not in prose and "python dbp_bc.py" in blocks[0] and code_spans(prose) == ["x.py"]
