# Write-and-verify load for the restart tests, run by the Linux guest kit's busybox sh. It is
# typed into the guest's shell by tests/src/write_verify.rs (not part of the initramfs), so it
# keeps to busybox applets and short lines.
#
#   wv W B K S DEV
#
# W writers run in parallel. Pass p of writer w (w = 0..W-1, p = 1, 2, ...) writes B blocks of
# K KiB with O_DIRECT to slot ((p-1)*W + w) % S of DEV (a slot is B*K KiB; S is a multiple of W,
# so a slot only ever holds one writer's passes), block b holding the text
# "FLOTILLA w=<w> p=<p> b=<b>\n" repeated and cut at K KiB; the B blocks are written by B dd
# processes at once, so that W*B writes can be in flight. Each pass then reads its slot back with
# O_DIRECT and compares. Every pass prints one line:
#   WV w=<w> p=<p> ok|BAD <cmp's line>|ERR <what> if=<reads>/<writes>
# where reads/writes are DEV's requests in flight as the line is printed. A probe reads 4 KiB
# with O_DIRECT in a loop and prints "WT <n> <start> <end>" after each, the guest's uptime in s
# before and after the read (the host maps the guest's clock onto its own to time the read, not
# the line's way out through the serial port). Once /tmp/stop exists each writer ends
# after its pass with "WV w=<w> done p=<last pass whose write succeeded>", the probe with "WT done".
wvpat() {
    b=0
    : >"$4"
    while [ "$b" -lt "$2" ]; do
        yes "FLOTILLA w=$1 p=$3 b=$b" | head -c $(($5 * 1024)) >>"$4"
        b=$((b + 1))
    done
}
wvw() {
    w=$1 B=$2 K=$3 S=$4 D=$5 p=0 last=0
    n=$(basename "$D")
    while [ ! -e /tmp/stop ]; do
        p=$((p + 1))
        s=$(((p - 1) * $6 + w))
        s=$((s % S))
        wvpat "$w" "$B" "$p" "/tmp/wvp$w" "$K"
        st=ok
        pids="" b=0
        while [ "$b" -lt "$B" ]; do
            dd if=/tmp/wvp$w of="$D" bs=${K}k skip=$b seek=$((s * B + b)) count=1 oflag=direct conv=notrunc 2>/tmp/wve$w.$b &
            pids="$pids $!"
            b=$((b + 1))
        done
        for pid in $pids; do
            wait "$pid" || st="ERR write $(grep -hv records /tmp/wve$w.* | tail -n 1)"
        done
        if [ "$st" = ok ]; then
            last=$p
            if ! dd if="$D" of=/tmp/wvr$w bs=${K}k skip=$((s * B)) count="$B" iflag=direct 2>/tmp/wve$w; then
                st="ERR read $(tail -n 1 /tmp/wve$w)"
            elif ! cmp /tmp/wvp$w /tmp/wvr$w >/tmp/wvc$w 2>&1; then
                st="BAD $(head -n 1 /tmp/wvc$w)"
            fi
        fi
        read -r ri wi </sys/block/$n/inflight
        echo "WV w=$w p=$p $st if=$ri/$wi"
    done
    echo "WV w=$w done p=$last"
}
wvt() {
    n=0
    while [ ! -e /tmp/stop ]; do
        read -r t0 _ </proc/uptime
        dd if="$1" of=/dev/null bs=4k count=1 skip=$((n % 256)) iflag=direct 2>/dev/null || echo "WT ERR $n"
        read -r t1 _ </proc/uptime
        echo "WT $n $t0 $t1"
        n=$((n + 1))
    done
    echo "WT done"
}
wv() {
    rm -f /tmp/stop
    i=0
    while [ "$i" -lt "$1" ]; do
        wvw "$i" "$2" "$3" "$4" "$5" "$1" &
        i=$((i + 1))
    done
    wvt "$5" &
}
