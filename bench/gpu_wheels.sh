#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks, for its Python (CPython 3.12, manylinux x86_64), into
# .whl/ at the repository root (ignored by git; a device `run` carries it with carry: [".whl"]).
#
# The GPU machine has torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate, numpy, PyYAML, rich,
# typer, matplotlib, sacrebleu, safetensors, tokenizers, httpx, anyio, click, h11, tqdm, requests, but
# not bitsandbytes, pydantic, fastapi, uvicorn, gguf or openai, and it reaches no package registry. Every
# wheel is fetched with --no-deps, so each dependency that machine lacks (or has too old) is named here,
# pinned to the version slimtune is tested with. One version of each: two would stop the install there.
#
#     bash bench/gpu_wheels.sh          # here, where pip reaches PyPI; prints the sizes (64 MiB travel per call)
#
# Then, on the GPU machine (one device `run`, carry [".whl"], timeout_s 600; README "GPU check"):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site:$PWD/src python3 bench/gpu_check.py --device cuda --out-dir $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}

WHEELS=(
  bitsandbytes==0.50.2        # the QLoRA peer and the NF4 oracle; 41 MiB (its CUDA 13.0 library is in it)
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0   # pydantic needs >= 4.16
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  uvicorn==0.54.0 h11==0.16.0
  gguf==0.19.0
  # the load generator of the serving check is the official openai client
  openai==3.57.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 anyio==4.16.0
  httpx2==2.16.2 httpcore2==2.16.2 idna==3.20 truststore==0.10.5
)

rm -rf .whl
mkdir -p .whl
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "wheels: $(ls .whl/*.whl | wc -l) files, $((total / 1048576)) MiB (a device call carries at most 64 MiB with the tree)"
if [ "$total" -gt $((56 * 1048576)) ]; then
  echo "too large to travel with the working tree: drop a wheel or split the call" >&2
  exit 1
fi
