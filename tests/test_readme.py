"""The README is code: every flag it shows exists in that script's --help, every file it links
exists, and the cheap commands run as written."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = open(os.path.join(ROOT, "README.md")).read()


def _commands():
    """`python X.py ...` command lines from the README's code blocks and inline code."""
    text = README.replace("\\\n", " ")  # join continued lines
    return [c.strip() for c in re.findall(r"python ((?:train|eval|cache|report)\.py[^\n`&|#]*)", text)]


def _help(script, *sub):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *sub, "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_readme_flag_is_in_help():
    cmds = _commands()
    assert any(c.startswith("train.py") for c in cmds) and any(c.startswith("eval.py") for c in cmds)
    helps = {}
    for cmd in cmds:
        words = cmd.split()
        script, sub = words[0], [w for w in words[1:2] if w in ("estimate", "inspect")]
        key = (script, *sub)
        if key not in helps:
            helps[key] = _help(script, *sub)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd):
            assert flag in helps[key], f"README flag {flag} of `{cmd}` is not in {script} --help"


def test_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), f"dead link {target}"
    for path in re.findall(r"`((?:tests|bench|docs)/[\w./]+)`", README):
        assert os.path.exists(os.path.join(ROOT, path)), f"README names missing file {path}"
    for ref in re.findall(r"`(\w+)\.py:(\w+)`", README):  # file.py:function references of the tour
        src = open(os.path.join(ROOT, f"{ref[0]}.py")).read()
        assert re.search(rf"^(def|class) {ref[1]}\b", src, re.M), f"{ref[0]}.py has no {ref[1]}"


def test_cache_estimate_command_runs_as_written():
    cmd = [c for c in _commands() if c.startswith("cache.py estimate")][0].split()
    out = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "19.2" in out.stdout and "3.84" in out.stdout


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = [l for l in README.splitlines() if l.endswith("python -m pytest -q tests")][0]
    assert test_cmd.strip() in ci


def test_study_scripts_name_real_flags_and_matrices():
    import config
    import study as study_mod
    study = open(os.path.join(ROOT, "docs", "study.sh")).read()
    flags = re.search(r"FLAGS=\((.*?)\)", study, re.S).group(1).replace('"$OUT"', "out/x").split()
    for m in re.search(r"for m in ([\w ]+);", study).group(1).split():
        args = config.parse_args(flags + ["--matrix", m])  # a typo in the script fails here, not after an hour
        assert args.matrix == m and args.seeds == "0,1,2"
    make = open(os.path.join(ROOT, "docs", "make_results.sh")).read()
    for line in re.findall(r"\$\(dirs ([\w. ]+)\)", make):
        for name in line.split():
            assert name in study_mod.MATRICES or any(name == n for rows in study_mod.MATRICES.values() for n, _ in rows), name


def test_results_page_links_exist():
    page = os.path.join(ROOT, "docs", "results.md")
    text = open(page).read()
    assert "docs/results.md" in README
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, "docs", target)), f"dead link in docs/results.md: {target}"


def test_every_documented_torchrun_line_parses():
    """torchrun's own parser sees the script's flags too (it rejected the old `--l` as an ambiguous
    abbreviation of --log-dir etc.): each documented line must pass it, then train.py's parser."""
    from torch.distributed.run import get_args_parser

    import config
    docs = README + "".join(open(os.path.join(ROOT, "docs", f)).read() for f in os.listdir(os.path.join(ROOT, "docs"))
                            if f.endswith((".md", ".sh")))
    lines = [l.strip(" `") for l in docs.replace("\\\n", " ").splitlines() if l.strip(" `").startswith("torchrun ")]
    assert lines, "README documents a torchrun command"
    for line in lines:
        words = line.split()[1:]
        ns = get_args_parser().parse_args(words)  # SystemExit on an ambiguous option
        assert ns.training_script == "train.py"
        config.parse_args(ns.training_script_args)
    with pytest.raises(SystemExit):  # the old spelling fails in torchrun's parser, as reported
        get_args_parser().parse_args(["--nproc_per_node=2", "train.py", "--l", "0.2"])
