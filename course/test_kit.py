"""The course kit's own tests, run with the rest of the suite: the kill matrix holds on every commit,
and a student copy grades only its blanks. Instructor only: the student copy leaves this file out."""

import os
import subprocess
import sys

import pytest

import kit
import mutants


def test_every_wrong_answer_is_killed_the_solution_passes_the_student_copy_fails(capsys):
    problems = kit.check()
    out = capsys.readouterr().out
    assert problems == 0, out
    total = sum(len(wrong) for wrong in mutants.WRONG.values())
    assert f"kill matrix: {total}/{total} wrong answers killed" in out and total >= 40
    assert set(mutants.WRONG) == {name for _, _, name in kit.blanks()}  # a wrong answer for every blank, no stray ones


def test_student_copy_grades_only_its_blanks(tmp_path, capsys):
    out = tmp_path / "student"
    kit.main(["student", str(out), "--assignments", "path"])
    assert "4 functions to write" in capsys.readouterr().out
    assert (out / "course" / "test_grading.py").exists() and (out / "train.py").exists()
    assert not (out / "course" / "mutants.py").exists() and not (out / "course" / "test_kit.py").exists()
    src = (out / "flowtok.py").read_text()
    assert 'raise NotImplementedError("path.4 euler: see the docstring; python -m pytest -m path")' in src
    assert "def null_roll" in src and src.count("NotImplementedError") == 4  # the other assignments keep their bodies
    # graded there as a student would: the path tests fail with their message, the others pass
    n = {a: 2 * len(tests) for a, tests in kit.graded_tests().items()}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "course/test_grading.py"],
                       cwd=out, capture_output=True, text=True, timeout=300)
    assert f"{n['path']} failed, {sum(n.values()) - n['path']} passed" in r.stdout, r.stdout[-3000:]
    assert "NotImplementedError: path.1 interpolate: see the docstring; python -m pytest -m path" in r.stdout


@pytest.mark.parametrize("argv, says", [
    (["check", "--assignments", "path,paths"], "unknown assignment 'paths': choose from path, guidance, text, network"),
    (["student"], "the following arguments are required: out_dir"),
    (["student", os.path.join(kit.ROOT, "copy")], "is inside the repository"),
    (["student", kit.COURSE], "is inside the repository"),
    (["grade"], "invalid choice: 'grade'"),
])
def test_bad_arguments_are_one_line_errors(argv, says):
    with pytest.raises(SystemExit) as e:
        kit.main(argv)
    assert str(e.value.code).startswith("error: ") and says in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_used_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        kit.main(["student", str(tmp_path)])
    assert str(e.value.code) == f"error: {tmp_path} exists and is not empty: choose a new folder"
