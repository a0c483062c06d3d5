#!/usr/bin/env bash
# Shrink the TVM bundle that ../shared/device/prepare put in .device/, the room the tree needs under the
# device tool's 64 MiB (the full bundle and a tree of 2.39 MB were refused): strips
# libxgboost.so's symbols, drops the wheels' RECORD files, and carries libtvm_ffi_testing.so (which
# tvm_ffi's core links but qcompile never calls) beside the bundle xz-compressed, restored by
# .device/setup.sh before anything imports tvm_ffi; and writes .device/tvm-core.tar.xz, the bundle
# without xgboost. Carry [".device/tvm-core.tar.xz", ".device/ffitest.xz", ".device/setup.sh"] (about 3 MB
# to spare), or ".device/tvm-full.tar.xz" instead of the core for a call that tunes with the cost model
# (26 KB to spare at 1cc922e). Run here once after prepare (~15 min of one core).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bundle=.device/tvm-full.tar.xz
[ -f "$bundle" ] || { echo "no $bundle: run ../shared/device/prepare first" >&2; exit 1; }
if [ -f .device/ffitest.xz ]; then echo "already slim: $(du -sb .device | cut -f1) bytes in .device"; exit 0; fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
tar -xJf "$bundle" -C "$work"
strip --strip-unneeded "$work/site/xgboost/lib/libxgboost.so"
rm -f "$work"/site/*.dist-info/RECORD
# (nothing imports these at run time: tvm_ffi's Cython sources, its stub-generator CLI, type stubs; ~110 KB
# of the compressed bundle)
rm -rf "$work/site/tvm_ffi/cython" "$work/site/tvm_ffi/stub"
find "$work/site" -name '*.pyi' -delete
lib=site/tvm_ffi/lib/libtvm_ffi_testing.so
xz -9 -c "$work/$lib" > .device/ffitest.xz.tmp
rm "$work/$lib"
(cd "$work" && tar -cf - site | xz --x86 --lzma2=preset=9e,dict=384MiB -T1) > "$bundle.tmp"
# ... and the same without xgboost (the tuner's cost model, 3.1 MB of it): a call that does not tune with
# the cost model carries this one and has megabytes to spare (device_run.sh tune falls back to --order
# space without xgboost)
rm -rf "$work"/site/xgboost*
(cd "$work" && tar -cf - site | xz --x86 --lzma2=preset=9e,dict=384MiB -T1) > .device/tvm-core.tar.xz.tmp
restore="mkdir -p /tmp/qc-site/$(dirname $lib) && { [ -s /tmp/qc-site/$lib ] || xz -dc .device/ffitest.xz > /tmp/qc-site/$lib; }"
core="{ [ -f .device/tvm-full.tar.xz ] || [ -d /tmp/qc-site/site/tvm ] || [ ! -f .device/tvm-core.tar.xz ] || { mkdir -p /tmp/qc-site && tar -xJf .device/tvm-core.tar.xz -C /tmp/qc-site; }; }"
{ echo "# (tests/gpu/slim_device_bundle.sh) a library the slim bundle carries apart; the bundle without xgboost"
  echo "$restore"; echo "$core"; cat .device/setup.sh; } > .device/setup.sh.tmp
mv "$bundle.tmp" "$bundle"; mv .device/ffitest.xz.tmp .device/ffitest.xz; mv .device/tvm-core.tar.xz.tmp .device/tvm-core.tar.xz
chmod u+w .device/setup.sh 2>/dev/null || true; mv -f .device/setup.sh.tmp .device/setup.sh; chmod +x .device/setup.sh
echo "slim: $(du -sb .device | cut -f1) bytes in .device"
