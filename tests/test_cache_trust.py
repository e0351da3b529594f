"""The kernel cache is trusted only when it is the user's alone, and checks every file it loads.

Python runs a cached .pyc and Numba unpickles its index and code files as it finds them: a cache
directory someone else can write is code execution in the user's process, and a damaged entry
used to break every later run. Assertions read the cache counters, never timings.
"""
import glob
import json
import os
import pickle
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
from numba import types

from graphc.backends import kernel_manifest
from graphc.backends.kernel_files import KernelCacheWarning, usable_cache_dir
from graphc.backends.numba_cpu import default_cache_dir
from graphc.backends.numba_cpu.cache import CacheStats, KernelCache
from graphc.backends.numba_cpu.codegen_common import Call

SIGNATURES = ((types.int64,), (types.float64,))  # two overloads: an index and two code files


def add_one(name):
    """A tiny kernel module, named per test so that no two tests share an entry."""
    source = f"from numba import njit\n\n\n@njit(cache=True)\ndef {name}(x):\n    return x + 1\n"
    return Call(source, name, ("x0",))


def load_in_fresh_cache(directory, kernel):
    """Load both overloads through a new cache object (as a new process would: nothing loaded
    yet), check that they compute, and return the counters."""
    cache = KernelCache(str(directory))
    stats = CacheStats()
    function = cache.load(kernel, SIGNATURES[0], stats)
    cache.load(kernel, SIGNATURES[1], stats)
    assert function(3) == 4 and function(2.5) == 3.5
    return stats


def only(pattern):
    (path,) = glob.glob(str(pattern))
    return path


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def swap(first, second):
    os.rename(first, first + ".swap")
    os.rename(second, first)
    os.rename(first + ".swap", second)


DAMAGE = {
    "truncated .pyc": lambda d: truncate(only(d / "__pycache__" / "*.pyc")),
    "truncated .nbi": lambda d: truncate(only(d / "__pycache__" / "*.nbi")),
    "swapped .nbc": lambda d: swap(*sorted(glob.glob(str(d / "__pycache__" / "*.nbc")))),
    ".py edited in place": lambda d: open(only(d / "k_*.py"), "a").write("# edited\n"),
    # files that are not regular files: reading a FIFO would wait for a writer for ever
    ".py replaced by a folder": lambda d: replace_by(only(d / "k_*.py"), os.mkdir),
    ".py replaced by a FIFO": lambda d: replace_by(only(d / "k_*.py"), os.mkfifo),
    ".pyc replaced by a FIFO": lambda d: replace_by(only(d / "__pycache__" / "*.pyc"), os.mkfifo),
    "manifest replaced by a folder": lambda d: replace_by(only(d / "k_*.manifest*"), os.mkdir),
    "manifest replaced by a FIFO": lambda d: replace_by(only(d / "k_*.manifest*"), os.mkfifo),
    ".nbi replaced by a FIFO": lambda d: replace_by(only(d / "__pycache__" / "*.nbi"), os.mkfifo),
    ".nbc replaced by a folder": lambda d: replace_by(
        sorted(glob.glob(str(d / "__pycache__" / "*.nbc")))[0], os.mkdir),
}


def replace_by(path, make):
    os.remove(path)
    make(path)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_detected_rebuilt_and_counted(damage, tmp_path):
    kernel = add_one("graphc_test_" + "".join(c if c.isalnum() else "_" for c in damage))
    assert load_in_fresh_cache(tmp_path, kernel).misses == 2
    DAMAGE[damage](tmp_path)
    with pytest.warns(KernelCacheWarning, match="damaged"):
        stats = load_in_fresh_cache(tmp_path, kernel)
    assert stats.rebuilt == 1 and stats.compiled == 2 - stats.hits
    again = load_in_fresh_cache(tmp_path, kernel)  # repaired for good
    assert again.hits == 2 and again.rebuilt == again.misses == 0


def test_an_entry_another_process_is_writing_is_rewritten_not_torn_down(tmp_path):
    """Two MPI ranks sharing a cache: one finds the other's entry before its manifest is written
    (it looks damaged) while the other's bytecode temporary is still in the folder. It rewrites
    the entry in place and leaves the temporary alone: deleting it made the writer's rename (or
    its own os.remove) fail with FileNotFoundError, which killed a rank."""
    kernel = add_one("graphc_test_concurrent_writer")
    load_in_fresh_cache(tmp_path, kernel)
    module = only(tmp_path / "k_*.py")
    os.remove(kernel_manifest.manifest_path(module))  # the writer has not recorded it yet
    in_flight = kernel_manifest.bytecode_path(module) + ".139725467385360"
    open(in_flight, "wb").close()
    stats = load_in_fresh_cache(tmp_path, kernel)
    assert stats.rebuilt == 1 and os.path.exists(in_flight) and os.path.exists(module)
    assert load_in_fresh_cache(tmp_path, kernel).hits == 2


def test_cache_directories_and_files_are_private_under_a_permissive_umask(tmp_path):
    cache_dir = tmp_path / "made" / "by" / "graphc"
    previous = os.umask(0o002)
    try:
        load_in_fresh_cache(cache_dir, add_one("graphc_test_umask"))
    finally:
        os.umask(previous)
    for folder in (tmp_path / "made", tmp_path / "made" / "by", cache_dir, cache_dir / "__pycache__"):
        assert os.stat(folder).st_mode & 0o777 == 0o700, folder
    files = [p for p in glob.glob(str(cache_dir / "**"), recursive=True) if os.path.isfile(p)]
    assert any(p.endswith(".nbc") for p in files) and any(p.endswith(".json") for p in files)
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o600, path


def refused_with_one_warning(requested, match):
    """usable_cache_dir refuses `requested`: a private temporary directory instead, one warning
    for any number of asks."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = [usable_cache_dir(str(requested)) for _ in range(2)]
    assert len(caught) == 1 and caught[0].category is KernelCacheWarning
    assert match in str(caught[0].message)
    assert used[0] == used[1] != str(requested)
    assert os.stat(used[0]).st_mode & 0o777 == 0o700 and os.stat(used[0]).st_uid == os.geteuid()
    return used[0]


def test_a_cache_directory_others_can_write_is_not_trusted(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    refused_with_one_warning(shared, "writable by others (mode 0775")
    bytecode_shared = tmp_path / "bytecode_shared"
    (bytecode_shared / "__pycache__").mkdir(parents=True)
    (bytecode_shared / "__pycache__").chmod(0o777)
    refused_with_one_warning(bytecode_shared, "__pycache__ is writable by others")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    refused_with_one_warning(tmp_path / "link", "is a symbolic link")


def test_an_unwritable_cache_location_falls_back_with_one_warning(tmp_path, monkeypatch):
    """Real locations no process can write: below a regular file, and a /proc directory (even
    root cannot create files there; permission bits would not stop root)."""
    (tmp_path / "a_file").write_text("")
    refused_with_one_warning(tmp_path / "a_file" / "cache", "cannot be created or written")
    refused_with_one_warning(f"/proc/{os.getpid()}", "cannot be created or written")
    # an unwritable HOME: the default cache below it cannot be made; kernels still compile
    monkeypatch.delenv("GRAPHC_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "a_file"))
    used = refused_with_one_warning(default_cache_dir(), "cannot be created or written")
    stats = load_in_fresh_cache(default_cache_dir(), add_one("graphc_test_unwritable_home"))
    assert stats.misses == 2 and glob.glob(os.path.join(used, "k_*.py"))


# Compiles a one-kernel graph, warnings shown each time they are raised; prints the directory it
# compiled into and the counters.
SCRIPT = r'''
import json, warnings
import numpy as np
warnings.simplefilter("always")
from graphc.backends.numba_cpu import get_cache
from graphc.lowering import compile_graph
from graphc.ir import Builder, TensorType

b = Builder("tiny")
x = b.add_input(TensorType((2, 3), "float32"), "x")
b.add_output("y", b.tanh(b.mul(x, b.scalar_like(1.8125, x))))
executable = compile_graph(b.graph, "numba-cpu")
arg = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
stats = executable.cache_stats
print(json.dumps({"directory": get_cache().directory, "hits": stats.hits, "misses": stats.misses,
                  "error": float(np.max(np.abs(executable(arg)[0] - np.tanh(arg * np.float32(1.8125)))))}))
'''


def compile_tiny_graph(cache_dir, tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GRAPHC_CACHE_DIR": str(cache_dir)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


class Plant:
    """Unpickling it creates the file `marker`: a stand-in for any code an attacker wants run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_directory_owned_by_another_user_is_never_loaded(tmp_path):
    foreign, marker = tmp_path / "foreign", tmp_path / "planted_code_ran"
    first, _ = compile_tiny_graph(foreign, tmp_path)
    assert first["directory"] == str(foreign) and first["misses"] == 1
    # the other user plants an index that runs code when unpickled, with a manifest to match
    with open(only(foreign / "__pycache__" / "*.nbi"), "wb") as f:
        pickle.dump(Plant(str(marker)), f)
    kernel_manifest.record(only(foreign / "k_*.py"), str(foreign / "__pycache__"))
    os.chown(foreign, 65534, 65534)  # nobody's

    result, stderr = compile_tiny_graph(foreign, tmp_path)
    assert not marker.exists()
    assert stderr.count("KernelCacheWarning: graphc: not using the kernel cache") == 1 and "owned by another user" in stderr
    assert result["directory"].startswith(os.path.join(tempfile.gettempdir(), "graphc-kernels-"))
    assert result["misses"] == 1 and result["error"] < 1e-6
    assert not os.path.exists(result["directory"])  # removed at exit

    # the same directory given back to this user is trusted, and the plant is live: the check
    # above is what kept it from running
    os.chown(foreign, os.geteuid(), os.getegid())
    compile_tiny_graph(foreign, tmp_path)
    assert marker.exists()


def test_no_usable_directory_at_all_is_an_error_that_says_what_to_set(tmp_path, monkeypatch):
    from graphc.backends import kernel_files

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(kernel_files, "_fallback_dir", None)  # as in a process that has none yet
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a_file"))  # TMPDIR unusable too
    with pytest.raises(kernel_files.CacheDirectoryError, match="Set GRAPHC_CACHE_DIR"):
        usable_cache_dir(str(tmp_path / "a_file" / "cache"))


def test_a_cache_in_a_folder_others_can_write_is_not_trusted(tmp_path):
    """Another user able to write the parent could rename the private cache away and put their
    own in its place after the check (a pickled index then ran their code): refused, as ssh
    refuses ~/.ssh below such a folder, unless the parent is sticky (as /tmp is)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused_with_one_warning(shared / "cache", "which others can write to (mode 0777, not sticky)")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert usable_cache_dir(str(sticky / "cache")) == str(sticky / "cache")


def test_numba_cache_dir_is_held_to_the_same_rules(tmp_path, monkeypatch):
    """With NUMBA_CACHE_DIR set, Numba keeps the kernels' pickled code in a folder of it whose
    name anyone can work out: that folder must be private too (another user who made it first
    had their pickle loaded), and is made private when missing."""
    import numba
    from graphc.backends.kernel_files import numba_cache_folder
    shared = tmp_path / "numba_cache"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(shared))
    taken = tmp_path / "taken"
    planted = numba_cache_folder(str(taken))
    os.makedirs(planted)
    os.chmod(planted, 0o777)
    refused_with_one_warning(taken, "writable by others")
    fresh = tmp_path / "fresh"
    assert usable_cache_dir(str(fresh)) == str(fresh)
    assert os.stat(numba_cache_folder(str(fresh))).st_mode & 0o777 == 0o700


def test_a_manifest_nested_past_pythons_stack_is_rebuilt(tmp_path):
    kernel = add_one("graphc_test_deep_manifest")
    load_in_fresh_cache(tmp_path, kernel)
    with open(only(tmp_path / "k_*.manifest*"), "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    with pytest.warns(KernelCacheWarning, match="damaged"):
        stats = load_in_fresh_cache(tmp_path, kernel)
    assert stats.rebuilt == 1


def test_a_cache_folder_removed_while_running_is_made_again(tmp_path):
    import shutil
    cache = KernelCache(str(tmp_path / "cache"))
    assert cache.load(add_one("graphc_test_removed_a"), SIGNATURES[0], CacheStats())(1) == 2
    shutil.rmtree(tmp_path / "cache")
    assert cache.load(add_one("graphc_test_removed_b"), SIGNATURES[0], CacheStats())(1) == 2
    assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o700


@pytest.mark.parametrize("text, message", [("two", "is not an integer"), ("-3", "must be >= 0")])
def test_compile_workers_setting_is_checked_and_bounded(text, message, monkeypatch):
    from graphc.backends.numba_cpu import compile_pool
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", text)
    with pytest.raises(ValueError, match=f"GRAPHC_COMPILE_WORKERS='{text}' {message}"):
        compile_pool._worker_count()
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "100000")
    assert compile_pool._worker_count() <= 4 * (os.cpu_count() or 1)


def test_a_cache_that_cannot_be_written_warns_and_still_computes(tmp_path, monkeypatch):
    """A full disk (or a path past PATH_MAX) made Numba's save of the compiled code raise out
    of every compile; saving is an optimisation, so it warns and the kernel runs."""
    from numba.core import caching

    def full_disk(self, sig, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(caching.Cache, "_save_overload", full_disk)
    with pytest.warns(KernelCacheWarning, match="could not save a compiled kernel .*No space left"):
        stats = load_in_fresh_cache(tmp_path, add_one("graphc_test_full_disk"))
    assert stats.compiled == 2
