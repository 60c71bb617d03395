"""
The nano FlowTok course kit: blank a function of flowtok.py, the tests grade it, and they provably bite.
course/ is a folder of its own: teaching material around the model, which nothing else imports.

    python course/kit.py list                                 # the assignments, in the order to set them
    python course/kit.py student OUT_DIR [--assignments a,b]  # a student copy of the repository
    python course/kit.py check [--assignments a,b]            # the kill matrix (about a second)
    python -m pytest -m path                                  # grade one assignment (in either copy)

The student copy is generated from the solution, never kept by hand: the chosen functions' bodies,
found with Python's ast, become one `raise NotImplementedError(...)` under their docstring (formula
and shapes: the spec); every other byte of the repository is copied as it is. The check proves the
grading tests bite: the solution passes them all, the student copy fails each with its
NotImplementedError, and every wrong answer in mutants.py fails a test of its assignment whose
message names the mistake.

The milestone, once every assignment passes: the student trains the flow on the instructor's tokenizer.
    instructor, in the solution:   python train.py --stage=tokenizer     (writes out/ckpt.pt)
    student, in the copy:          mkdir out && cp SOLUTION/out/ckpt.pt out/ && python train.py --stage=flow --resume
"""

import argparse
import ast
import inspect
import os
import shutil
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from functools import reduce

COURSE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(COURSE)
sys.path[:0] = [p for p in (ROOT, COURSE) if p not in sys.path]  # flowtok and the tests, however we are run

# The one list of blanks: assignment -> (what it teaches, the functions of flowtok.py it blanks), in the
# order to set them. Each builds on those before: the path is what guidance steers, the text side
# makes the path's start, the network predicts its velocity. Grading tests: @pytest.mark.<assignment>.
ASSIGNMENTS = {
    "path": ("flow matching's straight path, its velocity, logit-normal t, the Euler sampler",
             ("interpolate", "target_velocity", "sample_t", "euler")),
    "guidance": ("classifier-free guidance through FlowTok's indicator: the training roll, the sampling mix",
                 ("null_roll", "guided")),
    "text": ("the text latent: the reparameterised sample, FlowTok's KL, symmetric InfoNCE alignment",
             ("gaussian_sample", "text_kl", "clip_loss")),
    "network": ("the flow transformer: time embedding, adaLN, multi-head attention, adaLN-Zero, patches",
                ("timestep_embedding", "modulate", "Attention.forward", "DiTBlock.forward", "ImageTokenizer.patchify")),
}
INSTRUCTOR_ONLY = ("course/mutants.py", "course/test_kit.py")  # near-solutions, and the test that needs them


class KitError(Exception):
    pass


def blanks(assignments=ASSIGNMENTS):
    """[(assignment, n, function name)], numbered from 1 within each assignment."""
    return [(a, n, name) for a in assignments for n, name in enumerate(ASSIGNMENTS[a][1], 1)]


def todo(assignment, n, name):
    return f"{assignment}.{n} {name}: see the docstring; python -m pytest -m {assignment}"


def resolve(module, name):
    """'Attention.forward' -> (module.Attention, 'forward'): where to read or patch a function."""
    *owner, attr = name.split(".")
    return reduce(getattr, owner, module), attr

# -----------------------------------------------------------------------------
# the student copy


def functions(tree):
    """{name: FunctionDef} of a module's functions and its classes' methods ('Class.method')."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return found


def blank_source(src, chosen):
    """flowtok.py's source with the chosen bodies, after their docstrings, replaced by a raise. The text
    is cut at the AST's line numbers, so everything else (comments included) stays byte for byte."""
    lines, funcs = src.splitlines(keepends=True), functions(ast.parse(src))
    for _, _, name in chosen:
        if name not in funcs or ast.get_docstring(funcs[name]) is None:
            raise KitError(f"flowtok.py has no {name} with a docstring (its spec): update ASSIGNMENTS in course/kit.py")
    for assignment, n, name in sorted(chosen, key=lambda b: -funcs[b[2]].lineno):  # bottom up: lines above stay put
        f = funcs[name]
        doc = f.body[0]
        lines[doc.end_lineno:f.body[-1].end_lineno] = \
            [" " * doc.col_offset + f'raise NotImplementedError("{todo(assignment, n, name)}")\n']
    return "".join(lines)


def stripped(src, names):
    """The module's AST, dumped, with the named functions cut down to their docstrings."""
    tree = ast.parse(src)
    for f in map(functions(tree).get, names):
        f.body = f.body[:1]
    return ast.dump(tree)


def load(src, name):
    """A module made from source text (the student's flowtok.py, without writing it anywhere)."""
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(src, f"<{name}>", "exec"), module.__dict__)
    return module


def student_module(chosen):
    """The student's flowtok as a module, after the generator checked itself: the copy differs from the
    solution only inside the blanked bodies, and every blanked function raises its NotImplementedError."""
    solution = open(os.path.join(ROOT, "flowtok.py")).read()
    src = blank_source(solution, chosen)
    names = [name for _, _, name in chosen]
    if stripped(src, names) != stripped(solution, names):
        raise KitError("the student copy differs from flowtok.py outside the blanked bodies")
    module = load(src, "flowtok_student")
    for assignment, n, name in chosen:
        fn = getattr(*resolve(module, name))
        required = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
        try:  # the raise is the first statement: any arguments reach it
            fn(*[None] * len(required))
        except NotImplementedError as e:
            if str(e) == todo(assignment, n, name):
                continue
        raise KitError(f"{name} in the student copy does not raise its NotImplementedError")
    return src, module


def repo_files():
    """The files git knows (tracked, or new and not ignored), as they are in the working tree."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise KitError(f"{ROOT} is not a git checkout: the student copy takes the files git knows") from None
    return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))
            and not os.path.islink(os.path.join(ROOT, f))]  # a linked .venv is not the repository's


def write_student_copy(out_dir, chosen):
    out = os.path.abspath(out_dir)
    if os.path.commonpath([out, ROOT]) == ROOT:
        raise KitError(f"{out_dir} is inside the repository (its tests would be collected too): choose a folder outside")
    if os.path.exists(out) and os.listdir(out):
        raise KitError(f"{out_dir} exists and is not empty: choose a new folder")
    src, _ = student_module(chosen)
    files = [f for f in repo_files() if f not in INSTRUCTOR_ONLY]
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(out, f)), exist_ok=True)
        if f == "flowtok.py":
            with open(os.path.join(out, f), "w") as fh:
                fh.write(src)
        else:
            shutil.copy2(os.path.join(ROOT, f), os.path.join(out, f))
    print(f"student copy in {out_dir}: {len(files)} files, {len(chosen)} functions to write:")
    for assignment, n, name in chosen:
        print(f"  {assignment}.{n} {name}")
    print(f"grade each assignment there with: python -m pytest -m {' / -m '.join(dict.fromkeys(a for a, _, _ in chosen))}")

# -----------------------------------------------------------------------------
# the kill matrix


def graded_tests():
    """{assignment: [(test name, function)]} from test_grading.py, by their markers."""
    import test_grading
    tests = {a: [] for a in ASSIGNMENTS}
    for name, fn in vars(test_grading).items():
        for mark in getattr(fn, "pytestmark", []) if name.startswith("test_") else []:
            if mark.name in tests:
                tests[mark.name].append((name, fn))
    return tests


def run(tests):
    """Run test functions in this process, once per dtype: [(test id, exception or None)]."""
    import test_grading
    results = []
    for name, fn in tests:
        for dtype in test_grading.DTYPES:
            try:
                with test_grading.default_dtype(dtype):
                    fn(dtype)
                error = None
            except Exception as e:  # a failed assertion, or a crash of the code under test
                error = e
            results.append((f"{name}[{str(dtype).removeprefix('torch.')}]", error))
    return results


@contextmanager
def patched(module, functions):
    """flowtok with some functions replaced ({name: function}), restored afterwards."""
    saved = {name: getattr(*resolve(module, name)) for name in functions}
    try:
        for name, fn in functions.items():
            setattr(*resolve(module, name), fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(*resolve(module, name), fn)


def first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def verdict(label, must_name, results):
    """How a wrong answer fared: (killed, the test and message that show it)."""
    fails = [(test, e) for test, e in results if isinstance(e, AssertionError)]
    named = [(test, e) for test, e in fails if label.lower() in str(e).lower()] if must_name else fails
    if named:
        return True, f"{named[0][0]}: {first_line(named[0][1])}"
    if fails:
        return False, f"NOT NAMED: no failure message says {label!r}; {fails[0][0]}: {first_line(fails[0][1])}"
    crash = next((f"{test}: {first_line(e)}" for test, e in results if e), "")
    return False, f"SURVIVES{': crashes only, ' + crash if crash else ''}"


def check(assignments=tuple(ASSIGNMENTS)):
    """Print the kill matrix of the chosen assignments; return the number of problems (0: all is proven)."""
    import flowtok
    try:
        import mutants
    except ImportError:  # a student copy
        raise KitError("the wrong answers (course/mutants.py) are instructor-only: check in the solution repository")
    tests = graded_tests()
    _, student = student_module(blanks())
    problems, killed, total, t_all = 0, 0, 0, time.perf_counter()
    for a in assignments:
        t0, names = time.perf_counter(), ASSIGNMENTS[a][1]
        ok = sum(e is None for _, e in run(tests[a]))
        with patched(flowtok, {n: getattr(*resolve(student, n)) for _, _, n in blanks()}):  # all blanked
            todos = sum(isinstance(e, NotImplementedError) and str(e).startswith(a + ".") for _, e in run(tests[a]))
        n = 2 * len(tests[a])
        problems += (ok < n) + (todos < n) + (n == 0)
        print(f"{a}: solution passes {ok}/{n}, student copy fails {todos}/{n} with its NotImplementedError")
        for name in names:
            wrong = mutants.WRONG.get(name, [])
            if sum(must_name for _, _, must_name in wrong) < 3:
                problems += 1
                print(f"  {name}: PROBLEM: fewer than 3 plausible wrong answers in mutants.py")
            for label, fn, must_name in wrong:
                with patched(flowtok, {name: fn}):
                    dead, why = verdict(label, must_name, run(tests[a]))
                killed, total, problems = killed + dead, total + 1, problems + (not dead)
                print(f"  {name:23} {label[:44]:44} {why[:150]}")
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    print(f"kill matrix: {killed}/{total} wrong answers killed, {problems} problems ({time.perf_counter() - t_all:.1f} s)")
    return problems

# -----------------------------------------------------------------------------
# the command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the other command lines' errors
        sys.exit(f"error: {message} (python course/kit.py -h)")


def assignment_list(text):
    chosen = [a.strip() for a in text.split(",") if a.strip()]
    for a in chosen:
        if a not in ASSIGNMENTS:
            raise argparse.ArgumentTypeError(f"unknown assignment {a!r}: choose from {', '.join(ASSIGNMENTS)}")
    return tuple(dict.fromkeys(chosen)) or tuple(ASSIGNMENTS)


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the assignments and the functions each blanks")
    student = commands.add_parser("student", help="write a student copy of the repository")
    student.add_argument("out_dir", help="a new folder outside the repository")
    check_ = commands.add_parser("check", help="print the kill matrix; exit 1 unless every claim holds")
    for p in (student, check_):
        p.add_argument("--assignments", type=assignment_list, default=tuple(ASSIGNMENTS),
                       help=f"comma-separated, from {', '.join(ASSIGNMENTS)} (default all)")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for a, n, name in blanks():
                print(f"{f'{a}.{n}':11} {name:24} {ASSIGNMENTS[a][0] if n == 1 else ''}".rstrip())
        elif args.command == "student":
            write_student_copy(args.out_dir, blanks(args.assignments))
        elif check(args.assignments):
            sys.exit(1)
    except KitError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
