"""The ``ibp`` command: compress and restore tensor files, look inside ibp
files, and run the benchmark.

    ibp compress IN [OUT]      .npy .npz .safetensors .pt/.pth/.bin  ->  .ibp
                               a model directory  ->  its compressed twin
    ibp decompress IN [OUT]    .ibp  ->  the format that went in (or OUT's)
    ibp info FILE|DIR          what an ibp file holds and how well it packed
    ibp bench                  compression ratio and speed on real data

What a tensor file keeps besides its tensors (the safetensors metadata, an
.npy's byte order and memory order, whether an .npz was deflated, a torch
checkpoint's nesting and plain values) goes into the ibp file's metadata
under the key ``ibp.source``, so ``decompress`` writes back the tensors bit
for bit and the file the way it came.  A user's mistake ends with one line on
stderr and exit status 1, never a traceback.

An input is never overwritten (not through a hard link or a symlink either,
not even with --force); outputs are written to a temporary name next to them
and renamed into place, so a failure leaves no half-written file.  Files are
recognised by their first bytes, and safetensors files and model
directories (ibp.checkpoints) are converted one tensor at a time.
"""
import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np

import ibp
from . import checkpoints, datasets, dtypes, stream
from .errors import FormatError
from .files import keep_mode

FORMATS = {".npy": "npy", ".npz": "npz", ".safetensors": "safetensors",
           ".pt": "torch", ".pth": "torch", ".bin": "torch"}
EXTENSION = {"npy": ".npy", "npz": ".npz", "safetensors": ".safetensors", "torch": ".pt"}
SOURCE_KEY = "ibp.source"
KIND_NAMES = ("raw", "all", "sparse", "bitmap")
DEFAULT_BENCH_DIR = "ibp-bench-results"


class CliError(Exception):
    """A user's mistake, reported as one line."""


# -- tensor files -------------------------------------------------------------

def format_of(path):
    """The tensor format of a path, by its extension, or None."""
    return FORMATS.get(os.path.splitext(path)[1].lower())


CONTENT = {"ibp": "an ibp file", "npy": "an .npy array", "npz": "an .npz archive",
           "safetensors": "a safetensors file", "torch": "a torch checkpoint", "zip": "a damaged zip archive"}


def sniff(path):
    """The format of a file by its first bytes (a key of CONTENT), or None."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(ibp.container.MAGIC):
        return "ibp"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip archive (the second: of no files)
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip"
        return "torch" if any(n.endswith("data.pkl") for n in names) else "npz"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a legacy torch pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= 100 << 20:
        return "safetensors"
    return None


def _input_file(path, what="input"):
    """Check that ``path`` is a readable regular file, with a message that
    names the problem."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path}: a directory, not a file")
    if not os.path.isfile(path):
        raise CliError(f"{path}: not a regular file")


def _label(name):
    return "the tensor" if name is None else f"tensor {name!r}"


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def read_tensors(path, fmt):
    """(tensors, source): name -> array or tensor (the single name None for a
    lone tensor), and a JSON-able description of what else the file keeps."""
    readers = {"npy": _read_npy, "npz": _read_npz, "safetensors": _read_safetensors, "torch": _read_torch}
    _input_file(path)
    try:
        return readers[fmt](path)
    except CliError as e:
        raise CliError(f"{path}: {e}") from None
    except Exception as e:  # a third-party loader's view of the user's bytes
        raise CliError(f"{path}: cannot read it as {fmt}: {e}") from None


def _npy_layout(arr):
    """[dtype string, fortran order]: what np.save writes into the header."""
    return [arr.dtype.str, bool(arr.flags.fnc)]


def _read_npy(path):
    arr = np.load(path, allow_pickle=False)
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise CliError("holds several arrays (an .npz archive), not one .npy array")
    return {None: arr}, {"format": "npy", "arrays": {"": _npy_layout(arr)}}


def _read_npz(path):
    with zipfile.ZipFile(path) as z:
        deflated = any(info.compress_type != zipfile.ZIP_STORED for info in z.infolist())
    with np.load(path, allow_pickle=False) as z:
        if not hasattr(z, "files"):
            raise CliError("holds one .npy array, not an .npz archive")
        arrays = {name: z[name] for name in z.files}
    return arrays, {"format": "npz", "compressed": deflated,
                    "arrays": {name: _npy_layout(a) for name, a in arrays.items()}}


def _read_safetensors(path):
    from safetensors import safe_open
    framework = "pt" if _torch() is not None else "np"
    with safe_open(path, framework=framework) as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, {"format": "safetensors", "metadata": metadata}


def _read_torch(path):
    torch = _torch()
    if torch is None:
        raise CliError("reading a torch file needs torch (pip install torch)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {None: obj}, {"format": "torch"}
    if not isinstance(obj, Mapping):
        raise CliError(f"holds a {type(obj).__name__}; ibp compresses a tensor or a dict of tensors")
    tensors, tree = {}, []
    _flatten(obj, [], tensors, tree, torch.Tensor)
    return tensors, {"format": "torch", "tree": tree}


def _flatten(mapping, path, tensors, tree, tensor_type):
    """Collect the tensors of nested dicts under dotted names, and in ``tree``
    every entry in order ([path, "tensor"|"dict"] or [path, "value", v]) so
    the nesting and plain values come back as they were."""
    for key, value in mapping.items():
        where = ".".join(path) or "the top level"
        if not isinstance(key, str) or not key:
            raise CliError(f"key {key!r} at {where} is not a non-empty string: "
                           "ibp stores dicts of string-named tensors")
        p = path + [key]
        name = ".".join(p)
        if isinstance(value, tensor_type):
            if name in tensors:
                raise CliError(f"two tensors flatten to the name {name!r}")
            tensors[name] = value
            tree.append([p, "tensor"])
        elif isinstance(value, Mapping):
            tree.append([p, "dict"])
            _flatten(value, p, tensors, tree, tensor_type)
        elif value is None or isinstance(value, (bool, int, float, str)):
            tree.append([p, "value", value])
        else:
            raise CliError(f"{name!r} is a {type(value).__name__}: ibp keeps tensors, dicts and "
                           "plain numbers or strings")


def _checked_source(source, names):
    """``source`` (an ibp file's ``ibp.source`` record), after checking that
    the layouts and the tree it records are what ``read_tensors`` writes,
    and that the tree places every tensor of the file (``names``) once: a
    foreign or damaged record is refused, not followed into a traceback or
    a file that silently lacks tensors."""
    fmt = source.get("format")
    if fmt in ("npy", "npz"):
        arrays = source.get("arrays", {})
        if not isinstance(arrays, dict) or not all(_is_layout(v) for v in arrays.values()):
            raise FormatError(f"its {SOURCE_KEY} metadata records array layouts that are not "
                              "[numpy dtype, fortran order]")
    if fmt == "torch" and "tree" in source:
        placed = _tree_tensors(source["tree"])
        if placed is None:
            raise FormatError(f"its {SOURCE_KEY} metadata records a malformed tree: entries must be new paths "
                              "of non-empty keys under dicts made before them")
        if sorted(placed) != sorted(n for n in names if n is not None):
            raise FormatError(f"its {SOURCE_KEY} metadata records a tree that does not hold its tensors once each")
    return source


def _is_layout(value):
    """Whether ``value`` is an ``_npy_layout``: [dtype string, fortran order]."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], bool)):
        return False
    try:
        np.dtype(value[0])
    except TypeError:
        return False
    return True


def _tree_tensors(tree):
    """The dotted names of the tensors a ``_flatten`` tree places, or None
    unless each entry is [path, "tensor"|"dict"] or [path, "value", v] with
    a path of non-empty string keys, given once, under a dict given before."""
    if not isinstance(tree, list):
        return None
    seen, dicts, placed = set(), {()}, []
    for entry in tree:
        if not (isinstance(entry, list) and len(entry) in (2, 3) and isinstance(entry[0], list) and entry[0]):
            return None
        path, kind = tuple(entry[0]), entry[1]
        if not all(isinstance(k, str) and k for k in path) or path in seen or path[:-1] not in dicts \
                or kind not in ("tensor", "dict", "value") or len(entry) != 2 + (kind == "value"):
            return None
        seen.add(path)
        if kind == "dict":
            dicts.add(path)
        elif kind == "tensor":
            placed.append(".".join(path))
    return placed


def _unflatten(tree, tensors):
    root = {}
    for entry in tree:
        path, kind = entry[0], entry[1]
        parent = root
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = {} if kind == "dict" else tensors[".".join(path)] if kind == "tensor" else entry[2]
    return root


def _as_numpy(name, t, fmt):
    """``t`` as a numpy array that a .``fmt`` file holds as what it is: an
    .npy header has no name for ml_dtypes' bfloat16 and float8 (they would
    be written as raw void bytes), torch's types have no numpy type at all."""
    try:
        arr = t if isinstance(t, np.ndarray) else t.numpy()
        if fmt in ("npy", "npz") and np.lib.format.descr_to_dtype(np.lib.format.dtype_to_descr(arr.dtype)) != arr.dtype:
            raise TypeError(arr.dtype)
    except TypeError:
        raise CliError(f"{_label(name)} is {t.dtype}, which .{fmt} cannot hold: "
                       "write .safetensors or .pt instead") from None
    return arr


def _as_torch(name, t):
    """``t`` as a torch tensor; ml_dtypes' bfloat16 and float8 arrays, which
    torch cannot take from numpy, as torch's types of the same name, bit
    for bit."""
    torch = _torch()
    if not isinstance(t, np.ndarray):
        return t
    try:
        return torch.from_numpy(t)
    except TypeError:
        pass
    try:
        kind = dtypes.torch_dtype(dtypes.name_of_numpy(t.dtype))
    except TypeError:
        raise CliError(f"{_label(name)} is numpy {t.dtype}, which torch cannot hold: "
                       "write .npy or .npz instead") from None
    bits = (t if t.flags.c_contiguous else t.copy()).view(f"u{t.itemsize}")   # 0-d stays 0-d
    return torch.from_numpy(bits).view(kind)


def _restore_npy_layout(arr, layout):
    """Give an array back the byte order and memory order it was read with."""
    if layout is None:
        return arr
    descr, fortran = layout
    if np.dtype(descr) != arr.dtype and np.dtype(descr).newbyteorder("=") == arr.dtype:
        arr = arr.astype(descr)
    return np.asfortranarray(arr) if fortran else arr


def _write_npy(f, tensors, source):
    if list(tensors) != [None]:
        raise CliError(f"an .npy file holds one array, this ibp file holds {len(tensors)} named tensors: "
                       "write .npz, .safetensors or .pt")
    arr = _as_numpy(None, tensors[None], "npy")
    layouts = source.get("arrays", {}) if source.get("format") == "npy" else {}
    np.lib.format.write_array(f, _restore_npy_layout(arr, layouts.get("")), allow_pickle=False)


def _write_npz(f, tensors, source):
    same = source.get("format") == "npz"
    layouts = source.get("arrays", {}) if same else {}
    method = zipfile.ZIP_DEFLATED if same and source.get("compressed") else zipfile.ZIP_STORED
    with zipfile.ZipFile(f, "w", compression=method, allowZip64=True) as z:
        for name, t in tensors.items():
            key = "arr_0" if name is None else name
            arr = _restore_npy_layout(_as_numpy(name, t, "npz"), layouts.get(key))
            with z.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def _write_safetensors(f, tensors, source):
    if None in tensors:
        raise CliError("a .safetensors file holds named tensors and this ibp file holds one unnamed "
                       "tensor: write .npy or .pt")
    metadata = source.get("metadata") if source.get("format") == "safetensors" else None
    if _torch() is not None:
        from safetensors.torch import save
        f.write(save({k: _as_torch(k, t) for k, t in tensors.items()}, metadata=metadata))
    else:
        from safetensors.numpy import save
        f.write(save({k: _as_numpy(k, t, "safetensors") for k, t in tensors.items()}, metadata=metadata))


def _write_torch(f, tensors, source):
    torch = _torch()
    if torch is None:
        raise CliError("writing a torch file needs torch (pip install torch)")
    converted = {k: _as_torch(k, t) for k, t in tensors.items()}
    if None in converted:
        obj = converted[None]
    elif source.get("format") == "torch" and "tree" in source:
        obj = _unflatten(source["tree"], converted)
    else:
        obj = converted
    torch.save(obj, f)


WRITERS = {"npy": _write_npy, "npz": _write_npz, "safetensors": _write_safetensors, "torch": _write_torch}


# -- ibp files ----------------------------------------------------------------

def _not_ibp(path):
    """Why ``path`` is not an ibp file to read, or None if its bytes say it is."""
    _input_file(path)
    kind = sniff(path)
    if kind == "ibp":
        return None
    if kind is not None:
        return f"{path}: not an ibp file, it holds {CONTENT[kind]} (compress it instead)"
    return f"{path}: not an ibp file (it does not start with the ibp magic bytes)"


def _ibp_error(path, e):
    """The one-line cause of a FormatError from ``path``: a truncated file
    says so rather than naming the field that ran past its end."""
    size = os.path.getsize(path)
    try:
        with stream.Reader(path) as r:
            need = r.expected_size()
    except FormatError:
        need = None
    except Exception:
        need = None
    if need is not None and need > size:
        return CliError(f"{path}: truncated: {size} bytes of the {need} its header describes")
    if "runs past the end" in str(e) or "too short" in str(e):
        return CliError(f"{path}: truncated ({size} bytes): {e}")
    return CliError(f"{path}: not a valid ibp file: {e}")


def open_ibp(path):
    """A stream.Reader of an ibp file whose size matches its header."""
    problem = _not_ibp(path)
    if problem:
        raise CliError(problem)
    try:
        r = stream.Reader(path)
    except FormatError as e:
        raise _ibp_error(path, e) from None
    need = r.expected_size()
    if need != r.size:
        r.close()
        raise CliError(f"{path}: truncated: {r.size} bytes of the {need} its header describes" if need > r.size
                       else f"{path}: not a valid ibp file: {r.size - need} bytes after its last section")
    return r


def load_ibp(path):
    """(CompressedTensor or dict of them, metadata, format version)."""
    problem = _not_ibp(path)
    if problem:
        raise CliError(problem)
    try:
        obj = ibp.load(path, mmap=True)
    except FormatError as e:
        raise _ibp_error(path, e) from None
    return (obj, *ibp.container.read_header(path))


def _source_of(metadata, path):
    try:
        source = json.loads(metadata.get(SOURCE_KEY, "{}"))
    except ValueError:
        source = None
    if not isinstance(source, dict):
        raise CliError(f"{path}: its {SOURCE_KEY} metadata is not a JSON object")
    return source


def _as_mapping(obj):
    return {None: obj} if isinstance(obj, ibp.CompressedTensor) else obj


def _fmt_bytes(n):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _progress(total, desc):
    """A byte-counting tqdm bar on stderr, only on a terminal and after a
    second; a no-op without tqdm.  Returns (update(nbytes), close())."""
    try:
        from tqdm import tqdm
    except ImportError:
        return (lambda n: None), (lambda: None)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, delay=1, leave=False,
               file=sys.stderr)
    return bar.update, bar.close


def _nbytes(t):
    return int(t.nbytes) if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def _same(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_output(output, inputs, force, directory=None):
    """Refuse an output that is an input (the same path, a hard link or a
    symlink to it: even with --force), that exists without --force, or
    whose directory is missing or not writable: before any work is done.
    ``directory`` is None for a file output, else (holds, what) for a
    directory one: --force replaces an existing directory only when it is
    empty or ``holds(it)`` (an earlier output), never a folder of other files."""
    for source in inputs:
        if _same(output, source) or (os.path.isdir(source) and _inside(output, source)) or \
                (os.path.isdir(output) and _inside(source, output)):
            raise CliError(f"{output} is the input {source} (or holds it, or lies inside it): "
                           "ibp never overwrites its input, even with --force")
    if os.path.lexists(output):
        if not force:
            raise CliError(f"{output} exists: pass --force to overwrite it")
        if os.path.isdir(output) and directory is None:
            raise CliError(f"{output} is a directory: name a file to write")
        if directory is not None and not os.path.isdir(output):
            raise CliError(f"{output} is a file: name a directory to write")
        if directory is not None:
            holds, what = directory
            if os.listdir(output) and not holds(output):
                raise CliError(f"{output} is a directory that is not {what}: --force replaces only an empty "
                               "directory or an earlier output, so name a new directory")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise CliError(f"{parent}: no such directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{parent}: no permission to write there")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic(output, directory=False):
    """Yield a new temporary file or directory next to ``output``; rename it
    to ``output`` when the block succeeds, remove it when it fails.  It gets
    the permissions of the file or directory it replaces, else those a
    plain new one gets (the umask's).  The temporary name never appears in
    a message: errors name ``output``.  A symlink stays one: what it points
    to is replaced.  A device or a pipe is refused (a rename would put a
    plain file in its place)."""
    target = os.path.realpath(output) if os.path.islink(output) else output
    if os.path.exists(target) and not (os.path.isfile(target) or os.path.isdir(target)):
        raise CliError(f"{output} is not a regular file (a device, pipe or socket): name a file to write")
    parent = os.path.dirname(os.path.abspath(target))
    prefix = f".{os.path.basename(target)}."
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp") if directory else \
            tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
    except OSError as e:
        raise CliError(f"{output}: cannot write there: {e.strerror}") from None
    if not directory:
        os.close(tmp[0])
        tmp = tmp[1]
    try:
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())  # mkstemp/mkdtemp make it private
        try:
            yield tmp
            if directory and os.path.isdir(target):
                keep_mode(target, tmp)
                old = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".old")
                os.replace(target, os.path.join(old, "x"))
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if os.path.lexists(target) and os.path.isdir(target):
                    raise CliError(f"{output} is a directory: name a file to write")
                keep_mode(target, tmp)
                os.replace(tmp, target)
        except OSError as e:
            if e.filename is not None and os.path.abspath(str(e.filename)).startswith(os.path.join(parent, prefix)):
                raise CliError(f"{output}: cannot write it: {e.strerror}") from None
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


# -- models -------------------------------------------------------------------

def load_models(path, word_bits):
    """Models to reuse from PATH: an ibp file's own models, or models learned
    from a tensor file.  Returns one Model (the file holds one tensor) or a
    dict name -> Model (matched by name)."""
    if path.lower().endswith(".ibp"):
        obj = _as_mapping(load_ibp(path)[0])
        models = {name: ct.model for name, ct in obj.items()}
    else:
        fmt = format_of(path)
        if fmt is None:
            raise CliError(f"{path}: --model-from takes an .ibp file or a tensor file "
                           f"({', '.join(FORMATS)})")
        tensors, _ = read_tensors(path, fmt)
        models = {}
        for name, t in tensors.items():
            try:
                models[name] = ibp.analyze(t, word_bits=word_bits)
            except (TypeError, ValueError) as e:
                raise CliError(f"{path}: {_label(name)}: {e}") from None
    if len(models) == 1:
        return next(iter(models.values()))
    return models


def _model_for(models, name, source):
    if models is None or isinstance(models, ibp.Model):
        return models
    if name is None:
        raise CliError(f"{source} holds {len(models)} tensors: give one with a single tensor's model")
    if name not in models:
        raise CliError(f"{source} has no tensor named {name!r} to take a model from")
    return models[name]


# -- commands -----------------------------------------------------------------

def _plural(n, word):
    return f"{n} {word}{'s' * (n != 1)}"


def _input_format(path):
    """The tensor format of an input file: its extension's, checked against
    its first bytes (its bytes' alone when the extension says nothing)."""
    _input_file(path)
    by_name, by_content = format_of(path), sniff(path)
    if by_content == "ibp":
        raise CliError(f"{path}: already compressed (an ibp file): decompress it instead")
    if by_name is None and by_content is None:
        ext = os.path.splitext(path)[1] or "no extension"
        raise CliError(f"{path}: unsupported input format ({ext}); ibp compresses "
                       f"{', '.join(FORMATS)} files and model directories")
    if by_content == "zip" and by_name in ("npz", "torch"):
        by_content = by_name  # a damaged archive: its reader says what is wrong
    if by_name is not None and by_content is not None and by_name != by_content:
        raise CliError(f"{path}: holds {CONTENT[by_content]}, not what its extension "
                       f"{os.path.splitext(path)[1]} says: rename it")
    if by_name is not None and by_content is None:
        why = "an empty file" if os.path.getsize(path) == 0 else "its first bytes are not of that format"
        raise CliError(f"{path}: not {CONTENT[by_name]} ({why})")
    if by_content == "zip":
        raise CliError(f"{path}: a damaged zip archive (truncated?)")
    return by_name or by_content


def cmd_compress(args):
    if os.path.isdir(args.input):
        return _compress_dir(args)
    fmt = _input_format(args.input)
    output = args.output or args.input + ".ibp"
    _check_output(output, [args.input] + ([args.model_from] if args.model_from else []), args.force)
    models = load_models(args.model_from, args.word_bits) if args.model_from else None
    options = dict(word_bits=args.word_bits, layout=args.layout)
    with _atomic(output) as tmp:
        if fmt == "safetensors" and models is None:
            update, close = _progress(checkpoints.raw_nbytes(args.input), "compress")
            try:
                with open(tmp, "wb") as f:
                    count, raw = checkpoints.compress_safetensors(args.input, f, scratch_dir=os.path.dirname(tmp),
                                                                  progress=update, **options)
            except checkpoints.CheckpointError as e:
                raise CliError(str(e)) from None
            except (OSError, ValueError) as e:
                raise CliError(f"{args.input}: cannot read it as safetensors: {e}") from None
            finally:
                close()
        else:
            count, raw = _compress_tensors(args, fmt, tmp, models, options)
        size = os.path.getsize(tmp)
    print(f"{args.input} -> {output}: {_plural(count, 'tensor')}, "
          f"{_fmt_bytes(raw)} -> {_fmt_bytes(size)} ({raw / max(size, 1):.2f}x)")
    return 0


def _compress_tensors(args, fmt, tmp, models, options):
    """Compress a file read whole (npy, npz, torch) into the ibp file ``tmp``."""
    tensors, source = read_tensors(args.input, fmt)
    names = list(tensors)
    update, close = _progress(sum(_nbytes(t) for t in tensors.values()), "compress")
    raw = 0
    try:
        with stream.Writer(os.path.dirname(tmp)) as w:
            for name in names:
                try:
                    ct = ibp.compress(tensors[name], model=_model_for(models, name, args.model_from), **options)
                except (TypeError, ValueError) as e:
                    raise CliError(f"{args.input}: {_label(name)}: {e}") from None
                w.add(name, ct)
                raw += ct.raw_nbytes
                update(ct.raw_nbytes)
            with open(tmp, "wb") as f:
                w.finish(f, {SOURCE_KEY: json.dumps(source)})
    finally:
        close()
    return len(names), raw


def _compress_dir(args):
    if args.model_from:
        raise CliError("--model-from takes single files, not model directories")
    output = args.output or _dir_name(args.input) + "-ibp"
    _check_output(output, [args.input], args.force,
                  (_only_names(args.input, checkpoints.twin_name), "a compressed model directory of it"))
    update, close = _progress(checkpoints.raw_nbytes(args.input), "compress")
    try:
        with _atomic(output, directory=True) as tmp:
            files, count, raw = checkpoints.compress_dir(args.input, tmp, progress=update,
                                                         word_bits=args.word_bits, layout=args.layout)
            size = _dir_weight_bytes(tmp, checkpoints.IBP_SUFFIX)
    except checkpoints.CheckpointError as e:
        raise CliError(str(e)) from None
    finally:
        close()
    print(f"{args.input} -> {output}: {_plural(files, 'weight file')}, {_plural(count, 'tensor')}, "
          f"{_fmt_bytes(raw)} -> {_fmt_bytes(size)} ({raw / max(size, 1):.2f}x)")
    return 0


def _dir_name(path):
    """A directory's path to name its twin after: "." or ".." by its real name."""
    path = os.path.normpath(path)
    return os.path.abspath(path) if os.path.basename(path) in (".", "..") else path


def _only_names(source, rename):
    """Whether a directory holds nothing but names the twin of ``source``
    will hold again (``rename`` maps each of its entries): an earlier output,
    which --force may replace without losing anything else."""
    names = {rename(n) for n in os.listdir(source)}
    return lambda path: set(os.listdir(path)) <= names


def _dir_weight_bytes(path, suffix):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(suffix))


def _default_format(entries):
    frameworks = {e.get("framework") for e in entries.values()}
    if frameworks == {"numpy"}:
        return "npy" if None in entries else "npz"
    return "torch"


def cmd_decompress(args):
    if os.path.isdir(args.input):
        return _decompress_dir(args)
    with open_ibp(args.input) as reader:
        try:
            source = _checked_source(checkpoints.source_of(reader), reader.entries)
        except FormatError as e:
            raise CliError(f"{args.input}: {e}") from None
        recorded = source.get("format")
        if recorded not in EXTENSION:
            recorded = _default_format(reader.entries)
        if args.output:
            output = args.output
            fmt = format_of(output) or recorded
        else:
            stem = args.input[:-4] if args.input.lower().endswith(".ibp") else args.input
            fmt = recorded
            output = stem if format_of(stem) == fmt else stem + EXTENSION[fmt]
        _check_output(output, [args.input], args.force)
        raw = checkpoints.raw_nbytes_of(reader)
        update, close = _progress(raw, "decompress")
        try:
            with _atomic(output) as tmp:
                if fmt == "safetensors":
                    with open(tmp, "wb") as f:
                        checkpoints.decompress_to_safetensors(reader, f, progress=update)
                else:
                    tensors = {}
                    for name in reader:
                        tensors[name] = ibp.decompress(reader.tensor(name))
                        update(_nbytes(tensors[name]))
                    with open(tmp, "wb") as f:
                        WRITERS[fmt](f, tensors, source)
        except checkpoints.CheckpointError as e:
            raise CliError(f"{output}: {e}") from None
        except FormatError as e:
            raise CliError(f"{args.input}: not a valid ibp file (corrupted): {e}") from None
        except TypeError as e:  # a dtype this Python cannot represent
            raise CliError(f"{args.input}: {e}") from None
        except CliError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise CliError(f"{output}: cannot write it as {fmt}: {e}") from None
        finally:
            close()
        count = len(reader.entries)
    print(f"{args.input} -> {output} ({fmt}): {_plural(count, 'tensor')}, {_fmt_bytes(raw)}")
    return 0


def _decompress_dir(args):
    if not checkpoints.is_compressed_dir(args.input):
        raise CliError(f"{args.input}: not a compressed model directory (no .ibp weights in it)")
    default = _dir_name(args.input)
    output = args.output or (default[:-4] if default.endswith("-ibp") else default + "-restored")
    _check_output(output, [args.input], args.force,
                  (_only_names(args.input, checkpoints.original_name), "a model directory decompressed from it"))
    update, close = _progress(checkpoints.raw_nbytes(args.input), "decompress")
    try:
        with _atomic(output, directory=True) as tmp:
            files, count, raw = checkpoints.decompress_dir(args.input, tmp, progress=update)
    except checkpoints.CheckpointError as e:
        raise CliError(str(e)) from None
    finally:
        close()
    print(f"{args.input} -> {output}: {_plural(files, 'weight file')}, {_plural(count, 'tensor')}, "
          f"{_fmt_bytes(raw)}")
    return 0


def describe(ct):
    """One tensor's facts for ``info``, as a JSON-able dict."""
    kinds = np.bincount(ct.unit_kinds(), minlength=4)
    units = int(kinds.sum())
    return {"dtype": ct.dtype_name, "shape": list(ct.shape), "ratio": ct.ratio,
            "raw_nbytes": ct.raw_nbytes, "nbytes": ct.nbytes, "word_bits": ct.word_bits,
            "layout": ct.layout, "period": ct.model.period, "rotate": ct.model.rotate,
            "gather": ct.model.gather,
            "unit_words": ct.geometry.unit_words,
            "invariant_bits": float(ct.model.invariant_bits.mean()),
            "secondary_level": ct.model.has_secondary,
            "units": units, "unit_share": {k: (int(n) / units if units else 0.0)
                                           for k, n in zip(KIND_NAMES, kinds)}}


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)


def _info_dir(args):
    """``info`` of a compressed model directory: each weight file's totals."""
    if not checkpoints.is_compressed_dir(args.input):
        raise CliError(f"{args.input}: not a compressed model directory (no .ibp weights in it)")
    checkpoints.weight_files(args.input)   # a shard index naming missing shards: say so, as decompress does
    files, version = {}, 0
    for name in sorted(os.listdir(args.input)):
        path = os.path.join(args.input, name)
        if not name.endswith(checkpoints.IBP_SUFFIX):
            continue
        with open_ibp(path) as r:
            version = max(version, r.version)
            try:
                tensors = {n: describe(r.tensor(n)) for n in r}
            except FormatError as e:
                raise CliError(f"{path}: not a valid ibp file: {e}") from None
        raw = sum(t["raw_nbytes"] for t in tensors.values())
        packed = sum(t["nbytes"] for t in tensors.values())
        files[name] = {"file_bytes": os.path.getsize(path), "raw_nbytes": raw, "nbytes": packed,
                       "ratio": raw / packed if packed else None, "tensors": tensors}
    raw = sum(f["raw_nbytes"] for f in files.values())
    packed = sum(f["nbytes"] for f in files.values())
    others = sorted(n for n in os.listdir(args.input) if n not in files)
    report = {"directory": args.input, "format_version": version, "raw_nbytes": raw,
              "nbytes": packed, "ratio": raw / packed if packed else None, "files": files, "other_files": others}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    count = sum(len(f["tensors"]) for f in files.values())
    print(f"{args.input}: compressed model directory, {_plural(len(files), 'weight file')}, "
          f"{_plural(count, 'tensor')}, {_plural(len(others), 'other file')}")
    if packed:
        print(f"total: {_fmt_bytes(raw)} raw -> {_fmt_bytes(packed)} to decode ({report['ratio']:.3f}x)")
    rows = [[n, len(f["tensors"]), _fmt_bytes(f["raw_nbytes"]), _fmt_bytes(f["file_bytes"]),
             f"{f['ratio']:.3f}" if f["ratio"] else "-"] for n, f in files.items()]
    print(_table(rows, ["file", "tensors", "raw", "on disk", "ratio"]))
    return 0


def cmd_info(args):
    if os.path.isdir(args.input):
        return _info_dir(args)
    obj, metadata, version = load_ibp(args.input)
    cts = _as_mapping(obj)
    source = _source_of(metadata, args.input)
    tensors = {("" if name is None else name): describe(ct) for name, ct in cts.items()}
    raw = sum(t["raw_nbytes"] for t in tensors.values())
    packed = sum(t["nbytes"] for t in tensors.values())
    report = {"file": args.input, "format_version": version, "file_bytes": os.path.getsize(args.input),
              "source": source, "metadata": {k: v for k, v in metadata.items() if k != SOURCE_KEY},
              "raw_nbytes": raw, "nbytes": packed, "ratio": raw / packed if packed else None,
              "tensors": tensors}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.input}: ibp format version {version}, {_fmt_bytes(report['file_bytes'])}, "
          f"{len(tensors)} tensor{'s' * (len(tensors) != 1)}, from {source.get('format', 'python')}")
    if packed:
        print(f"total: {_fmt_bytes(raw)} raw -> {_fmt_bytes(packed)} to decode ({report['ratio']:.3f}x)")
    extra = source.get("metadata") or {}
    for key, value in {**extra, **report["metadata"]}.items():
        print(f"metadata {key}: {value}")
    rows = []
    for name, t in tensors.items():
        share = t["unit_share"]
        rows.append([name or "-", t["dtype"], "x".join(map(str, t["shape"])) or "()", f"{t['ratio']:.3f}",
                     t["word_bits"], t["layout"], t["period"], f"{t['invariant_bits']:.1f}",
                     " ".join(f"{share[k] * 100:.0f}" for k in ("all", "sparse", "bitmap", "raw"))])
    print(_table(rows, ["name", "dtype", "shape", "ratio", "W", "layout", "period", "inv.bits",
                        "units% all/sparse/bitmap/raw"]))
    return 0


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


BENCH_DATA = (".npy", ".npz", ".safetensors", ".pt", ".pth")
QUICK_SKIPS = ("minilm-kv", "glove-50d")  # the slowest to load and to run
BENCH_DURATION = ("ibp bench: every dataset, 3 repeats: about 10 minutes on 2 cores "
                  "(--quick: about 3 minutes)")
BENCH_DURATION_QUICK = "ibp bench --quick: about 3 minutes on 2 cores"


def cmd_bench(args):
    try:
        from .bench import plot, ratio
    except ImportError as e:
        raise CliError(f"the benchmark needs the bench extra (pip install -e \".[bench]\" in a clone): {e}") from None
    if args.data and args.datasets:
        raise CliError("pass either --data or --datasets, not both")
    if args.data:
        if not os.path.isfile(args.data):
            raise CliError(f"{args.data}: no such file")
        if os.path.splitext(args.data)[1].lower() not in BENCH_DATA:
            raise CliError(f"{args.data}: unsupported format; --data takes {', '.join(BENCH_DATA)} files")
    names = args.datasets
    if args.quick and not args.data and not names:
        names = [n for n in datasets.available() if n not in QUICK_SKIPS]
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        raise CliError(f"--repeats must be at least 1, got {repeats}")
    existing = [n for n in ("ratio.json", "ratio.md", "ratio.png", "gpu.json", "gpu.md")
                if os.path.exists(os.path.join(args.out, n))]
    if existing and not args.force:
        raise CliError(f"{args.out} already holds results ({', '.join(existing)}): pass -f to overwrite them, "
                       "or --out DIR")
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if not args.quiet else None
    if log is not None and not args.data:
        log(BENCH_DURATION_QUICK if args.quick else BENCH_DURATION)
    try:
        results = ratio.run(names=names, data=args.data, repeats=repeats, log=log)
    except (ValueError, OSError) as e:
        raise CliError(f"{args.data or 'bench'}: {e}") from None
    tables = {"ratio": ratio.format_table(results)}
    outputs = {"ratio": results}
    gpu = _bench_gpu(names, args.data, repeats, log)
    if gpu is not None:
        outputs["gpu"], tables["gpu"] = gpu
    print("\n\n".join(tables.values()))
    os.makedirs(args.out, exist_ok=True)
    written = []
    for kind, res in outputs.items():
        for ext, text in (("json", json.dumps(res, indent=1, default=_jsonable) + "\n"), ("md", tables[kind] + "\n")):
            path = os.path.join(args.out, f"{kind}.{ext}")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            written.append(path)
    try:
        written.append(plot.plot_ratio_speed(results, os.path.join(args.out, "ratio.png")))
    except ImportError as e:
        print(f"ibp: no plot ({e})", file=sys.stderr)
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def _bench_gpu(names, data, repeats, log):
    """(results, table) of the GPU benchmark (ibp.bench.gpu), or None where
    there is no GPU or no such module."""
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return None
    try:
        gpu = importlib.import_module("ibp.bench.gpu")
    except ImportError as e:
        if getattr(e, "name", None) != "ibp.bench.gpu":
            print(f"ibp: no GPU benchmark ({e})", file=sys.stderr)
        return None
    try:
        results = gpu.run(names=names, data=data, repeats=repeats, log=log)
    except RuntimeError as e:
        raise CliError(f"GPU benchmark: {e}") from None
    return results, gpu.format_table(results)


# -- entry point --------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(prog="ibp", description="Lossless Invariant Bit Packing of tensor files.")
    p.add_argument("--version", action="version", version=f"ibp {ibp.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compress", help="tensor file -> .ibp, model directory -> compressed directory",
                       description="Compress every tensor of an .npy, .npz, .safetensors or torch "
                                   "(.pt/.pth/.bin) file into one .ibp file; or a model directory "
                                   "(safetensors weights, one file or shards with their index) into a "
                                   "directory with the same other files and .ibp weights.")
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT", nargs="?", help="default: IN.ibp (a directory: IN-ibp)")
    c.add_argument("--word-bits", type=int, choices=(8, 16, 32, 64),
                   help="force this word width (default: the best measured per tensor)")
    c.add_argument("--layout", choices=("packed", "slotted"), default="packed",
                   help="packed: smallest; slotted: rows keep raw-size slots (in-place updates)")
    c.add_argument("--model-from", metavar="FILE",
                   help="reuse models instead of learning them: from an .ibp file's tensors, or "
                        "learned from a tensor file; matched by tensor name unless FILE holds one")
    c.add_argument("-f", "--force", action="store_true", help="overwrite OUT")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help=".ibp -> tensor file, compressed directory -> model directory",
                       description="Restore the tensors of an .ibp file, bit for bit, in the format "
                                   "of OUT's extension, else the format they came from; or a compressed "
                                   "model directory with safetensors weights.")
    d.add_argument("input", metavar="IN")
    d.add_argument("output", metavar="OUT", nargs="?",
                   help="default: IN without .ibp, in the recorded format (a directory: IN without -ibp)")
    d.add_argument("-f", "--force", action="store_true", help="overwrite OUT")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="describe an .ibp file or a compressed model directory")
    i.add_argument("input", metavar="FILE|DIR")
    i.add_argument("--json", action="store_true", help="print the facts as JSON")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="compression ratio and speed on real data (about 10 minutes; --quick 3)",
                       description="Benchmark ibp against the reference algorithm and general-purpose "
                                   "codecs on the real datasets (or on --data), then write JSON and a plot. "
                                   "Every dataset with 3 repeats takes about 10 minutes on 2 cores; --quick "
                                   "about 3. Results already in --out are kept unless -f.")
    b.add_argument("--data", metavar="PATH", help="benchmark the tensors of this file instead of the datasets")
    b.add_argument("--datasets", nargs="+", metavar="NAME", choices=datasets.DATASETS,
                   help="only these of ibp.datasets (default: every one installed)")
    b.add_argument("--out", metavar="DIR", default=DEFAULT_BENCH_DIR, help=f"default: ./{DEFAULT_BENCH_DIR}")
    b.add_argument("--repeats", type=int, default=3, help="timing repeats (default 3)")
    b.add_argument("--quick", action="store_true",
                   help=f"one repeat, and without --data/--datasets skip {' and '.join(QUICK_SKIPS)}")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    b.add_argument("-f", "--force", action="store_true", help="overwrite results already in --out")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, checkpoints.CheckpointError) as e:
        message = str(e)
    except BrokenPipeError:  # the reader of stdout went away (ibp info | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    except OSError as e:
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    except KeyboardInterrupt:
        return 130
    first, *rest = message.strip().splitlines() or ["failed"]
    print(f"ibp: error: {first}", file=sys.stderr)
    return 1
