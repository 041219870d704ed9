"""Native libraries known to misbehave in a child forked (without exec) after the parent
used them: what ``audit()`` looks for among the libraries a process has loaded.

Data only, one ``Library`` per entry, each with where it was learnt.  To add one, add an
entry: ``files`` are regular expressions matched against a loaded file's base name
(wheels vendor libraries under hashed names such as ``libgomp-a34b3233.so.1``, so the
patterns allow a ``-<hex>`` suffix).  Being loaded is a weak signal for most of them: the
trouble starts once the parent has started their threads, devices or connections.
"""

from __future__ import annotations

import re


class Library:
    __slots__ = ("files", "name", "problem", "remedy", "source")

    def __init__(self, name: str, files: str, problem: str, remedy: str, source: str) -> None:
        self.name = name
        self.files = re.compile(files)
        self.problem = problem
        self.remedy = remedy
        self.source = source


_HASH = r"(-[0-9a-f]{8,})?"  # auditwheel's and delocate's renamed copies

LIBRARIES: tuple[Library, ...] = (
    Library(
        "GNU OpenMP (libgomp)",
        rf"^libgomp{_HASH}\.(so(\.\d+)*|\d+\.dylib|dylib)$|^libgomp-1\.dll$",
        "its worker threads stay parked after a parallel region and do not exist in a "
        "forked child, so the child's first parallel region waits for them for ever",
        "use the spawn or forkserver start method, or keep the parent at one OpenMP thread "
        "(OMP_NUM_THREADS=1 set before the library loads)",
        "https://github.com/OpenMathLib/OpenBLAS/pull/343",
    ),
    Library(
        "LLVM OpenMP (libomp)",
        rf"^libomp{_HASH}\.(so(\.\d+)*|dylib)$",
        "has fork handlers that reset its runtime in the child; forking while another "
        "thread runs a parallel region can still leave the child stuck",
        "do not fork while OpenMP work runs; prefer spawn where it must be robust",
        "https://reviews.llvm.org/D41462",
    ),
    Library(
        "Intel OpenMP (libiomp5)",
        rf"^libiomp5{_HASH}\.(so(\.\d+)*|dylib)$|^libiomp5md\.dll$",
        "some releases' fork handlers spin inside fork() or make children abort with "
        "an assertion failure",
        "set KMP_INIT_AT_FORK=FALSE before the runtime starts (and use no OpenMP in the "
        "child), or use spawn",
        "https://github.com/ContinuumIO/anaconda-issues/issues/11294",
    ),
    Library(
        "OpenBLAS",
        rf"^lib(scipy_)?openblas(64_|p-r0|_)?[-.\w]*?{_HASH}\.(so(\.\d+)*|dylib|dll)$",
        "an OpenMP build inherits libgomp's hang; the pthreads build stops its pool "
        "around fork, but post-fork deadlocks have regressed in some versions",
        "set OPENBLAS_NUM_THREADS=1 in programs that fork, or use spawn",
        "https://github.com/OpenMathLib/OpenBLAS/issues/5520",
    ),
    Library(
        "Intel MKL",
        r"^(lib)?mkl_(rt|core|intel_thread|gnu_thread|tbb_thread)[-.\w]*\.(so(\.\d+)*|dylib|dll)$",
        "its default threading layer runs on Intel OpenMP and carries its fork problems",
        "set MKL_THREADING_LAYER=SEQUENTIAL (or TBB) in programs that fork, or use spawn",
        "https://github.com/numpy/numpy/issues/10993",
    ),
    Library(
        "gRPC core",
        r"^(cygrpc\..*\.so|libgrpc(\+\+)?[-.\w]*\.(so(\.\d+)*|dylib))$",
        "its polling threads and connections do not survive fork: a child that uses a "
        "channel created before the fork hangs or fails",
        "create channels only after forking, or set GRPC_ENABLE_FORK_SUPPORT=1 (and "
        "GRPC_POLL_STRATEGY=poll) before gRPC starts",
        "https://github.com/grpc/grpc/blob/master/doc/fork_support.md",
    ),
    Library(
        "CUDA driver and runtime",
        rf"^libcuda(rt)?{_HASH}\.so(\.\d+)*$",
        "a CUDA context does not carry over to a forked child: CUDA calls there fail "
        "('Cannot re-initialize CUDA in forked subprocess') or hang",
        "use the spawn start method for workers that use the GPU",
        "https://github.com/NVIDIA/cuda-python/pull/1309",
    ),
    Library(
        "PyTorch (libtorch)",
        rf"^libtorch(_cpu|_cuda|_python)?{_HASH}\.(so|dylib)$",
        "its intra-op thread pool (OpenMP) and CUDA state are not fork-safe once used",
        "call torch.set_num_threads(1) before forking, or use spawn; never fork after using CUDA",
        "https://docs.pytorch.org/docs/stable/_sources/notes/multiprocessing.rst.txt",
    ),
    Library(
        "TensorFlow",
        r"^(libtensorflow_framework|libtensorflow_cc|_pywrap_tensorflow_internal)[-.\w]*\.so(\.\d+)*$",
        "its runtime starts thread pools at first use that a forked child does not get",
        "use spawn, or fork before TensorFlow is first used",
        "https://github.com/tensorflow/tensorflow/issues/2448",
    ),
    Library(
        "ONNX Runtime",
        r"^(libonnxruntime|onnxruntime_pybind11_state)[-.\w]*\.(so(\.\d+)*|dylib)$",
        "a session's thread pool does not exist in a forked child; using the session there "
        "can hang",
        "create sessions after forking, or use spawn",
        "https://github.com/microsoft/onnxruntime/pull/31961",
    ),
    Library(
        "Hugging Face tokenizers",
        r"^tokenizers[-.\w]*\.(so|pyd)$",
        "its Rust thread pool, once used, is gone in a forked child; the library then "
        "turns parallelism off there (and warns)",
        "set TOKENIZERS_PARALLELISM=false in programs that fork, or use spawn",
        "https://github.com/huggingface/transformers/issues/5486",
    ),
    Library(
        "JVM (libjvm, e.g. through JPype)",
        r"^(libjvm\.(so|dylib)|_jpype\..*\.so)$",
        "a forked child has only the forking thread of a running JVM: its other threads "
        "(garbage collector, compiler) are gone",
        "start the JVM only in the children, after forking, or use spawn",
        "https://github.com/jpype-project/jpype/issues/1077",
    ),
)
