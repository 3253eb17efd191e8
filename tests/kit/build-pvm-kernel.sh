#!/usr/bin/env bash
# Builds Flotilla's kvm_pvm test kernel: Debian's linux-source-6.12, `tinyconfig` plus
# tests/kit/pvm-kernel/config.fragment, with the two boot-option patches there
# (`noint3selftest`, `nofpudropfwait`) that let it through boot under this host's kvm_pvm
# (../shared/LINUX-ON-KVM-PVM.md). The host's boot options are built into the kernel
# (CONFIG_CMDLINE, a boot loader's command line is appended to them).
#
#   tests/kit/build-pvm-kernel.sh            # prints PVM_VMLINUX=... PVM_BZIMAGE=... PVM_SYSTEM_MAP=... PVM_KVER=...
#   eval "$(tests/kit/build-pvm-kernel.sh)"  # then: flotilla -kernel "$PVM_VMLINUX" -append console=ttyS0 ...
#
# Everything lives in ${FLOTILLA_PVM_KERNEL_DIR:-$HOME/.cache/flotilla/pvm-kernel}, never in the
# repository: the source .deb, one build tree (kept, so a changed fragment rebuilds
# incrementally) and the finished kernels under out/<key>, where key hashes the source package,
# this script, the fragment and the patches. A second run with the same key prints the cached
# paths at once. Progress goes to stderr; the build log to <dir>/build.log.
set -euo pipefail

DIR=${FLOTILLA_PVM_KERNEL_DIR:-$HOME/.cache/flotilla/pvm-kernel}
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
KIT=$HERE/pvm-kernel
PACKAGE=linux-source-6.12
JOBS=${FLOTILLA_PVM_KERNEL_JOBS:-$(nproc)}

log() { printf 'build-pvm-kernel: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

ensure_tools() {
    local missing=() pair tool pkg
    for pair in make:make gcc:gcc flex:flex bison:bison bc:bc xz:xz-utils perl:perl lz4:lz4 \
        patch:patch cpio:cpio; do
        tool=${pair%%:*} pkg=${pair#*:}
        command -v "$tool" >/dev/null || missing+=("$pkg")
    done
    # Headers the kernel's host tools need (objtool, sign-file are off, but fixdep etc. build).
    dpkg -s libelf-dev >/dev/null 2>&1 || missing+=(libelf-dev)
    dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
    if ((${#missing[@]})); then
        [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]} (apt-get install -y ${missing[*]})"
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
            "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
}

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '/^ *Candidate:/ { print $2; exit }'
}

main() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock 9
    local version
    version=$(candidate_version "$PACKAGE")
    [[ -n $version && $version != "(none)" ]] || die "apt knows no $PACKAGE (Debian 12 has it in bookworm-updates/security; run apt-get update)"
    local key
    key=$( { echo "$PACKAGE $version"; cat "${BASH_SOURCE[0]}" "$KIT"/config.fragment "$KIT"/*.patch; } \
        | sha256sum | cut -c1-16)
    local out=$DIR/out/$key
    if [[ -f $out/done ]]; then
        log "cached: $out"
        print_paths "$out"
        return
    fi
    ensure_tools
    local deb
    deb=$(ls "$DIR"/${PACKAGE}_*.deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb || $deb != *"${version//:/%3a}"* ]]; then
        rm -f "$DIR"/${PACKAGE}_*.deb
        log "downloading $PACKAGE $version"
        (cd "$DIR" && apt-get download "$PACKAGE=$version" >&2 2>/dev/null) \
            || (cd "$DIR" && apt-get download "$PACKAGE=$version" >&2) \
            || die "apt-get download $PACKAGE failed"
        deb=$(ls "$DIR"/${PACKAGE}_*.deb | head -n1)
    fi
    # A fresh tree when the package or the patches changed; else the kept one (incremental).
    local src=$DIR/src stamp
    stamp=$( { echo "$version"; cat "$KIT"/*.patch; } | sha256sum | cut -c1-16)
    if [[ ! -f $src/.flotilla-stamp || $(cat "$src/.flotilla-stamp") != "$stamp" ]]; then
        log "unpacking $(basename "$deb")"
        rm -rf "$src" "$DIR/src.tmp"
        mkdir -p "$DIR/src.tmp"
        dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/$PACKAGE.tar.xz \
            | tar -xJ -C "$DIR/src.tmp" --strip-components=1
        local p
        for p in "$KIT"/*.patch; do
            log "applying $(basename "$p")"
            patch -d "$DIR/src.tmp" -p1 --no-backup-if-mismatch -s <"$p" >&2 || die "$(basename "$p") does not apply"
        done
        echo "$stamp" >"$DIR/src.tmp/.flotilla-stamp"
        mv "$DIR/src.tmp" "$src"
    fi
    log "configuring (tinyconfig + config.fragment)"
    make -C "$src" -s tinyconfig >"$DIR/build.log" 2>&1 || die "make tinyconfig failed (see $DIR/build.log)"
    (cd "$src" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$KIT/config.fragment") \
        >>"$DIR/build.log" 2>&1 || die "merging the fragment failed (see $DIR/build.log)"
    make -C "$src" -s olddefconfig >>"$DIR/build.log" 2>&1 || die "make olddefconfig failed"
    check_fragment "$src/.config"
    log "building bzImage with $JOBS jobs (about 6 minutes on 2 cores from clean; log: $DIR/build.log)"
    local t0=$SECONDS
    make -C "$src" -j"$JOBS" bzImage >>"$DIR/build.log" 2>&1 \
        || { tail -n 30 "$DIR/build.log" >&2; die "the kernel build failed (see $DIR/build.log)"; }
    log "built in $((SECONDS - t0)) s"
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/System.map" "$out.tmp/"
    cp "$src/.config" "$out.tmp/config"
    make -C "$src" -s kernelrelease >"$out.tmp/kver"
    touch "$out.tmp/done"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    # Keep the three newest kernels: trees with another fragment (a branch, a `git archive`
    # copy) share this cache, and a running boot may still be reading an older one.
    ls -1td "$DIR"/out/*/ 2>/dev/null | tail -n +4 | xargs -r rm -rf
    print_paths "$out"
}

# Every option the fragment sets must have survived olddefconfig (a missing dependency drops
# one silently).
check_fragment() {
    local config=$1 line name want got bad=0
    while IFS= read -r line; do
        case $line in
            CONFIG_*=*) name=${line%%=*} want=${line#*=} ;;
            "# CONFIG_"*" is not set") name=${line#\# } name=${name%% *} want=n ;;
            *) continue ;;
        esac
        got=$(grep -E "^$name=|^# $name is not set" "$config" || true)
        case $got in
            "# $name is not set" | "") got=n ;;
            *) got=${got#*=} ;;
        esac
        if [[ $got != "$want" ]]; then
            log "config: $name is $got, the fragment wants $want"
            bad=1
        fi
    done <"$KIT/config.fragment"
    ((bad == 0)) || die "the fragment's options did not all hold (a dependency is missing)"
}

print_paths() {
    local out=$1
    printf 'PVM_VMLINUX=%s\nPVM_BZIMAGE=%s\nPVM_SYSTEM_MAP=%s\nPVM_KVER=%s\n' \
        "$out/vmlinux" "$out/bzImage" "$out/System.map" "$(cat "$out/kver")"
}

main "$@"
