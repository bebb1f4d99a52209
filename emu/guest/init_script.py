"""The guest's /init (busybox ash): mount, load modules, run workloads, power off.

Kept as a string so it ships inside the Python package. Everything the host parses is a
line starting with a marker (see console.py): EMU-INIT-START, EMU-STEP <workload>,
EMU-RESULT <key> <value>, EMU-DEV <name> k=v..., EMU-BENCH <name> <value> <unit>,
EMU-WARN <text>, EMU-DONE rc=<n>; fio's JSON report comes as the lines between
EMU-FIO-JSON-BEGIN and EMU-FIO-JSON-END. Workloads come from `emu.run=a,b` on the kernel command
line; their knobs are `emu.<workload>.<knob>=` arguments (defaults below). The `fs`,
`vsock` and `balloon` workloads live in init_fs.py, init_vsock.py and init_balloon.py.
"""

from emu.guest.init_balloon import BALLOON_WORKLOAD
from emu.guest.init_fs import FS_WORKLOAD
from emu.guest.init_vsock import VSOCK_WORKLOAD

_WORKLOADS = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo EMU-INIT-START
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
CMDLINE=$(cat /proc/cmdline)

arg() {  # arg NAME DEFAULT: NAME=value from the kernel command line
  for w in $CMDLINE; do case "$w" in "$1"=*) echo "${w#*=}"; return;; esac; done
  echo "$2"
}
result() { echo "EMU-RESULT $1 $2"; }
warn() { echo "EMU-WARN $*"; }
sha() { sha256sum | cut -d' ' -f1; }
now_ns() {  # /proc/uptime has 10 ms steps; timer_list has ns
  awk '/^now at/ {print $3; exit}' /proc/timer_list 2>/dev/null \
    || awk '{printf "%d\n", $1 * 1e9}' /proc/uptime
}
wait_for() {  # wait_for PATH: devices appear asynchronously after the driver binds
  local i=0
  while [ ! -e "$1" ]; do
    i=$((i + 1)); [ $i -gt 100 ] && { warn "$1 did not appear"; return 1; }
    sleep 0.05
  done
}
timed_dd() {  # timed_dd NAME BYTES mibps|iops DD-ARGS...: run dd, print its rate
  local name=$1 bytes=$2 kind=$3 t0 t1
  shift 3
  t0=$(now_ns)
  dd "$@" 2>/dev/null || { warn "$name: dd $* failed"; return 1; }
  t1=$(now_ns)
  awk -v n="$name" -v b="$bytes" -v k="$kind" -v t=$((t1 - t0)) 'BEGIN {
    s = t / 1e9
    if (k == "iops") printf "EMU-BENCH %s %.0f IOPS\n", n, b / 4096 / s
    else printf "EMU-BENCH %s %.1f MiB/s\n", n, b / 1048576 / s }'
}

w_none() { :; }

w_devices() {  # every virtio device, its id and the driver bound to it
  local d n=0 drv
  for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "EMU-DEV $(basename "$d") device=$(cat "$d/device") vendor=$(cat "$d/vendor")" \
      "driver=$drv features=$(cat "$d/features")"
    n=$((n + 1))
  done
  result devices.count $n
}

w_blk() {  # read the start of the disk, write random data, read it back
  local dev mib w r
  dev=$(arg emu.blk.dev /dev/vda); mib=$(arg emu.blk.mib 4)
  wait_for "$dev" || return 1
  result blk.sectors "$(cat "/sys/block/${dev#/dev/}/size")"
  result blk.read_sha256 "$(dd if="$dev" bs=1M count="$mib" iflag=direct 2>/dev/null | sha)"
  dd if=/dev/urandom of=/tmp/pattern bs=1M count="$mib" 2>/dev/null
  w=$(sha < /tmp/pattern)
  result blk.write_sha256 "$w"
  result blk.write_md5 "$(md5sum < /tmp/pattern | cut -d' ' -f1)"
  dd if=/tmp/pattern of="$dev" bs=1M oflag=direct conv=fsync 2>/dev/null || return 1
  rm -f /tmp/pattern
  r=$(dd if="$dev" bs=1M count="$mib" iflag=direct 2>/dev/null | sha)
  result blk.readback_sha256 "$r"
  [ "$r" = "$w" ]
}

w_blkbench() {  # O_DIRECT dd: 1 MiB sequential and 4 KiB (QD1) writes and reads
  local dev mib ops max
  dev=$(arg emu.blk.dev /dev/vda); mib=$(arg emu.blkbench.mib 64); ops=$(arg emu.blkbench.ops 2048)
  wait_for "$dev" || return 1
  max=$(($(cat "/sys/block/${dev#/dev/}/size") / 2048))
  [ "$mib" -gt "$max" ] && mib=$max
  [ $((ops / 256)) -gt "$max" ] && ops=$((max * 256))
  local b1=$((mib << 20)) b4=$((ops * 4096))
  timed_dd blk_write_1m $b1 mibps if=/dev/zero of="$dev" bs=1M count="$mib" oflag=direct &&
  timed_dd blk_read_1m $b1 mibps if="$dev" of=/dev/null bs=1M count="$mib" iflag=direct &&
  timed_dd blk_write_4k $b4 iops if=/dev/zero of="$dev" bs=4k count="$ops" oflag=direct &&
  timed_dd blk_read_4k $b4 iops if="$dev" of=/dev/null bs=4k count="$ops" iflag=direct
}

w_fio() {  # fio on the disk (the image needs the fio layer), its JSON report on the console
  # emu.fio.<knob>= sets an option for every job: rw bs iodepth numjobs size (default:
  # the whole disk) ioengine runtime (0: until `size` is done).
  # emu.fio.jobs=NAME[:opt=value...][/NAME...] runs jobs one after another (stonewall),
  # each with its own options over those.
  local dev size runtime jobs job name opt r line
  dev=$(arg emu.fio.dev "$(arg emu.blk.dev /dev/vda)")
  wait_for "$dev" || return 1
  set -- --output-format=json --filename="$dev" --direct=1 --group_reporting \
    --rw="$(arg emu.fio.rw randread)" --bs="$(arg emu.fio.bs 4k)" \
    --iodepth="$(arg emu.fio.iodepth 1)" --numjobs="$(arg emu.fio.numjobs 1)" \
    --ioengine="$(arg emu.fio.ioengine libaio)"
  size=$(arg emu.fio.size '')
  [ -n "$size" ] && set -- "$@" --size="$size"
  runtime=$(arg emu.fio.runtime 0)
  [ "$runtime" != 0 ] && set -- "$@" --time_based --runtime="$runtime"
  jobs=$(arg emu.fio.jobs fio)
  for job in $(echo "$jobs" | tr / ' '); do
    name=${job%%:*}
    set -- "$@" --name="$name" --stonewall
    [ "$name" = "$job" ] && continue
    for opt in $(echo "${job#*:}" | tr : ' '); do set -- "$@" "--$opt"; done
  done
  LD_LIBRARY_PATH=/usr/lib/emu-fio fio "$@" > /tmp/fio.json 2> /tmp/fio.err; r=$?
  echo EMU-FIO-JSON-BEGIN
  cat /tmp/fio.json
  echo EMU-FIO-JSON-END
  while read -r line; do warn "fio: $line"; done < /tmp/fio.err
  rm -f /tmp/fio.json /tmp/fio.err
  return $r
}

w_livemig() {  # a workload to migrate live, driven by the host through the disk's last 4 KiB
  # O_DIRECT writes of sequence-numbered 4 KiB blocks (each read back), short-lived
  # processes all along (QEMU 7.2 under TCG loses guest writes in a live migration of a
  # guest that only does disk I/O; one that keeps starting processes does not), and a
  # region read into the page cache when the host writes EMU-FILL into the flag block.
  # At EMU-STOP: every acknowledged block is checked, the cached region against an
  # O_DIRECT read, then again after dropping caches; the sha256s go to the host.
  local dev slots at mib flag n=0 s bad=0 filled=0 f got want
  dev=$(arg emu.blk.dev /dev/vda); slots=$(arg emu.livemig.slots 256)
  at=$(arg emu.livemig.cache_at 16); mib=$(arg emu.livemig.cache_mib 8)
  wait_for "$dev" || return 1
  exec 7<"$dev"  # held open: the last close of a block device drops its page cache
  # the flag: the disk's last 4 KiB (busybox dd does O_DIRECT only with buffers of a page
  # or more; a smaller one falls back to the page cache, which the held fd keeps stale)
  flag=$(arg emu.livemig.flag $(($(cat "/sys/block/${dev#/dev/}/size") / 8 - 1)))
  local region="bs=64k skip=$((at * 16)) count=$((mib * 16))"
  rm -f /tmp/stop /tmp/acks
  (while [ ! -e /tmp/stop ]; do usleep 2000; done) &
  while :; do
    f=$(dd if="$dev" bs=4096 skip="$flag" count=1 iflag=direct 2>/dev/null | head -c 8)
    [ "$f" = EMU-STOP ] && break
    if [ "$f" = EMU-FILL ] && [ $filled = 0 ]; then
      echo 1 > /proc/sys/vm/drop_caches
      dd if="$dev" of=/dev/null $region 2>/dev/null || bad=$((bad + 1))
      filled=1; echo "EMU-FILLED $n"
    fi
    n=$((n + 1)); s=$((n % slots))
    printf 'EMU-SEQ %08d %04d\n' $n $s | dd of=/tmp/blk bs=4096 conv=sync 2>/dev/null
    if dd if=/tmp/blk of="$dev" bs=4096 seek=$s count=1 oflag=direct 2>/dev/null; then
      echo "$s $n" >> /tmp/acks
    else
      bad=$((bad + 1)); warn "write $n failed"
    fi
    dd if="$dev" bs=4096 skip=$s count=1 iflag=direct 2>/dev/null | cmp -s - /tmp/blk ||
      { bad=$((bad + 1)); warn "block $n read back wrong"; }
    [ $((n % 8)) = 0 ] && echo "EMU-ITER a $n"
  done
  touch /tmp/stop; wait
  local cached direct dropped
  result livemig.cached_kib "$(awk '/^Buffers:/ {print $2}' /proc/meminfo)"
  cached=$(dd if="$dev" $region 2>/dev/null | sha)
  direct=$(dd if="$dev" $region iflag=direct 2>/dev/null | sha)
  echo 1 > /proc/sys/vm/drop_caches
  dropped=$(dd if="$dev" $region 2>/dev/null | sha)
  [ "$cached" = "$direct" ] || { bad=$((bad + 1)); warn "cached region differs from the disk"; }
  [ "$dropped" = "$direct" ] || { bad=$((bad + 1)); warn "region differs after drop_caches"; }
  dd if="$dev" of=/tmp/slots bs=4096 count="$slots" iflag=direct 2>/dev/null
  awk '{last[$1] = $2} END {for (s in last) print s, last[s]}' /tmp/acks > /tmp/last
  local slot seq
  while read -r slot seq; do
    got=$(dd if=/tmp/slots bs=4096 skip="$slot" count=1 2>/dev/null | head -c 21)
    want=$(printf 'EMU-SEQ %08d %04d' "$seq" "$slot")
    [ "$got" = "$want" ] || { bad=$((bad + 1)); warn "slot $slot holds '$got', acknowledged $seq"; }
  done < /tmp/last
  result livemig.writes $n
  result livemig.checked "$(wc -l < /tmp/last)"
  result livemig.filled $filled
  result livemig.region_sha256 "$direct"
  result livemig.slots_sha256 "$(sha < /tmp/slots)"
  result livemig.bad $bad
  [ $bad = 0 ]
}

w_hvc() {  # a marker line through virtio-console port 0 (hvc0)
  local m
  m=$(arg emu.hvc.marker EMU-HVC-HELLO)
  wait_for /dev/hvc0 || return 1
  echo "$m" > /dev/hvc0 || return 1
  result hvc.wrote "$m"
}

w_rng() {  # bytes from the hardware RNG, with a checksum and a distinct-byte count
  local n
  n=$(($(arg emu.rng.kib 16) * 1024))
  wait_for /dev/hwrng || return 1
  result rng.current "$(cat /sys/class/misc/hw_random/rng_current)"
  head -c "$n" /dev/hwrng > /tmp/rng || return 1
  result rng.bytes "$(wc -c < /tmp/rng)"
  result rng.sha256 "$(sha < /tmp/rng)"
  result rng.distinct "$(od -An -v -tx1 /tmp/rng | tr -s ' ' '\n' | sort -u | grep -c .)"
  rm -f /tmp/rng
}

w_net() {  # address eth0 and ping the peer
  local ifc out rc rtt
  ifc=$(arg emu.net.if eth0)
  wait_for "/sys/class/net/$ifc" || return 1
  ip link set lo up
  ip link set "$ifc" up && ip addr add "$(arg emu.net.ip 10.0.2.15/24)" dev "$ifc" || return 1
  result net.mac "$(cat "/sys/class/net/$ifc/address")"
  out=$(ping -c "$(arg emu.net.count 3)" -i 0.2 -W 2 "$(arg emu.net.peer 10.0.2.2)" 2>&1); rc=$?
  echo "$out" | tail -n 2
  result net.ping_rc $rc
  rtt=$(echo "$out" | sed -n 's|.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p')
  [ -n "$rtt" ] && result net.rtt_avg_ms "$rtt"
  return $rc
}

w_script() {  # emu.script=<base64>: a host-supplied script, sourced (can use the helpers)
  arg emu.script '' | base64 -d > /tmp/script.sh && . /tmp/script.sh
}

w_sh() { setsid cttyhack sh || sh; }
"""

_MAIN = r"""
while read -r m; do
  insmod "/lib/modules/$m" || warn "insmod $m failed"
done < /etc/emu/modules

rc=0
for w in $(arg emu.run devices | tr , ' '); do
  echo "EMU-STEP $w"
  if type "w_$w" >/dev/null 2>&1; then "w_$w"; r=$?; else warn "no workload $w"; r=127; fi
  result "$w.rc" $r
  [ $r = 0 ] || rc=$r
done
echo "EMU-DONE rc=$rc"
sync
poweroff -f
echo o > /proc/sysrq-trigger
"""

INIT = _WORKLOADS + FS_WORKLOAD + VSOCK_WORKLOAD + BALLOON_WORKLOAD + _MAIN
