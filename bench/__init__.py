"""sealvm benchmarks: each module runs sealvm beside a peer (QEMU, native code or
a plain syscall) in the same run and writes bench/results/<name>.json and .png.

`python3 -m bench.run_all` runs them all; `python3 -m bench.<name> --quick`
runs one as a smoke test.  See bench/README.md.
"""
