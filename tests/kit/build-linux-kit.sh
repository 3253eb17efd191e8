#!/usr/bin/env bash
# Builds Flotilla's Linux guest kit: Debian's generic kernel and an initramfs made of
# busybox-static, the virtio modules and a small /init.
#
#   tests/kit/build-linux-kit.sh            # prints KERNEL=... INITRD=... KVER=... on stdout
#   eval "$(tests/kit/build-linux-kit.sh)"  # then: qemu-system-x86_64 -kernel "$KERNEL" -initrd "$INITRD" ...
#
# Sources: only `apt-get download` of the host's Debian archive (the kernel the
# linux-image-amd64 metapackage currently depends on, and busybox-static). Everything lives in
# ${FLOTILLA_KIT_DIR:-$HOME/.cache/flotilla/kit}, never in the repository. A second run reuses the
# cached .debs and the built initramfs; it rebuilds only when the resolved packages or this
# script change. Needs `apt-get update` to have been run once. Progress goes to stderr.
#
# The guest's /init mounts proc, sys, dev (devtmpfs), devpts and a tmpfs on /tmp, loads the
# virtio modules in dependency order (virtio_pci is a module in Debian's kernel, so it is loaded
# first), prints `FLOTILLA-LINUX-READY` on the console and runs a shell on ttyS0 (respawned when
# it exits). Kernel command-line switches understood by /init:
#   flotilla.poweroff   power off right after printing the marker (for boot-time measurements)
set -euo pipefail

KIT_DIR=${FLOTILLA_KIT_DIR:-$HOME/.cache/flotilla/kit}
SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
# The modules the guest loads, by module name; missing ones are skipped with a note.
WANTED_MODULES=(virtio_pci virtio_blk virtio_net virtio_balloon virtio_input virtio_gpu virtio_console)

log() { printf 'build-linux-kit: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
ensure_tools() {
    local missing=() tool pkg
    for tool in apt-get apt-cache dpkg-deb gzip sha256sum flock find sort; do
        command -v "$tool" >/dev/null || die "required tool '$tool' is not installed"
    done
    for pair in cpio:cpio xz:xz-utils zstd:zstd depmod:kmod; do
        tool=${pair%%:*} pkg=${pair#*:}
        command -v "$tool" >/dev/null || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            die "missing packages: ${missing[*]} (install them: apt-get install -y ${missing[*]})"
        fi
        log "installing missing tools: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 \
            "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    fi
}

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------
# Candidate version of a package, or empty when apt knows none.
candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '/^ *Candidate:/ { print $2; exit }'
}

# The linux-image-<abi>-amd64 package that linux-image-amd64's candidate depends on.
resolve_kernel_package() {
    local ver dep
    ver=$(candidate_version linux-image-amd64)
    [[ -n $ver && $ver != "(none)" ]] ||
        die "apt knows no linux-image-amd64 candidate (run apt-get update once)"
    dep=$(apt-cache show "linux-image-amd64=$ver" 2>/dev/null |
        awk -F': ' '/^Depends:/ { print $2; exit }' | tr ',' '\n' |
        grep -oE 'linux-image-[0-9][^ ]*-amd64' | head -n1) || true
    [[ -n $dep ]] || die "cannot read linux-image-amd64 $ver's kernel dependency"
    printf '%s\n' "$dep"
}

# Downloads PACKAGE's candidate into $KIT_DIR/debs unless already there; prints the .deb path.
fetch_deb() {
    local pkg=$1 ver enc deb
    ver=$(candidate_version "$pkg")
    [[ -n $ver && $ver != "(none)" ]] || die "apt knows no candidate for $pkg (run apt-get update once)"
    enc=${ver//:/%3a}
    deb="$KIT_DIR/debs/${pkg}_${enc}_amd64.deb"
    if [[ ! -s $deb ]]; then
        log "downloading $pkg $ver"
        local tmp
        tmp=$(mktemp -d "$KIT_DIR/debs/.dl.XXXXXX")
        local sandbox=()
        # apt drops to _apt for downloads and warns when that user cannot write here.
        [[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)
        (cd "$tmp" && apt-get download -q "${sandbox[@]}" "$pkg=$ver" >&2) ||
            { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
        local got
        got=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)
        [[ -n $got ]] || { rm -rf "$tmp"; die "apt-get download $pkg=$ver produced no .deb"; }
        mv "$got" "$deb"
        rm -rf "$tmp"
    fi
    printf '%s\n' "$deb"
}

# Extracts DEB into $KIT_DIR/extract/<deb name> once; prints the directory.
extract_deb() {
    local deb=$1 dir
    dir="$KIT_DIR/extract/$(basename "$deb" .deb)"
    if [[ ! -f $dir/.extracted ]]; then
        log "extracting $(basename "$deb")"
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir" || die "dpkg-deb -x $deb failed"
        touch "$dir/.extracted"
    fi
    printf '%s\n' "$dir"
}

# ---------------------------------------------------------------------------------------------
# initramfs pieces
# ---------------------------------------------------------------------------------------------
# A newc cpio archive holding /dev and the /dev/console node (c 5 1), written by hand so that
# building needs no root for mknod. The kernel opens /dev/console before running /init.
write_console_cpio() {
    local out=$1
    newc_entry() { # name mode nlink rdevmajor rdevminor
        local name=$1 mode=$2 nlink=$3 rmaj=$4 rmin=$5 namesize hdr pad
        namesize=$((${#name} + 1))
        hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
            0 "$mode" 0 0 "$nlink" 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0)
        printf '%s%s\0' "$hdr" "$name"
        pad=$(((4 - (110 + namesize) % 4) % 4))
        head -c "$pad" /dev/zero
    }
    {
        newc_entry dev $((0040755)) 2 0 0
        newc_entry dev/console $((0020600)) 1 5 1
        newc_entry 'TRAILER!!!' 0 1 0 0
    } >"$out"
}

write_init() {
    local out=$1
    cat >"$out" <<'EOF'
#!/bin/sh
# Flotilla Linux guest kit /init (generated by tests/kit/build-linux-kit.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin /root
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
hostname flotilla-guest
KVER=$(uname -r)
echo "flotilla-init: kernel $KVER"
while read -r mod; do
    [ -n "$mod" ] || continue
    name=${mod##*/}
    name=$(echo "${name%.ko}" | tr - _)
    if err=$(insmod "/lib/modules/$KVER/$mod" 2>&1); then
        echo "flotilla-init: loaded $name"
    else
        echo "flotilla-init: insmod $name failed: $err"
    fi
done </etc/flotilla-modules
echo "FLOTILLA-LINUX-READY"
case " $(cat /proc/cmdline) " in
*" flotilla.poweroff "*) poweroff -f ;;
esac
tty=/dev/ttyS0
[ -c "$tty" ] || tty=/dev/console
export HOME=/root PS1='flotilla# '
while :; do
    setsid -c sh <"$tty" >"$tty" 2>&1
    sleep 1
done
EOF
    chmod 0755 "$out"
}

# Prints the module paths (relative to lib/modules/KVER, as in modules.dep) to load, each after
# the modules it depends on.
module_load_order() {
    local moddir=$1
    local -A deps=() byname=() seen=()
    local -a order=()
    local line key name
    while IFS= read -r line; do
        key=${line%%:*}
        deps[$key]=${line#*:}
        name=${key##*/}
        name=${name%%.ko*}
        byname[${name//-/_}]=$key
    done <"$moddir/modules.dep"
    visit() {
        local m=$1 d
        [[ -n ${seen[$m]:-} ]] && return 0
        seen[$m]=1
        for d in ${deps[$m]}; do visit "$d"; done
        order+=("$m")
    }
    for name in "${WANTED_MODULES[@]}"; do
        if [[ -n ${byname[$name]:-} ]]; then
            visit "${byname[$name]}"
        else
            log "note: module $name is not in this kernel (built in or absent), skipped"
        fi
    done
    ((${#order[@]})) && printf '%s\n' "${order[@]}"
    return 0
}

# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
main() {
    mkdir -p "$KIT_DIR/debs" "$KIT_DIR/extract"
    exec 9>"$KIT_DIR/.lock"
    flock 9 # concurrent test runs share one cache

    ensure_tools

    local kpkg kdeb bdeb kdir bdir
    kpkg=$(resolve_kernel_package)
    kdeb=$(fetch_deb "$kpkg")
    bdeb=$(fetch_deb busybox-static)

    local stamp
    stamp=$(printf '%s\n%s\n%s\n' "$(basename "$kdeb")" "$(basename "$bdeb")" \
        "$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)")
    local outdir="$KIT_DIR/linux-${kpkg#linux-image-}"
    if [[ -f $outdir/stamp && $(cat "$outdir/stamp") == "$stamp" &&
        -s $outdir/initrd.img && -s $outdir/vmlinuz ]]; then
        log "up to date: $outdir"
    else
        kdir=$(extract_deb "$kdeb")
        bdir=$(extract_deb "$bdeb")
        local kver vmlinuz
        vmlinuz=$(find "$kdir/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
        [[ -n $vmlinuz ]] || die "$(basename "$kdeb") has no boot/vmlinuz-*"
        kver=${vmlinuz##*/vmlinuz-}
        local moddir="$kdir/lib/modules/$kver"
        [[ -d $moddir ]] || die "$(basename "$kdeb") has no lib/modules/$kver"
        if [[ ! -s $moddir/modules.dep ]]; then
            # Debian ships no modules.dep (its postinst runs depmod); make one in the cache.
            log "running depmod for $kver"
            depmod -b "$kdir" "$kver" || die "depmod -b $kdir $kver failed"
        fi
        [[ -x $bdir/bin/busybox ]] || die "$(basename "$bdeb") has no bin/busybox"

        WORK=$(mktemp -d "$KIT_DIR/.build.XXXXXX")
        trap 'rm -rf "$WORK"' EXIT
        local work=$WORK
        local root="$work/root"
        mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,root,etc,usr/bin,usr/sbin,lib/modules/"$kver"}
        cp "$bdir/bin/busybox" "$root/bin/busybox"
        ln -s busybox "$root/bin/sh"
        write_init "$root/init"

        # Modules, decompressed, with a modules.dep of their own for busybox modprobe.
        local rel src dst plain
        : >"$root/etc/flotilla-modules"
        : >"$root/lib/modules/$kver/modules.dep"
        while IFS= read -r rel; do
            src="$moddir/$rel"
            plain=${rel%.xz}
            plain=${plain%.zst}
            plain=${plain%.gz}
            dst="$root/lib/modules/$kver/$plain"
            mkdir -p "$(dirname "$dst")"
            case $rel in
            *.ko.xz) xz -dc "$src" >"$dst" ;;
            *.ko.zst) zstd -q -dc "$src" >"$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$dst" ;;
            *) cp "$src" "$dst" ;;
            esac
            printf '%s\n' "$plain" >>"$root/etc/flotilla-modules"
            local d line=""
            for d in $(grep -m1 "^$rel:" "$moddir/modules.dep" | cut -d: -f2-); do
                d=${d%.xz} d=${d%.zst} d=${d%.gz}
                line+=" $d"
            done
            printf '%s:%s\n' "$plain" "$line" >>"$root/lib/modules/$kver/modules.dep"
        done < <(module_load_order "$moddir")
        log "modules: $(tr '\n' ' ' <"$root/etc/flotilla-modules" | sed 's#[^ ]*/##g')"

        write_console_cpio "$work/console.cpio"
        (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
            cpio --quiet -o -H newc -R 0:0 --reproducible) >"$work/main.cpio" ||
            die "cpio failed"
        cat "$work/console.cpio" "$work/main.cpio" | gzip -9 -n >"$work/initrd.img"

        rm -rf "$outdir.new"
        mkdir -p "$outdir.new"
        cp "$vmlinuz" "$outdir.new/vmlinuz"
        mv "$work/initrd.img" "$outdir.new/initrd.img"
        printf '%s\n' "$kver" >"$outdir.new/kver"
        printf '%s\n' "$stamp" >"$outdir.new/stamp"
        rm -rf "$outdir"
        mv "$outdir.new" "$outdir"
        # Extractions of superseded packages are 400 MB each; keep only the current ones.
        local old
        for old in "$KIT_DIR"/extract/*; do
            [[ $old == "$kdir" || $old == "$bdir" ]] || rm -rf "$old"
        done
        log "built $outdir ($(du -h "$outdir/initrd.img" | cut -f1) initramfs)"
    fi

    printf 'KERNEL=%s\n' "$outdir/vmlinuz"
    printf 'INITRD=%s\n' "$outdir/initrd.img"
    printf 'KVER=%s\n' "$(cat "$outdir/kver")"
}

main "$@"
