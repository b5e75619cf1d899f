#!/usr/bin/env python3
"""The emulation must fail kernels with the hazards it exists to catch (see tests/cpp/cuda_emulation.h).

Each mutant is a one-line edit of csrc/cuda/fused_gemm_kernel.cuh that is a real race on a GPU:
- M1: a pipeline stage refilled before the barrier that says every warp is done reading it (a write-after-read
  race, seen only when copies may land at issue: --eager, under ThreadSanitizer);
- M3: the barrier between the decode's low-byte and exception passes dropped (a lost update: one thread's 32-bit
  read-modify-write against another's 16-bit one of the same word);
- G1, G2: the grouped path's sparse tiles read before their staged payloads, or their exception ranges, are
  complete;
- G3: a dense fine-tune's patch copy written over sparse payloads other threads still read.
Every mutant is built under ThreadSanitizer and run on a few cases; the check passes when each one fails. An
edit whose anchor is gone (the kernel changed) is an error here, not a silent pass: update the mutant with it.

usage: check_mutants.py CXX SOURCE_DIR BUILD_DIR
"""
import os
import subprocess
import sys

KERNEL = "csrc/cuda/fused_gemm_kernel.cuh"

# name: (text to find exactly once, its replacement, emulation arguments)
MUTANTS = {
    "M1 (a stage refilled before the barrier)": (
        "    __syncthreads();  // stage s landed for every thread; everyone is done with the stage refilled next\n"
        "    issue(kt + kStages - 1, (kt - kt0 + kStages - 1) % kStages);\n",
        "    issue(kt + kStages - 1, (kt - kt0 + kStages - 1) % kStages);\n"
        "    __syncthreads();\n",
        ["--eager", "--only", "staged"],
    ),
    "M3 (no barrier between the decode passes)": (
        "        codec::xor_tile_low_strided<uint16_t>(payload, e, elems, w, tile, kStride, tid, kThreads);\n"
        "        __syncthreads();\n"
        "        codec::xor_tile_exceptions_strided",
        "        codec::xor_tile_low_strided<uint16_t>(payload, e, elems, w, tile, kStride, tid, kThreads);\n"
        "        codec::xor_tile_exceptions_strided",
        ["--only", "staged"],
    ),
    "G1 (sparse payloads read before they are staged)": (
        "      __syncthreads();  // the payloads are in shared memory\n", "", ["--eager", "--only", "grouped uniform"],
    ),
    "G2 (exception ranges read before they are complete)": (
        "      __syncthreads();  // the ranges are complete\n", "", ["--eager", "--only", "grouped uniform"],
    ),
    "G3 (a patch copy over sparse payloads in use)": (
        "    if (any_sparse && any_dense) __syncthreads();  // the patch copies overwrite the sparse payloads\n", "",
        ["--eager", "--only", "grouped uniform"],
    ),
}


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1])
    cxx, src, build = sys.argv[1:]
    with open(os.path.join(src, KERNEL)) as f:
        kernel = f.read()
    survivors = []
    for i, (name, (find, replace, args)) in enumerate(MUTANTS.items()):
        if kernel.count(find) != 1:
            sys.exit(f"check_mutants: {name}: its anchor is not in {KERNEL} exactly once; update the mutant")
        root = os.path.join(build, f"mutant{i}")
        os.makedirs(os.path.join(root, "cuda"), exist_ok=True)
        with open(os.path.join(root, KERNEL.removeprefix("csrc/")), "w") as f:
            f.write(kernel.replace(find, replace))
        exe = os.path.join(root, "kernel_emulation_test")
        subprocess.run([cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", "-w", f"-I{root}",
                        f"-I{src}/csrc", f"-I{src}/tests/cpp", f"{src}/tests/cpp/kernel_emulation_test.cpp",
                        f"{src}/csrc/format/delta_section.cpp", "-o", exe], check=True)
        env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0")
        r = subprocess.run([exe, *args], env=env, capture_output=True, text=True)
        race = "ThreadSanitizer: data race" in r.stderr
        failed = [line for line in r.stderr.splitlines() if line.startswith("FAILED:")]
        caught = r.returncode != 0 and (race or failed)
        print(f"{name}: {'caught' if caught else 'NOT CAUGHT'} (exit {r.returncode}"
              f"{', a data race reported' if race else ''}{f', {len(failed)} cases failed' if failed else ''})")
        if not caught:
            survivors.append(name)
    if survivors:
        sys.exit(f"check_mutants: the emulation passes {', '.join(survivors)}: it no longer catches that hazard")


if __name__ == "__main__":
    main()
