# Builds fast_inference._C through CMake: the CPU sources always, the CUDA sources when available.
#
# Environment:
#   FI_TARGET_DEVICE=auto|cpu|cuda  auto (default) compiles CUDA when torch is a CUDA build and nvcc is found
#   TORCH_CUDA_ARCH_LIST            honoured; defaults to "8.0;9.0" when no GPU is visible
#   MAX_JOBS                        bounds parallel compile jobs
#   CUDA_HOME                       the CUDA toolkit (else /usr/local/cuda, else nvcc on PATH)
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def fail(message: str) -> None:
    sys.stderr.write(f"\nfast_inference build error: {message}\n\n")
    raise SystemExit(1)


def find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    on_path = shutil.which("nvcc")
    if on_path is None:
        return None
    # The `nvcc` on PATH may be a wrapper script; resolve the real toolkit through it.
    try:
        real = subprocess.run([on_path, "--list-gpu-arch"], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return on_path if real.returncode == 0 else None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return "unknown"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
        except ImportError:
            fail(
                "torch is not importable. Install torch first and build with "
                "`pip install --no-build-isolation .` so the extension links the torch that runs it."
            )
        # Prefer the cmake installed next to this Python (pip's cmake is new enough for nvcc's C++20).
        cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
        if cmake is None:
            fail("cmake was not found; `pip install cmake` (>= 3.26) or install it from your OS packages.")
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            fail("no C++ compiler found (install g++ >= 11 or set CXX).")

        target = os.environ.get("FI_TARGET_DEVICE", "auto").lower()
        if target not in ("auto", "cpu", "cuda"):
            fail(f"FI_TARGET_DEVICE must be auto, cpu or cuda, got {target!r}")
        nvcc = find_nvcc()
        torch_cuda = torch.version.cuda
        use_cuda = target == "cuda" or (target == "auto" and torch_cuda is not None and nvcc is not None)
        if use_cuda:
            if torch_cuda is None:
                fail(f"FI_TARGET_DEVICE=cuda but torch {torch.__version__} is a CPU-only build.")
            if nvcc is None:
                fail("FI_TARGET_DEVICE=cuda but nvcc was not found; set CUDA_HOME to the CUDA toolkit.")
            toolkit = nvcc_version(nvcc)
            if toolkit.split(".")[0] != torch_cuda.split(".")[0]:
                fail(
                    f"torch {torch.__version__} was built for CUDA {torch_cuda} but nvcc is CUDA {toolkit}; "
                    "install a torch built for your toolkit or point CUDA_HOME at a matching one."
                )

        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if use_cuda and not arch_list:
            if torch.cuda.is_available():
                arch_list = ";".join(
                    sorted(
                        {
                            "{}.{}".format(*torch.cuda.get_device_capability(i))
                            for i in range(torch.cuda.device_count())
                        }
                    )
                )
            else:
                arch_list = "8.0;9.0"

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = ROOT / "build" / ("cuda" if use_cuda else "cpu")
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DFI_TORCH_DIR={Path(torch.__file__).parent}",
            f"-DFI_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFI_OUTPUT_DIR={ext_path.parent}",
            f"-DFI_OUTPUT_NAME={ext_path.name}",
            f"-DFI_USE_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
        ]
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        if use_cuda:
            cmake_args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DFI_CUDA_ARCH_LIST={arch_list}"]
            cuda_home = str(Path(nvcc).resolve().parent.parent)
            cmake_args.append(f"-DCUDAToolkit_ROOT={cuda_home}")
            os.environ.setdefault("CUDA_HOME", cuda_home)

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(
            f"fast_inference: building for {'CPU + CUDA (archs ' + arch_list + ')' if use_cuda else 'CPU'} "
            f"with torch {torch.__version__}, {jobs} jobs",
            flush=True,
        )
        started = time.time()
        try:
            subprocess.run([cmake, str(ROOT), *cmake_args], cwd=build_dir, check=True)
            subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        except subprocess.CalledProcessError as error:
            fail(f"CMake step failed ({error}); see the compiler output above.")
        print(f"fast_inference: extension built in {time.time() - started:.1f} s -> {ext_path}", flush=True)


setup(
    ext_modules=[Extension("fast_inference._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
